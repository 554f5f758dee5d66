-- ARGV: B, consumer
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
return register(ARGV[2]) or {'ok'}
