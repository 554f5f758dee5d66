-- ARGV: B, consumer, peer, held (held_arg)
if redis.call('EXISTS', k('meta')) == 0 then return {'err', 'unknown'} end
local j = consumer_bit(ARGV[2])
if not j then return {'err', 'notreg', ARGV[2], redis.call('HKEYS', k('cons'))} end
return do_ack(j, ARGV[3], held_arg(ARGV[4])) or {'ok'}
