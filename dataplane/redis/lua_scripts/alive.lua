-- ARGV: B, peer, alive_ms ('0': the client closes: give its leases back now)
if redis.call('EXISTS', k('meta')) == 0 then return {'ok'} end
if ARGV[3] ~= '0' then
  redis.call('ZADD', k('alive'), now_ms() + tonumber(ARGV[3]), ARGV[2])
  return {'ok'}
end
for j = 0, nconsumers() - 1 do give_back(j, end_leases(j, leases_of(j, {[ARGV[2]] = true})), true) end
redis.call('ZREM', k('alive'), ARGV[2])
return {'ok'}
