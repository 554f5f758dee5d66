-- ARGV: B, put id, chunk, n, group_size, version|'', first try 0|1, nf, bits..., spans (msgpack, see
--       accept), sizes (msgpack: the rows' lengths, then their byte counts)
-- (the cells are already in the chunk's keys, written in the same transaction)
local chunk, nf = ARGV[3], tonumber(ARGV[8])
local bits = {}
for i = 1, nf do bits[i] = tonumber(ARGV[8 + i]) end
if redis.call('EXISTS', k('meta')) == 0 then return refuse(chunk, bits, {'err', 'unknown'}) end
local now = now_ms()
local done_at = redis.call('ZSCORE', k('puts'), ARGV[2])
if done_at then return refuse(chunk, bits, {'ok', tonumber(redis.call('HGET', k('putrow'), ARGV[2]))}) end
local n, gs = tonumber(ARGV[4]), tonumber(ARGV[5])
local cap, live = tonumber(meta('capacity')), tonumber(meta('live'))
if n > cap then return refuse(chunk, bits, {'err', 'neverfits', cap}) end
if live + n > cap then
  if ARGV[7] == '1' then redis.call('HINCRBY', k('meta'), 'put_waits', 1) end
  return refuse(chunk, bits, {'full', live, cap, last_id('space')})
end
local first = redis.call('HINCRBY', k('meta'), 'next_row', n) - n
local g0 = redis.call('HINCRBY', k('meta'), 'next_group', n / gs) - n / gs
local mask = 0
for i = 1, nf do mask = bit.bor(mask, POW[bits[i]]) end
local version = tonumber(ARGV[6]) or -1
local versioned = 0
if version >= 0 then versioned = mask end
local spans = cmsgpack.unpack(ARGV[9 + nf])
local sizes = cmsgpack.unpack(ARGV[10 + nf])
local rows, ver, pend, metas = {}, {}, {}, {}
local nfs = tonumber(meta('nf'))
for i = 1, n do
  local r = tostring(first + i - 1)  -- rows as strings, as every other script has them (ZRANGE, ARGV)
  rows[i] = r
  metas[i] = {g0 + math.floor((i - 1) / gs), gs, sizes[1][i], version, mask, versioned, 0, sizes[2][i]}
  for b = 0, nfs - 1 do metas[i][9 + 3 * b], metas[i][10 + 3 * b], metas[i][11 + 3 * b] = '', 0, 0 end
  pend[2 * i - 1], pend[2 * i] = r, r
  if version >= 0 then table.insert(ver, version); table.insert(ver, r) end
end
accept(chunk, bits, metas, spans)
setrows(rows, metas, n > 0 and refkey(metas[1]))  -- the put's rows share their refs
local delta = {}
for b = 0, nfs - 1 do if bit.band(mask, POW[b]) == 0 then delta[b] = n end end
missing(delta)
bulk('ZADD', k('ver'), ver)
local nc = nconsumers()
for j = 0, nc - 1 do bulk('ZADD', c(j, has(mask, cmask(j)) and 'ready' or 'pend'), pend) end
if nc > 1 then live_blocks(rows, 1, nc) end
redis.call('HINCRBY', k('meta'), 'live', n)
redis.call('HINCRBY', k('meta'), 'created', n)
redis.call('ZADD', k('puts'), now, ARGV[2])
redis.call('HSET', k('putrow'), ARGV[2], first)
-- put ids are kept 10 min (a retried put arrives within retry_deadline_s), at most 10000 of them
local old = redis.call('ZRANGEBYSCORE', k('puts'), '-inf', now - 600000, 'LIMIT', 0, 100)
local over = redis.call('ZCARD', k('puts')) - 10000
if over > 0 then old = redis.call('ZRANGE', k('puts'), 0, over - 1) end
if #old > 0 then bulk('ZREM', k('puts'), old); bulk('HDEL', k('putrow'), old) end
notify('ev')
return {'ok', first}
