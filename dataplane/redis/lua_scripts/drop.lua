-- ARGV: B, registry key, partition
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
