-- ARGV: B, consumer, peer, lease_ms (renew) or 'release', alive_ms, held (held_arg)
-- renew answers the id of the one new lease the rows are now held under
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
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
