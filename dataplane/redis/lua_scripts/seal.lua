-- ARGV: B
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
redis.call('HSET', k('meta'), 'sealed', 1)
notify('ev')
return {'ok'}
