"""The Redis backend's Lua scripts: every change to a partition is one atomic script.

Keys of partition P in store namespace NS share the prefix `NS:{P}` (ARGV[1]; the braces
make it one Redis Cluster hash slot):

    :meta            HASH   schema, capacity, stale policy, counters, sealed, live rows, mask<j>
    :bits  :cons     HASH   field -> bit, consumer -> bit
    :rows            HASH   row -> msgpack [group, group_size, length, version, ready, versioned,
                            0, nbytes, ref of field 0, ref of field 1, ...] (ready / versioned:
                            field bits; a ref, '<chunk>:<i>', is where the cell is, '' if none)
    :acked           HASH   row -> bits of the consumers that acked it (an integer, so an ack
                            reads and writes no msgpack metadata unless it frees the row)
    :x:<chunk>:<b>   HASH   i -> cell (`dataplane.storage.cells`): the cells of one put, written
                            by plain HSETs in the same MULTI/EXEC as the put's script, read by
                            plain HMGETs after the get's script; cell bytes never pass through
                            Lua (copying them into and out of Lua costs 50x the HSET itself)
    :xc              HASH   "<chunk>:<b>" -> rows still referring to that chunk's cells: a chunk is
                            deleted whole when its last row lets go (one DEL instead of a HDEL
                            per cell, which was a fifth of a get's server time)
    :missing         HASH   field bit -> live rows that lack that field: a consumer whose fields no
                            row lacks gets its ready set as a copy of its pending set, without
                            reading any row's metadata
    :ver             ZSET   row by policy version, so a version window finds stale rows in O(log n)
    :c<j>:pend       ZSET   rows consumer j has neither been handed nor finished, by row number
    :c<j>:ready      ZSET   the pending rows whose fields consumer j asks for are written
    :c<j>:lease      ZSET   lease id -> deadline (server ms); a lease is one handed-out batch, its
                            id '<client id>/<n>'; :c<j>:lrows HASH lease id -> msgpack list of the
                            rows it still holds (a lease per batch, not per row: per-row lease
                            entries were a third of a get's server time)
    :c<j>:n          HASH   counters (delivered, acked, redelivered, ...)
    :alive           ZSET   client id by the deadline of its heartbeat
    :ev  :space      STREAM one entry (MAXLEN 1): appended when rows become ready / capacity
                            frees, so a waiting client blocks in XREAD from the id it last saw
    :puts  :putrow    ZSET   ids of finished puts (10 min, at most 10000) / HASH id -> first row, so
                            a put retried after a lost reply is not stored twice

A put's chunk keys carry a TTL until its script accepts them (PERSIST), so a put whose
script refused it, or whose client died between the two, leaves nothing behind.

Scripts answer {"ok", ...}, {"err", kind, detail...} or a waiting state; the client turns
errors into the exception tree with full messages. Knows nothing about Python objects.
"""

from __future__ import annotations

