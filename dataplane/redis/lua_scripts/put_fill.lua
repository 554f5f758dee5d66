-- ARGV: B, '-', chunk, n, version|'', nf, bits..., spans, sizes (as PUT_NEW), rows[n]
local chunk, n, nf = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6])
local version = tonumber(ARGV[5])
local mask, bits = 0, {}
for i = 1, nf do bits[i] = tonumber(ARGV[6 + i]); mask = bit.bor(mask, POW[bits[i]]) end
if redis.call('EXISTS', k('meta')) == 0 then return refuse(chunk, bits, {'err', 'unknown'}) end
local sizes = cmsgpack.unpack(ARGV[8 + nf])
local rows = {}
for i = 1, n do rows[i] = ARGV[8 + nf + i] end
local metas = getrows(rows)
for i = 1, n do
  local r, m = rows[i], metas[i]
  if not m then return refuse(chunk, bits, {'err', 'norow', r}) end
  if bit.band(m[5], mask) ~= 0 then return refuse(chunk, bits, {'err', 'twice', r, bit.band(m[5], mask)}) end
end
local ver = {}
for i = 1, n do
  local m = metas[i]
  m[5] = bit.bor(m[5], mask)
  if version then
    if m[4] < 0 then m[4] = version else m[4] = math.min(m[4], version) end
    table.insert(ver, m[4]); table.insert(ver, rows[i])
  end
  if m[4] >= 0 then m[6] = bit.bor(m[6], mask) end
  m[3] = m[3] + sizes[1][i]
  m[8] = m[8] + sizes[2][i]
end
accept(chunk, bits, metas, cmsgpack.unpack(ARGV[7 + nf]))
setrows(rows, metas)
local delta = {}
for _, b in ipairs(bits) do delta[b] = -n end
missing(delta)
bulk('ZADD', k('ver'), ver)
for j = 0, nconsumers() - 1 do
  local cm = cmask(j)
  if cm and bit.band(cm, mask) ~= 0 then
    local ready = {}
    for i = 1, n do
      if has(metas[i][5], cm) and redis.call('ZREM', c(j, 'pend'), rows[i]) == 1 then
        table.insert(ready, rows[i]); table.insert(ready, rows[i])
      end
    end
    bulk('ZADD', c(j, 'ready'), ready)
  end
end
notify('ev')
return {'ok'}
