-- ARGV: B. Everything a snapshot or the stats need, read in one atomic step.
local function leased(j)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', c(j, 'lrows'))) do n = n + #rows_of(v) end
  return n
end
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local out = {redis.call('HGETALL', k('meta')), redis.call('HGETALL', k('cons')),
  redis.call('HGETALL', k('rows'))}
local counts = {}
for j = 0, nconsumers() - 1 do
  local ready = redis.call('ZCARD', c(j, 'ready'))
  local waiting = ready + redis.call('ZCARD', c(j, 'pend'))
  table.insert(counts, {waiting, ready, leased(j), redis.call('HGETALL', c(j, 'n'))})
end
table.insert(out, counts)
local acked = {}  -- row, bits of the consumers done with it, ... (rows no one is done with left out)
if nconsumers() > 1 then
  local ids = {}
  for i = 1, #out[3], 2 do table.insert(ids, out[3][i]) end
  for i, a in ipairs(acked_bits(ids)) do
    if a and a ~= 0 then table.insert(acked, ids[i]); table.insert(acked, a) end
  end
end
table.insert(out, acked)
if ARGV[2] == '1' then
  local rows = out[3]
  local metas = {}
  for i = 2, #rows, 2 do metas[i / 2] = cmsgpack.unpack(rows[i]) end
  for b = 0, tonumber(meta('nf')) - 1 do
    local cells = {}
    for i, m in ipairs(metas) do
      local chunk, off, size = m[9 + 3 * b], m[10 + 3 * b], m[11 + 3 * b]
      if chunk ~= '' then
        table.insert(cells, rows[2 * i - 1])
        local cell = ''
        if size > 0 then cell = redis.call('GETRANGE', k('x:' .. chunk .. ':' .. b), off, off + size - 1) end
        table.insert(cells, cell)
      end
    end
    table.insert(out, cells)
  end
end
return out
