-- ARGV: B, schema, capacity, stale_policy, exist_ok, registry key, partition, nf, fields..., nc, consumers...
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