PRELUDE = r"""
local B = ARGV[1]
local function k(s) return B .. ':' .. s end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function notify(s) redis.call('XADD', k(s), 'MAXLEN', '1', '*', 'e', '1') end
local function last_id(s)
  local e = redis.call('XREVRANGE', k(s), '+', '-', 'COUNT', 1)
  if #e == 0 then return '0-0' end
  return e[1][1]
end
local function getrow(r)
  local v = redis.call('HGET', k('rows'), r)
  if not v then return nil end
  return cmsgpack.unpack(v)
end
local function setrow(r, m) redis.call('HSET', k('rows'), r, cmsgpack.pack(m)) end
local function bulk(cmd, key, args)
  local i = 1
  while i <= #args do
    local j = math.min(i + 999, #args)
    redis.call(cmd, key, unpack(args, i, j))
    i = j + 1
  end
end
-- the metadata of many rows in one HMGET (false for a row that is gone), and back in one HSET
local function getrows(rows)
  local out = {}
  local s = 1
  while s <= #rows do
    local e = math.min(s + 4999, #rows)
    for _, v in ipairs(redis.call('HMGET', k('rows'), unpack(rows, s, e))) do
      if v then table.insert(out, cmsgpack.unpack(v)) else table.insert(out, false) end
    end
    s = e + 1
  end
  return out
end
local function setrows(rows, metas)
  local kv = {}
  for i, r in ipairs(rows) do table.insert(kv, r); table.insert(kv, cmsgpack.pack(metas[i])) end
  bulk('HSET', k('rows'), kv)
end
local function has(m, mask) return mask ~= nil and bit.band(m, mask) == mask end
local function cmask(j)
  local v = redis.call('HGET', k('meta'), 'mask' .. j)
  if v then return tonumber(v) end
  return nil
end
local function meta(f) return redis.call('HGET', k('meta'), f) end
local function nconsumers() return tonumber(meta('nc')) end
local function consumer_bit(name)
  local j = redis.call('HGET', k('cons'), name)
  if j then return tonumber(j) end
  return nil
end
local function c(j, s) return k('c' .. j .. ':' .. s) end

-- leases: who holds one, a new one, the rows of ended ones
local function holder(id) return string.match(id, '^(.*)/%d+$') end
local function new_lease(j, peer, rows, deadline)
  if #rows == 0 then return '' end
  local id = peer .. '/' .. redis.call('HINCRBY', c(j, 'n'), 'leases', 1)
  redis.call('ZADD', c(j, 'lease'), deadline, id)
  redis.call('HSET', c(j, 'lrows'), id, cmsgpack.pack(rows))
  return id
end
local function end_leases(j, ids)
  local rows = {}
  local s = 1
  while s <= #ids do
    local e = math.min(s + 4999, #ids)
    for _, v in ipairs(redis.call('HMGET', c(j, 'lrows'), unpack(ids, s, e))) do
      if v then for _, r in ipairs(cmsgpack.unpack(v)) do table.insert(rows, r) end end
    end
    s = e + 1
  end
  bulk('HDEL', c(j, 'lrows'), ids)
  bulk('ZREM', c(j, 'lease'), ids)
  return rows
end
local function leases_of(j, peers)  -- ids of consumer j's leases held by the clients in set `peers`
  local ids = {}
  for _, id in ipairs(redis.call('HKEYS', c(j, 'lrows'))) do
    if peers[holder(id)] then table.insert(ids, id) end
  end
  return ids
end
-- lease id, row, lease id, row, ... as the client sends them: one msgpack argument ('' for none)
-- instead of two per row, which cost the client more to encode than the script to run
local function held_arg(s)
  if s == '' then return {} end
  return cmsgpack.unpack(s)
end
-- rows come off the leases `peer` holds them under; held: lease id, row, lease id, row, ... Changes
-- nothing and answers an error naming the row unless peer holds every row under the lease named
-- with it (a repeated row counts once).
local function take(j, peer, held)
  local leases, order = {}, {}
  for i = 1, #held, 2 do
    local id, r = held[i], held[i + 1]
    local l = leases[id]
    if l == nil then
      l = false
      local v = holder(id) == peer and redis.call('HGET', c(j, 'lrows'), id)
      if v then
        l = {}
        for _, x in ipairs(cmsgpack.unpack(v)) do l[x] = 1 end
      end
      leases[id] = l
      table.insert(order, id)
    end
    if not l or not l[r] then return {'err', 'lease', r} end
    l[r] = 0
  end
  for _, id in ipairs(order) do
    local left = {}
    for x, v in pairs(leases[id]) do if v == 1 then table.insert(left, x) end end
    if #left == 0 then
      redis.call('HDEL', c(j, 'lrows'), id)
      redis.call('ZREM', c(j, 'lease'), id)
    else
      redis.call('HSET', c(j, 'lrows'), id, cmsgpack.pack(left))
    end
  end
  return nil
end

-- rows (off their leases) go back to consumer j's pending (and ready) set
local function give_back(j, rows, redelivered)
  if #rows == 0 then return end
  local m = cmask(j)
  local pend, ready = {}, {}
  local metas = getrows(rows)
  for i, r in ipairs(rows) do
    local row = metas[i]
    if row then
      table.insert(pend, r); table.insert(pend, r)
      if has(row[5], m) then table.insert(ready, r); table.insert(ready, r) end
    end
  end
  bulk('ZADD', c(j, 'pend'), pend)
  bulk('ZADD', c(j, 'ready'), ready)
  if redelivered then redis.call('HINCRBY', c(j, 'n'), 'redelivered', #rows) end
  notify('ev')
end

-- cells rows no longer refer to: `counts` maps "<chunk>:<b>" to how many; a chunk whose last
-- referring row let go is deleted whole
local function release_cells(counts)
  for ref, n in pairs(counts) do
    if redis.call('HINCRBY', k('xc'), ref, -n) <= 0 then
      redis.call('HDEL', k('xc'), ref)
      redis.call('UNLINK', k('x:' .. ref))  -- freed off the server's main thread
    end
  end
end
-- row meta m lets go of its cells of the fields in `mask` (counted into `counts`)
local function forget_cells(counts, m, mask)
  for b = 0, #m - 9 do
    if bit.band(mask, 2 ^ b) ~= 0 and m[9 + b] ~= '' then
      local ref = string.match(m[9 + b], '^(.*):%d+$') .. ':' .. b
      counts[ref] = (counts[ref] or 0) + 1
      m[9 + b] = ''
    end
  end
end

-- a put's chunk: accepted (its keys persist, rows refer to them) or refused (deleted)
local function chunk_keys(chunk, bits)
  local keys = {}
  for _, b in ipairs(bits) do table.insert(keys, k('x:' .. chunk .. ':' .. b)) end
  return keys
end
local function refuse(chunk, bits, reply)
  redis.call('DEL', unpack(chunk_keys(chunk, bits)))
  return reply
end
local function accept(chunk, bits, metas)
  for _, key in ipairs(chunk_keys(chunk, bits)) do redis.call('PERSIST', key) end
  for _, b in ipairs(bits) do
    redis.call('HSET', k('xc'), chunk .. ':' .. b, #metas)
    for i, m in ipairs(metas) do m[9 + b] = chunk .. ':' .. (i - 1) end
  end
end

-- forget rows every consumer is done with: metadata, cells, version index
-- live rows lacking field b change by delta[b]
local function missing(delta)
  for b, n in pairs(delta) do if n ~= 0 then redis.call('HINCRBY', k('missing'), b, n) end end
end
local function lacking(delta, m, nf, sign)  -- count the fields row meta m lacks into delta
  for b = 0, nf - 1 do
    if bit.band(m[5], 2 ^ b) == 0 then delta[b] = (delta[b] or 0) + sign end
  end
end

local function free(rows, metas)
  if #rows == 0 then return end
  local counts, delta, nf = {}, {}, tonumber(meta('nf'))
  for _, m in ipairs(metas) do
    lacking(delta, m, nf, -1)
    forget_cells(counts, m, 2 ^ 31 - 1)
  end
  missing(delta)
  release_cells(counts)
  bulk('HDEL', k('rows'), rows)
  bulk('HDEL', k('acked'), rows)
  bulk('ZREM', k('ver'), rows)
  redis.call('HINCRBY', k('meta'), 'live', -#rows)
  redis.call('HINCRBY', k('meta'), 'freed', #rows)
  notify('space')
end

-- the bits of the consumers that acked each row (false: the row is gone)
local function acked_bits(rows)
  local out = {}
  local s = 1
  while s <= #rows do
    local e = math.min(s + 4999, #rows)
    for _, v in ipairs(redis.call('HMGET', k('acked'), unpack(rows, s, e))) do
      table.insert(out, v and tonumber(v) or false)
    end
    s = e + 1
  end
  return out
end

-- consumer j is done with rows (acked or dropped as stale); acked: their acked_bits
local function done(j, rows, acked)
  local all = 2 ^ nconsumers() - 1
  local gone, kept = {}, {}
  for i, r in ipairs(rows) do
    local a = bit.bor(acked[i], 2 ^ j)
    if a == all then table.insert(gone, r) else table.insert(kept, r); table.insert(kept, a) end
  end
  bulk('HSET', k('acked'), kept)
  free(gone, getrows(gone))
end

-- consumer j acks rows held by peer; held: lease id, row, ... (a row j already acked is skipped)
local function do_ack(j, peer, held)
  local bitj = 2 ^ j
  local rows, seen = {}, {}
  for i = 2, #held, 2 do rows[i / 2] = held[i] end
  local acked = acked_bits(rows)
  local live, livea, liveheld = {}, {}, {}
  for i, r in ipairs(rows) do
    local a = acked[i]
    if a and bit.band(a, bitj) == 0 and not seen[r] then
      seen[r] = true
      table.insert(live, r); table.insert(livea, a)
      table.insert(liveheld, held[2 * i - 1]); table.insert(liveheld, r)
    end
  end
  local e = take(j, peer, liveheld)
  if e then return e end
  done(j, live, livea)
  if #live > 0 then redis.call('HINCRBY', c(j, 'n'), 'acked', #live) end
  if meta('sealed') == '1' then notify('ev') end
  return nil
end

local function register(name)
  if consumer_bit(name) then return nil end
  local j = nconsumers()
  if j >= 31 then return {'err', 'consumers', j} end
  redis.call('HSET', k('cons'), name, j)
  redis.call('HSET', k('meta'), 'nc', j + 1)
  local pend = {}
  for _, r in ipairs(redis.call('HKEYS', k('rows'))) do table.insert(pend, r); table.insert(pend, r) end
  bulk('ZADD', c(j, 'pend'), pend)
  return nil
end
"""

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
    'next_group', 0, 'created', 0, 'freed', 0, 'put_waits', 0, 'sealed', 0, 'live', 0, 'nc', 0, 'nf', nf)
  for i = 1, nf do redis.call('HSET', k('bits'), ARGV[8 + i], i - 1) end
  redis.call('SADD', ARGV[6], ARGV[7])
