-- ARGV: B, consumer, peer, mask, batch_size, lease_ms, v_min|'', mode seq|cand|rows,
--       partial 1 (take what there is) | a (allowed later) | 0 (never),
--       alive_ms, wait_ms|'', min_rows (serve at once when that many are ready), acks (held_arg),
--       nrows, rows...
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
local peer, mask, bs = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local mode, partial = ARGV[8], ARGV[9] == '1'
local cap = tonumber(meta('capacity'))
local minr = tonumber(ARGV[12])
if ARGV[9] == '0' and minr > cap then return {'err', 'toobig', cap, minr} end
local at = 13
local acks = held_arg(ARGV[at])
at = at + 1
local want = {}
for i = 1, tonumber(ARGV[at]) do want[i] = ARGV[at + i] end
if #acks > 0 then
  local e = do_ack(j, peer, acks)
  if e then return e end
end
local now = now_ms()
redis.call('ZADD', k('alive'), now + tonumber(ARGV[10]), peer)
-- leases whose deadline passed, and leases of clients whose heartbeat stopped
local expired = redis.call('ZRANGEBYSCORE', c(j, 'lease'), '-inf', now)
give_back(j, end_leases(j, expired), true)
local dead = redis.call('ZRANGEBYSCORE', k('alive'), '-inf', now)
if #dead > 0 then
  local gone = {}
  for _, p in ipairs(dead) do gone[p] = true end
  for jj = 0, nconsumers() - 1 do give_back(jj, end_leases(jj, leases_of(jj, gone)), true) end
  bulk('ZREM', k('alive'), dead)
end
-- the consumer asks for other fields than last time: sort the rows it waits for again
if cmask(j) ~= mask then
  redis.call('HSET', k('meta'), 'mask' .. j, mask)
  local complete = true  -- no live row lacks a field of the mask: every waiting row is ready
  for b = 0, tonumber(meta('nf')) - 1 do
    if bit.band(mask, POW[b]) ~= 0 and tonumber(redis.call('HGET', k('missing'), b) or 0) > 0 then
      complete = false
    end
  end
  if complete and redis.call('EXISTS', c(j, 'ready')) == 0 then  -- a consumer's first get, mostly
    if redis.call('EXISTS', c(j, 'pend')) == 1 then redis.call('RENAME', c(j, 'pend'), c(j, 'ready')) end
  elseif complete then
    redis.call('ZUNIONSTORE', c(j, 'ready'), 2, c(j, 'ready'), c(j, 'pend'), 'AGGREGATE', 'MIN')
    redis.call('DEL', c(j, 'pend'))
  else
    local rows = redis.call('ZRANGE', c(j, 'pend'), 0, -1)
    for _, r in ipairs(redis.call('ZRANGE', c(j, 'ready'), 0, -1)) do table.insert(rows, r) end
    redis.call('DEL', c(j, 'pend'), c(j, 'ready'))
    wait_for(j, rows, getrows(rows))
  end
