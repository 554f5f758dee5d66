-- The functions every script starts with (run as prelude .. script; dataplane/redis/scripts.py
-- has the key layout).
local B = ARGV[1]
local function k(s) return B .. ':' .. s end
local POW = {}  -- POW[b] = 2 ^ b, a table lookup instead of a pow() per test
for b = 0, 31 do POW[b] = 2 ^ b end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- the event streams: a script that answers a waiting state hands out the stream's last id (the
-- client blocks in XREAD after it) and marks the stream watched; the next change that may end the
-- wait appends an entry, and only a watched stream gets one (an XADD that trims cost 7-30 us, and
-- every ack that freed rows made one)
local function wake(s) redis.call('XADD', k(s), 'MAXLEN', '1', '*', 'e', '1') end
local function notify(s)
  if redis.call('HGET', k('meta'), 'watch_' .. s) ~= '0' then
    redis.call('HSET', k('meta'), 'watch_' .. s, 0)
    wake(s)
  end
end
local function last_id(s)
  redis.call('HSET', k('meta'), 'watch_' .. s, 1)
  local e = redis.call('XREVRANGE', k(s), '+', '-', 'COUNT', 1)
  if #e == 0 then return '0-0' end
  return e[1][1]
end
local function getrow(r)
  local v = redis.call('HGET', k('rows'), r)
  if not v then return nil end
  return cmsgpack.unpack(v)