end
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
return register(ARGV[2]) or {'ok'}
"""

# ARGV: B, put id, chunk, n, group_size, version|'', first try 0|1, nf, bits..., lengths[n], nbytes[n]
# (the cells are already in the chunk's keys, written in the same transaction)
PUT_NEW = r"""
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
for i = 1, nf do mask = bit.bor(mask, 2 ^ bits[i]) end
local version = tonumber(ARGV[6]) or -1
local versioned = 0
if version >= 0 then versioned = mask end
local at = 9 + nf
local rows, ver, pend, metas, acked = {}, {}, {}, {}, {}
local nfs = tonumber(meta('nf'))
for i = 1, n do
  local r = first + i - 1
  rows[i] = r
  metas[i] = {g0 + math.floor((i - 1) / gs), gs, tonumber(ARGV[at + i - 1]), version, mask, versioned, 0,
    tonumber(ARGV[at + n + i - 1])}
  for b = 0, nfs - 1 do metas[i][9 + b] = '' end
  table.insert(pend, r); table.insert(pend, r)
  table.insert(acked, r); table.insert(acked, 0)
  if version >= 0 then table.insert(ver, version); table.insert(ver, r) end
end
accept(chunk, bits, metas)
setrows(rows, metas)
bulk('HSET', k('acked'), acked)
local delta = {}
for b = 0, nfs - 1 do if bit.band(mask, 2 ^ b) == 0 then delta[b] = n end end
missing(delta)
bulk('ZADD', k('ver'), ver)
for j = 0, nconsumers() - 1 do
  bulk('ZADD', c(j, 'pend'), pend)
  if has(mask, cmask(j)) then bulk('ZADD', c(j, 'ready'), pend) end
