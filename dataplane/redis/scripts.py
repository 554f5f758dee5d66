"""The Redis backend's Lua scripts: every change to a partition is one atomic script.

Each is run as `PRELUDE + SCRIPT` (`dataplane.redis.lua` has the key layout and the
shared functions). Scripts answer {"ok", ...}, {"err", kind, detail...} or a waiting state.
"""

from __future__ import annotations

from dataplane.redis.lua import PRELUDE

__all__ = ["PRELUDE"]

# ARGV: B, schema, capacity, stale_policy, exist_ok, registry key, partition, nf, fields..., nc, consumers...
CREATE = r"""
local schema, exist_ok = ARGV[2], ARGV[5]
local nf = tonumber(ARGV[8])
if redis.call('EXISTS', k('meta')) == 1 then
  local existing = meta('schema')
  if exist_ok ~= '1' or existing ~= schema then return {'err', 'exists', existing} end
else
  if nf > 31 then return {'err', 'fields', nf} end
  redis.call('DEL', k('ev'), k('space'))
  redis.call('HSET', k('meta'), 'schema', schema, 'capacity', ARGV[3], 'stale', ARGV[4], 'next_row', 0,
    'next_group', 0, 'created', 0, 'freed', 0, 'put_waits', 0, 'sealed', 0, 'live', 0, 'nc', 0, 'nf', nf,
    'layout', 3)
  for i = 1, nf do redis.call('HSET', k('bits'), ARGV[8 + i], i - 1) end
  redis.call('SADD', ARGV[6], ARGV[7])
end
upgrade()
local at = 9 + nf
for i = 1, tonumber(ARGV[at]) do
  local e = register(ARGV[at + i])
  if e then return e end
end
return {'ok'}
"""

# ARGV: B, consumer
REGISTER = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
upgrade()
return register(ARGV[2]) or {'ok'}
"""

# ARGV: B, put id, chunk, n, group_size, version|'', first try 0|1, nf, bits..., spans (msgpack, see
#       accept), sizes (msgpack: the rows' lengths, then their byte counts)
# (the cells are already in the chunk's keys, written in the same transaction)
PUT_NEW = r"""
local chunk, nf = ARGV[3], tonumber(ARGV[8])
local bits = {}
for i = 1, nf do bits[i] = tonumber(ARGV[8 + i]) end
if redis.call('EXISTS', k('meta')) == 0 then return refuse(chunk, bits, {'err', 'unknown'}) end
upgrade()
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
"""

# ARGV: B, '-', chunk, n, version|'', nf, bits..., spans, sizes (as PUT_NEW), rows[n]
PUT_FILL = r"""
local chunk, n, nf = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6])
local version = tonumber(ARGV[5])
local mask, bits = 0, {}
for i = 1, nf do bits[i] = tonumber(ARGV[6 + i]); mask = bit.bor(mask, POW[bits[i]]) end
if redis.call('EXISTS', k('meta')) == 0 then return refuse(chunk, bits, {'err', 'unknown'}) end
upgrade()
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
"""

# ARGV: B, consumer, peer, mask, batch_size, lease_ms, v_min|'', mode seq|cand|rows,
#       partial 1 (take what there is) | a (allowed later) | 0 (never),
#       alive_ms, wait_ms|'', min_rows (serve at once when that many are ready), acks (held_arg),
#       nrows, rows...
GET = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
upgrade()
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
"""

# ARGV: B, consumer, peer, held (held_arg)
ACK = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
upgrade()
return do_ack(j, ARGV[3], held_arg(ARGV[4])) or {'ok'}
"""

# ARGV: B, consumer, peer, lease_ms (renew) or 'release', alive_ms, held (held_arg)
# renew answers the id of the one new lease the rows are now held under
LEASES = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
upgrade()
local rows, e = take(j, ARGV[3], held_arg(ARGV[6]), not_held)
if not rows then return e end
if ARGV[4] == 'release' then
  give_back(j, rows, false)
  return {'ok'}
end
local now = now_ms()
local id = new_lease(j, ARGV[3], rows, now + tonumber(ARGV[4]))
redis.call('ZADD', k('alive'), now + tonumber(ARGV[5]), ARGV[3])
return {'ok', id}
"""

# ARGV: B, peer, alive_ms ('0': the client closes: give its leases back now)
ALIVE = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'ok'} end
if ARGV[3] ~= '0' then
  redis.call('ZADD', k('alive'), now_ms() + tonumber(ARGV[3]), ARGV[2])
  return {'ok'}
end
upgrade()
for j = 0, nconsumers() - 1 do give_back(j, end_leases(j, leases_of(j, {[ARGV[2]] = true})), true) end
redis.call('ZREM', k('alive'), ARGV[2])
return {'ok'}
"""

# ARGV: B
SEAL = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
redis.call('HSET', k('meta'), 'sealed', 1)
notify('ev')
return {'ok'}
"""

# ARGV: B, registry key, partition
DROP = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'ok'} end
local keys = {k('meta'), k('bits'), k('cons'), k('rows'), k('refs'), k('ver'), k('alive'), k('puts'),
  k('putrow'), k('xc'), k('missing'), k('acked'), k('blive')}
for _, ref in ipairs(redis.call('HKEYS', k('xc'))) do redis.call('DEL', k('x:' .. ref)) end
for j = 0, nconsumers() - 1 do
  for _, s in ipairs({'pend', 'ready', 'lease', 'lrows', 'n'}) do table.insert(keys, c(j, s)) end
end
redis.call('DEL', unpack(keys))
redis.call('SREM', ARGV[2], ARGV[3])
wake('ev'); wake('space')
redis.call('PEXPIRE', k('ev'), 60000)
redis.call('PEXPIRE', k('space'), 60000)
return {'ok'}
"""

# ARGV: B. Everything a snapshot or the stats need, read in one atomic step.
SNAPSHOT = r"""
local function leased(j)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', c(j, 'lrows'))) do n = n + #rows_of(v) end
  return n
end
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
upgrade()
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
"""

# ARGV: B, registry key, partition, schema, capacity, stale, next_row, next_group, created, sealed, nf,
#       fields..., nc, consumers..., then rows: id, packed meta pairs (the meta's refs point into the
#       chunks the client wrote the cells to)
RESTORE = r"""
if redis.call('EXISTS', k('meta')) == 1 then return {'err', 'exists', meta('schema')} end
local nf = tonumber(ARGV[11])
redis.call('HSET', k('meta'), 'schema', ARGV[4], 'capacity', ARGV[5], 'stale', ARGV[6], 'next_row', ARGV[7],
  'next_group', ARGV[8], 'created', ARGV[9], 'freed', 0, 'put_waits', 0, 'sealed', ARGV[10], 'live', 0,
  'nc', 0, 'nf', nf, 'layout', 3)
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
"""