end
-- a row's refs: its ready bits, then "<chunk>:<b>" for each field cell it has, space-separated; kept
-- beside its metadata (always written with it) so that freeing rows reads one short string per
-- row, and mostly the same one for all rows of a put, instead of unpacking each row's metadata
local function refkey(m)
  local parts = {m[5]}
  for b = 0, (#m - 8) / 3 - 1 do
    local chunk = m[9 + 3 * b]
    if chunk ~= '' then table.insert(parts, chunk .. ':' .. b) end
  end
  return table.concat(parts, ' ')
end
local function setrow(r, m)
  redis.call('HSET', k('rows'), r, cmsgpack.pack(m))
  redis.call('HSET', k('refs'), r, refkey(m))
end
local function bulk(cmd, key, args)
  local i = 1
  while i <= #args do
    local j = math.min(i + 999, #args)
    redis.call(cmd, key, unpack(args, i, j))
    i = j + 1
  end
end
-- HMGET of any number of fields (Lua's unpack takes a few thousand at most); false for a missing one
local function hmget(key, fields)
  if #fields == 0 then return {} end
  if #fields <= 5000 then return redis.call('HMGET', key, unpack(fields)) end
  local out = {}
  local s = 1
  while s <= #fields do
    local e = math.min(s + 4999, #fields)
    for _, v in ipairs(redis.call('HMGET', key, unpack(fields, s, e))) do table.insert(out, v) end
    s = e + 1
  end
  return out
end
-- the metadata of many rows in one HMGET (false for a row that is gone), and back in one HSET
local function getrows(rows)
  local out = {}
  for i, v in ipairs(hmget(k('rows'), rows)) do out[i] = v and cmsgpack.unpack(v) end
  return out
end
local function setrows(rows, metas, ref)  -- ref: the refs every row has, if known
  local kv, refs = {}, {}
  for i, r in ipairs(rows) do
    kv[2 * i - 1], kv[2 * i] = r, cmsgpack.pack(metas[i])
    refs[2 * i - 1], refs[2 * i] = r, ref or refkey(metas[i])
  end
  bulk('HSET', k('rows'), kv)
  bulk('HSET', k('refs'), refs)
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

-- leases: who holds one, a new one, the rows of ended ones. A lease's rows are one string, the
-- row numbers in the order it holds them, comma-separated: an ack of a whole lease compares it
-- with what the client sends, and a new lease is one table.concat
local function rows_of(s)
  local t = {}
  for r in string.gmatch(s, '[^,]+') do t[#t + 1] = r end
  return t
end
local function holder(id) return string.match(id, '^(.*)/%d+$') end
local function new_lease(j, peer, rows, deadline)
  if #rows == 0 then return '' end
  local id = peer .. '/' .. redis.call('HINCRBY', c(j, 'n'), 'leases', 1)
  redis.call('ZADD', c(j, 'lease'), deadline, id)
  redis.call('HSET', c(j, 'lrows'), id, table.concat(rows, ','))
  return id
end
local function end_leases(j, ids)
  local rows = {}
  for _, v in ipairs(hmget(c(j, 'lrows'), ids)) do
    if v then for r in string.gmatch(v, '[^,]+') do table.insert(rows, r) end end
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
-- lease id, its rows (comma-separated), lease id, its rows, ... as the client sends them: one
-- msgpack argument ('' for none)
local function held_arg(s)
  if s == '' then return {} end
  return cmsgpack.unpack(s)
end
-- rows come off the leases `peer` holds them under; held: lease id, rows, lease id, rows, ...
-- Answers the rows taken, a repeated one once. Rows peer does not hold under the lease named with
-- them are passed to excuse(rows) first: if it answers an error, that is answered and nothing
-- changes; else they are skipped.
local function take(j, peer, held, excuse)
  local id = held[1]
  -- mostly one whole lease, in the order it holds its rows
  if #held == 2 and holder(id) == peer and redis.call('HGET', c(j, 'lrows'), id) == held[2] then
    redis.call('HDEL', c(j, 'lrows'), id)
    redis.call('ZREM', c(j, 'lease'), id)
    return rows_of(held[2])
  end
  local leases, order, taken, missing = {}, {}, {}, {}
  for i = 1, #held, 2 do
    id = held[i]
    local l = leases[id]
    if l == nil then
      l = false
      local v = holder(id) == peer and redis.call('HGET', c(j, 'lrows'), id)
      if v then
        l = {rows = rows_of(v), held = {}}
        for _, x in ipairs(l.rows) do l.held[x] = 1 end
      end
      leases[id] = l
      table.insert(order, id)
    end
    for _, r in ipairs(rows_of(held[i + 1])) do
      if l and l.held[r] == 1 then
        l.held[r] = 0
        table.insert(taken, r)
      elseif not (l and l.held[r] == 0) then
        table.insert(missing, r)
      end
    end
  end
  if #missing > 0 then
    local e = excuse(missing)
    if e then return nil, e end
  end
  for _, lid in ipairs(order) do
    local l, left = leases[lid], {}
    for _, x in ipairs(l and l.rows or {}) do if l.held[x] == 1 then table.insert(left, x) end end
    if #left > 0 then
      redis.call('HSET', c(j, 'lrows'), lid, table.concat(left, ','))
    elseif l then
      redis.call('HDEL', c(j, 'lrows'), lid)
      redis.call('ZREM', c(j, 'lease'), lid)
    end
  end
  return taken
end
local function not_held(rows) return {'err', 'lease', rows[1]} end

-- acked bitmaps (several consumers only): 8 bytes per consumer and block of 64 rows
local BLOCK = 64
local function block_of(r)
  local n = tonumber(r)
  return math.floor(n / BLOCK), n % BLOCK
end
local function blocks(rows)  -- {block -> {index in it, ...}}, and the blocks in the order met
  local by, order = {}, {}
  for _, r in ipairs(rows) do
    local b, i = block_of(r)
    local g = by[b]
    if not g then g = {}; by[b] = g; table.insert(order, b) end
    table.insert(g, i)
  end
  return by, order
end
local function bitmap_fields(nc, b)  -- the :acked fields of block b, consumer 0 first
  local fields = {}
  for o = 0, nc - 1 do fields[o + 1] = o .. ':' .. b end
  return fields
end
local function bitmaps(nc, b)  -- maps[o + 1]: consumer o's bitmap of block b, as 8 byte values
  local maps = redis.call('HMGET', k('acked'), unpack(bitmap_fields(nc, b)))
  for o = 1, nc do
    if maps[o] then maps[o] = {string.byte(maps[o], 1, 8)} else maps[o] = {0, 0, 0, 0, 0, 0, 0, 0} end
  end
  return maps
end
local function save_bitmaps(b, maps)
  local kv = {}
  for o = 1, #maps do
    table.insert(kv, (o - 1) .. ':' .. b); table.insert(kv, string.char(unpack(maps[o])))
  end
  redis.call('HSET', k('acked'), unpack(kv))
end
local function flip(map, i, on)  -- bit i of a bitmap
  local at, v = math.floor(i / 8) + 1, POW[i % 8]
  if on then map[at] = bit.bor(map[at], v) else map[at] = bit.band(map[at], 255 - v) end
end
-- rows become live (sign 1) or are freed (-1): their blocks' counts of live rows; the bitmaps of a
-- block left with none are deleted
local function live_blocks(rows, sign, nc)
  local by, order = blocks(rows)
  for _, b in ipairs(order) do
    if redis.call('HINCRBY', k('blive'), b, sign * #by[b]) <= 0 then
      redis.call('HDEL', k('blive'), b)
      redis.call('HDEL', k('acked'), unpack(bitmap_fields(nc, b)))
    end
  end
end

-- consumer j waits for rows again: ready if it has their fields (metas: the rows' metadata)
local function wait_for(j, rows, metas)
  local m = cmask(j)
  local pend, ready = {}, {}
  for i, r in ipairs(rows) do
    local row = metas[i]
    if row then
      local to = has(row[5], m) and ready or pend
      table.insert(to, r); table.insert(to, r)
    end
  end
  bulk('ZADD', c(j, 'pend'), pend)
  bulk('ZADD', c(j, 'ready'), ready)
end

-- rows (off their leases) go back to consumer j's waiting rows
local function give_back(j, rows, redelivered)
  if #rows == 0 then return end
  wait_for(j, rows, getrows(rows))
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
  for b = 0, (#m - 8) / 3 - 1 do
    local at = 9 + 3 * b
    if m[at] ~= '' and bit.band(mask, POW[b]) ~= 0 then
      local ref = m[at] .. ':' .. b
      counts[ref] = (counts[ref] or 0) + 1
      m[at], m[at + 1], m[at + 2] = '', 0, 0
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
-- spans: per field (in the order of bits) the byte length of each row's cell, or one length
-- that every cell has (a dense field)
local function accept(chunk, bits, metas, spans)
  for _, key in ipairs(chunk_keys(chunk, bits)) do redis.call('PERSIST', key) end
  for f, b in ipairs(bits) do
    redis.call('HSET', k('xc'), chunk .. ':' .. b, #metas)
    local lengths, off = spans[f], 0
    for i, m in ipairs(metas) do
      local size = lengths[i] or lengths[1]
      m[9 + 3 * b], m[10 + 3 * b], m[11 + 3 * b] = chunk, off, size
      off = off + size
    end
  end
end

-- forget rows every consumer is done with: metadata, cells, version index
-- live rows lacking field b change by delta[b]
local function missing(delta)
  for b, n in pairs(delta) do if n ~= 0 then redis.call('HINCRBY', k('missing'), b, n) end end
end
local function lacking(delta, ready, nf, n)  -- n rows with field bits `ready`: what they lack, into delta
  if ready == POW[nf] - 1 then return end  -- they have them all
  for b = 0, nf - 1 do
    if bit.band(ready, POW[b]) == 0 then delta[b] = (delta[b] or 0) + n end
  end
end

local function free(rows)
  if #rows == 0 then return end
  local byref = {}
  for _, v in ipairs(hmget(k('refs'), rows)) do
    if v then byref[v] = (byref[v] or 0) + 1 end
  end
  local counts, delta, nf = {}, {}, tonumber(meta('nf'))
  for key, n in pairs(byref) do
    local ready = nil
    for tok in string.gmatch(key, '%S+') do
      if ready == nil then ready = tonumber(tok) else counts[tok] = (counts[tok] or 0) + n end
    end
    lacking(delta, ready, nf, -n)
  end
  missing(delta)
  release_cells(counts)
  bulk('HDEL', k('rows'), rows)
  bulk('HDEL', k('refs'), rows)
  local nc = nconsumers()
  if nc > 1 then live_blocks(rows, -1, nc) end
  if redis.call('EXISTS', k('ver')) == 1 then bulk('ZREM', k('ver'), rows) end  -- none: no versions
  redis.call('HINCRBY', k('meta'), 'live', -#rows)
  redis.call('HINCRBY', k('meta'), 'freed', #rows)
  notify('space')
end

-- the bits of the consumers done with each row (false: the row is gone)
local function acked_bits(rows)
  local live, nc = hmget(k('rows'), rows), nconsumers()
  local out, maps = {}, {}
  for i, r in ipairs(rows) do
    out[i] = live[i] and 0
    if live[i] and nc > 1 then
      local b, x = block_of(r)
      maps[b] = maps[b] or bitmaps(nc, b)
      for o = 1, nc do
        if bit.band(maps[b][o][math.floor(x / 8) + 1], POW[x % 8]) ~= 0 then out[i] = out[i] + POW[o - 1] end
      end
    end
  end
  return out
end
-- row r comes back to every consumer (regenerated): no one is done with it
local function unack(r)
  local nc = nconsumers()
  if nc == 1 then return end
  local b, x = block_of(r)
  local maps = bitmaps(nc, b)
  for o = 1, nc do flip(maps[o], x, false) end
  save_bitmaps(b, maps)
end

-- consumer j is done with live rows it has not acked yet (acked, or dropped as stale): a row every
-- consumer is done with is freed. With several consumers, one HMGET and one HSET per block of rows
local function done(j, rows)
  local nc = nconsumers()
  if nc == 1 then return free(rows) end
  local by, order = blocks(rows)
  local gone = {}
  for _, b in ipairs(order) do
    local maps = bitmaps(nc, b)
    local mine = maps[j + 1]
    for _, i in ipairs(by[b]) do  -- `flip` inlined here and below: the hot loop of every ack
      local at = math.floor(i / 8) + 1
      mine[at] = bit.bor(mine[at], POW[i % 8])
    end
    local all = {mine[1], mine[2], mine[3], mine[4], mine[5], mine[6], mine[7], mine[8]}
    for o = 1, nc do
      local m = maps[o]
      for at = 1, 8 do all[at] = bit.band(all[at], m[at]) end
    end
    for _, i in ipairs(by[b]) do
      local x = math.floor(i / 8) + 1
      if bit.band(all[x], POW[i % 8]) ~= 0 then table.insert(gone, tostring(BLOCK * b + i)) end
    end
    redis.call('HSET', k('acked'), j .. ':' .. b, string.char(unpack(mine)))
  end
  free(gone)
end

-- consumer j acks rows held by peer; held: lease id, row, ... A row peer holds is live and not
-- acked by j (a lease holds no other); one it does not hold is skipped if j acked it already (a
-- retried ack) or it is gone, and refused otherwise.
local function do_ack(j, peer, held)
  local rows, e = take(j, peer, held, function(missing)
    for i, a in ipairs(acked_bits(missing)) do
      if a and bit.band(a, POW[j]) == 0 then return {'err', 'lease', missing[i]} end
    end
  end)
  if not rows then return e end
  done(j, rows)
  if #rows > 0 then redis.call('HINCRBY', c(j, 'n'), 'acked', #rows) end
  if meta('sealed') == '1' then notify('ev') end
  return nil
end

local function register(name)
  if consumer_bit(name) then return nil end
  local j = nconsumers()
  if j >= 31 then return {'err', 'consumers', j} end
  redis.call('HSET', k('cons'), name, j)
  redis.call('HSET', k('meta'), 'nc', j + 1)
  local rows, pend = redis.call('HKEYS', k('rows')), {}
  for _, r in ipairs(rows) do table.insert(pend, r); table.insert(pend, r) end
  bulk('ZADD', c(j, 'pend'), pend)
  if j == 1 then live_blocks(rows, 1, 2) end  -- a second consumer: blocks count their live rows
  return nil
end