end
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

# ARGV: B, '-', chunk, n, version|'', nf, bits..., rows[n], lengths[n], nbytes[n] (cells: as PUT_NEW)
PUT_FILL = r"""
local chunk, n, nf = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6])
local version = tonumber(ARGV[5])
local mask, bits = 0, {}
for i = 1, nf do bits[i] = tonumber(ARGV[6 + i]); mask = bit.bor(mask, 2 ^ bits[i]) end
if redis.call('EXISTS', k('meta')) == 0 then return refuse(chunk, bits, {'err', 'unknown'}) end
local at = 7 + nf
local rows = {}
for i = 1, n do rows[i] = ARGV[at + i - 1] end
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
  m[3] = m[3] + tonumber(ARGV[at + n + i - 1])
  m[8] = m[8] + tonumber(ARGV[at + 2 * n + i - 1])
end
accept(chunk, bits, metas)
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
      if has(metas[i][5], cm) and redis.call('ZSCORE', c(j, 'pend'), rows[i]) then
        table.insert(ready, rows[i]); table.insert(ready, rows[i])
      end
    end
    bulk('ZADD', c(j, 'ready'), ready)
  end
end
notify('ev')
return {'ok'}
"""

# ARGV: B, consumer, peer, mask, batch_size, lease_ms, v_min|'', mode seq|cand|rows, partial 0|1,
#       alive_ms, wait_ms|'', nread, read bits..., acks (held_arg), nrows, rows...
GET = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
local peer, mask, bs = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local mode, partial = ARGV[8], ARGV[9] == '1'
local nread = tonumber(ARGV[12])
local at = 13 + nread
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
-- the consumer asks for other fields than last time: rebuild its ready set
if cmask(j) ~= mask then
  redis.call('HSET', k('meta'), 'mask' .. j, mask)
  redis.call('DEL', c(j, 'ready'))
  local complete = true  -- no live row lacks a field of the mask: every pending row is ready
  for b = 0, tonumber(meta('nf')) - 1 do
    if bit.band(mask, 2 ^ b) ~= 0 and tonumber(redis.call('HGET', k('missing'), b) or 0) > 0 then
      complete = false
    end
  end
  if complete then
    redis.call('COPY', c(j, 'pend'), c(j, 'ready'))
  else
    local ready, pend = {}, redis.call('ZRANGE', c(j, 'pend'), 0, -1)
    for i, m in ipairs(getrows(pend)) do
      if has(m[5], mask) then table.insert(ready, pend[i]); table.insert(ready, pend[i]) end
    end
    bulk('ZADD', c(j, 'ready'), ready)
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
      bulk('ZREM', c(j, 'pend'), stale)
      redis.call('HINCRBY', c(j, 'n'), 'dropped_stale', #stale)
      done(j, stale, acked_bits(stale))
    else
      local nc = nconsumers()
      local counts, delta = {}, {}
      for _, r in ipairs(stale) do
        local m = getrow(r)
        for b = 0, 30 do if bit.band(m[6], 2 ^ b) ~= 0 then delta[b] = (delta[b] or 0) + 1 end end
        forget_cells(counts, m, m[6])
        m[5] = bit.band(m[5], bit.bnot(m[6]))
        m[4], m[6] = -1, 0
        local acked = acked_bits({r})[1]
        redis.call('HSET', k('acked'), r, 0)
        for o = 0, nc - 1 do
          local om = cmask(o)
          if bit.band(acked, 2 ^ o) ~= 0 then
            redis.call('ZADD', c(o, 'pend'), r, r)
            if has(m[5], om) then redis.call('ZADD', c(o, 'ready'), r, r) end
          elseif not has(m[5], om) then
            redis.call('ZREM', c(o, 'ready'), r)
          end
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
local nready, npend = redis.call('ZCARD', c(j, 'ready')), redis.call('ZCARD', c(j, 'pend'))
local drained = meta('sealed') == '1' and nready == npend

local function lease(rows)
  local deadline = now + tonumber(ARGV[6])
  bulk('ZREM', c(j, 'pend'), rows)
  bulk('ZREM', c(j, 'ready'), rows)
  local groups, versions, lengths = {}, {}, {}
  local metas = getrows(rows)
  for i, m in ipairs(metas) do groups[i], versions[i], lengths[i] = m[1], m[4], m[3] end
  local id = new_lease(j, peer, rows, deadline)
  if #rows > 0 then redis.call('HINCRBY', c(j, 'n'), 'delivered', #rows) end
  if ARGV[11] ~= '' then
    redis.call('HINCRBY', c(j, 'n'), 'waits', 1)
    redis.call('HINCRBYFLOAT', c(j, 'n'), 'wait_s', tonumber(ARGV[11]) / 1000)
  end
  local out = {'ok', rows, groups, versions, lengths, id}
  for i = 1, nread do  -- where the cells are: the client reads them with plain HMGETs
    local b, refs = tonumber(ARGV[12 + i]), {}
    for n, m in ipairs(metas) do refs[n] = m[9 + b] end
    table.insert(out, refs)
  end
  return out
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
  if #rows == bs or (#rows > 0 and (drained or partial)) then return lease(rows) end
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
return do_ack(j, ARGV[3], held_arg(ARGV[4])) or {'ok'}
"""

# ARGV: B, consumer, peer, lease_ms (renew) or 'release', alive_ms, held (held_arg)
# renew answers the id of the one new lease the rows are now held under
LEASES = r"""
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
local held = held_arg(ARGV[6])
local e = take(j, ARGV[3], held)
if e then return e end
local rows, seen = {}, {}
for i = 2, #held, 2 do
  if not seen[held[i]] then seen[held[i]] = true; table.insert(rows, held[i]) end
end
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
local keys = {k('meta'), k('bits'), k('cons'), k('rows'), k('ver'), k('alive'), k('puts'), k('putrow'),
  k('xc'), k('missing'), k('acked')}
for _, ref in ipairs(redis.call('HKEYS', k('xc'))) do redis.call('DEL', k('x:' .. ref)) end
for j = 0, nconsumers() - 1 do
  for _, s in ipairs({'pend', 'ready', 'lease', 'lrows', 'n'}) do table.insert(keys, c(j, s)) end
end
redis.call('DEL', unpack(keys))
redis.call('SREM', ARGV[2], ARGV[3])
notify('ev'); notify('space')
redis.call('PEXPIRE', k('ev'), 60000)
redis.call('PEXPIRE', k('space'), 60000)
return {'ok'}
"""

# ARGV: B. Everything a snapshot or the stats need, read in one atomic step.
SNAPSHOT = r"""
local function leased(j)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', c(j, 'lrows'))) do n = n + #cmsgpack.unpack(v) end
  return n
end
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local out = {redis.call('HGETALL', k('meta')), redis.call('HGETALL', k('cons')),
  redis.call('HGETALL', k('rows'))}
local counts = {}
for j = 0, nconsumers() - 1 do
  table.insert(counts, {redis.call('ZCARD', c(j, 'pend')), redis.call('ZCARD', c(j, 'ready')),
    leased(j), redis.call('HGETALL', c(j, 'n'))})
end
table.insert(out, counts)
table.insert(out, redis.call('HGETALL', k('acked')))
if ARGV[2] == '1' then
  local rows = out[3]
  local metas = {}
  for i = 2, #rows, 2 do metas[i / 2] = cmsgpack.unpack(rows[i]) end
  for b = 0, tonumber(meta('nf')) - 1 do
    local cells = {}
    for i, m in ipairs(metas) do
      if m[9 + b] ~= '' then
        local chunk, idx = string.match(m[9 + b], '^(.*):(%d+)$')
        table.insert(cells, rows[2 * i - 1])
        table.insert(cells, redis.call('HGET', k('x:' .. chunk .. ':' .. b), idx))
      end
    end
    table.insert(out, cells)
  end
end
return out
"""

# ARGV: B, registry key, partition, schema, capacity, stale, next_row, next_group, created, sealed, nf,
#       fields..., nc, consumers..., then rows: id, packed meta pairs
RESTORE = r"""
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
local rows, ver, cells, delta = {}, {}, {}, {}
for i = at, #ARGV, 2 do
  local r, m = ARGV[i], cmsgpack.unpack(ARGV[i + 1])
  lacking(delta, m, nf, 1)
  redis.call('HSET', k('acked'), r, m[7])
  local acked = m[7]
  m[7] = 0
  for b = 0, nf - 1 do  -- the client wrote the cells to chunk 'restore', indexed by row
    m[9 + b] = ''
    if bit.band(m[5], 2 ^ b) ~= 0 then
      m[9 + b] = 'restore:' .. r
      cells[b] = (cells[b] or 0) + 1
    end
  end
  redis.call('HSET', k('rows'), r, cmsgpack.pack(m))
  table.insert(rows, r)
  if m[4] >= 0 then table.insert(ver, m[4]); table.insert(ver, r) end
  for j = 0, nc - 1 do
    if bit.band(acked, 2 ^ j) == 0 then redis.call('ZADD', c(j, 'pend'), r, r) end
  end
end
for b, n in pairs(cells) do redis.call('HSET', k('xc'), 'restore:' .. b, n) end
missing(delta)
bulk('ZADD', k('ver'), ver)
redis.call('HSET', k('meta'), 'live', #rows)
redis.call('SADD', ARGV[2], ARGV[3])
return {'ok', #rows}
"""
