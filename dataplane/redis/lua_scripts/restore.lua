-- ARGV: B, registry key, partition, schema, capacity, stale, next_row, next_group, created, sealed, nf,
--       fields..., nc, consumers..., then rows: id, packed meta pairs (the meta's refs point into the
--       chunks the client wrote the cells to)
if redis.call('EXISTS', k('meta')) == 1 then return {'err', 'exists', meta('schema')} end
local nf = tonumber(ARGV[11])
redis.call('HSET', k('meta'), 'schema', ARGV[4], 'capacity', ARGV[5], 'stale', ARGV[6], 'next_row', ARGV[7],
  'next_group', ARGV[8], 'created', ARGV[9], 'freed', 0, 'put_waits', 0, 'sealed', ARGV[10], 'live', 0,
  'nc', 0, 'nf', nf)
for i = 1, nf do redis.call('HSET', k('bits'), ARGV[11 + i], i - 1) end
local at = 12 + nf
local nc = tonumber(ARGV[at])
for i = 1, nc do
  redis.call('HSET', k('cons'), ARGV[at + i], i - 1)
end
redis.call('HSET', k('meta'), 'nc', nc)
at = at + nc + 1
local rows, ver, cells, delta, maps = {}, {}, {}, {}, {}
for i = at, #ARGV, 2 do
  local r, m = ARGV[i], cmsgpack.unpack(ARGV[i + 1])
  lacking(delta, m[5], nf, 1)
  local acked = m[7]
  if acked ~= 0 and nc > 1 then
    local b, x = block_of(r)
    maps[b] = maps[b] or bitmaps(nc, b)
    for o = 1, nc do if bit.band(acked, POW[o - 1]) ~= 0 then flip(maps[b][o], x, true) end end
  end
  m[7] = 0
  for b = 0, nf - 1 do
    local chunk = m[9 + 3 * b] or ''
    if bit.band(m[5], POW[b]) ~= 0 and chunk ~= '' then
      cells[chunk .. ':' .. b] = (cells[chunk .. ':' .. b] or 0) + 1
    else
      m[9 + 3 * b], m[10 + 3 * b], m[11 + 3 * b] = '', 0, 0
    end
  end
  setrow(r, m)
  table.insert(rows, r)
  if m[4] >= 0 then table.insert(ver, m[4]); table.insert(ver, r) end
  for j = 0, nc - 1 do
    if bit.band(acked, POW[j]) == 0 then redis.call('ZADD', c(j, 'pend'), r, r) end
  end
end
for ref, n in pairs(cells) do redis.call('HSET', k('xc'), ref, n) end
for b, m in pairs(maps) do save_bitmaps(b, m) end
if nc > 1 then live_blocks(rows, 1, nc) end
missing(delta)
bulk('ZADD', k('ver'), ver)
redis.call('HSET', k('meta'), 'live', #rows)
redis.call('SADD', ARGV[2], ARGV[3])
return {'ok', #rows}