end
-- the version window: rows older than v_min are dropped or regenerated
if ARGV[7] ~= '' then
  local stale = {}
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', k('ver'), 0, '(' .. ARGV[7])) do
    if redis.call('ZSCORE', c(j, 'ready'), r) then table.insert(stale, r) end
  end
  if #stale > 0 then
    bulk('ZREM', c(j, 'ready'), stale)
    if meta('stale') == 'drop' then
      redis.call('HINCRBY', c(j, 'n'), 'dropped_stale', #stale)
      done(j, stale)
    else
      local nc = nconsumers()
      local counts, delta = {}, {}
      for _, r in ipairs(stale) do
        local m = getrow(r)
        for b = 0, 30 do if bit.band(m[6], POW[b]) ~= 0 then delta[b] = (delta[b] or 0) + 1 end end
        forget_cells(counts, m, m[6])
        m[5] = bit.band(m[5], bit.bnot(m[6]))
        m[4], m[6] = -1, 0
        local acked = acked_bits({r})[1] or 0
        unack(r)
        for o = 0, nc - 1 do
          -- every consumer waits for the row again, but one holding it (it gives it back when its
          -- read finds the cells gone); j took it off its ready set above
          local waits = o == j or bit.band(acked, POW[o]) ~= 0
          waits = waits or redis.call('ZREM', c(o, 'ready'), r) + redis.call('ZREM', c(o, 'pend'), r) > 0
          if waits then redis.call('ZADD', c(o, has(m[5], cmask(o)) and 'ready' or 'pend'), r, r) end
        end
        setrow(r, m)
      end
      release_cells(counts)
      missing(delta)
      bulk('ZREM', k('ver'), stale)
      redis.call('HINCRBY', c(j, 'n'), 'regenerated', #stale)
      notify('ev')
    end
  end
end
local nready, nwait = redis.call('ZCARD', c(j, 'ready')), redis.call('ZCARD', c(j, 'pend'))
local drained = meta('sealed') == '1' and nwait == 0
local npend = nready + nwait  -- rows the consumer waits for, ready or not

local function lease(rows, first)  -- first: the rows are the first #rows of the ready set
  local deadline = now + tonumber(ARGV[6])
  if first then
    if #rows > 0 then redis.call('ZREMRANGEBYRANK', c(j, 'ready'), 0, #rows - 1) end
  else
    bulk('ZREM', c(j, 'ready'), rows)
  end
  local id = new_lease(j, peer, rows, deadline)
  if #rows > 0 then redis.call('HINCRBY', c(j, 'n'), 'delivered', #rows) end
  if ARGV[11] ~= '' then
    redis.call('HINCRBY', c(j, 'n'), 'waits', 1)
    redis.call('HINCRBYFLOAT', c(j, 'n'), 'wait_s', tonumber(ARGV[11]) / 1000)
  end
  -- the rows' metadata as stored, back to back: the client unpacks it (group, version, length,
  -- where the cells are) and reads the cells with plain GETRANGEs
  local blobs = hmget(k('rows'), rows)
  for i, v in ipairs(blobs) do blobs[i] = v or '\192' end  -- msgpack nil: the client refuses such a row
  return {'ok', rows, id, table.concat(blobs)}
end

local function waiting(kind)
  local next_ms = -1
  local first = redis.call('ZRANGE', c(j, 'lease'), 0, 0, 'WITHSCORES')
  if #first > 0 then
    next_ms = tonumber(first[2]) - now
    local hb = redis.call('ZRANGE', k('alive'), 0, 0, 'WITHSCORES')
    if #hb > 0 then next_ms = math.min(next_ms, tonumber(hb[2]) - now) end
  end
  return {kind, last_id('ev'), next_ms, nready, npend}
end

local function ended()
  if not drained then return false end
  for _, id in ipairs(redis.call('HKEYS', c(j, 'lrows'))) do if holder(id) ~= peer then return false end end
  return true
end

if mode == 'seq' then
  local rows = redis.call('ZRANGE', c(j, 'ready'), 0, bs - 1)
  if #rows == bs or #rows >= minr or (#rows > 0 and (drained or partial)) then return lease(rows, true) end
  if ended() then return {'end'} end
  if partial then return lease({}) end
  return waiting('wait')
elseif mode == 'rows' then
  for _, r in ipairs(want) do
    if not redis.call('ZSCORE', c(j, 'ready'), r) then return {'conflict'} end
  end
  return lease(want)
end
local out = waiting('cand')
table.insert(out, drained and 1 or 0)
table.insert(out, ended() and 1 or 0)
local cand, ready = {}, redis.call('ZRANGE', c(j, 'ready'), 0, -1)
for i, m in ipairs(getrows(ready)) do
  local r = ready[i]
  table.insert(cand, r); table.insert(cand, m[1]); table.insert(cand, m[2]); table.insert(cand, m[3])
end
table.insert(out, cand)
return out
