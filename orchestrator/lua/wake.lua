-- wake: move waiting agents (highest priority first) into the dispatch index, one per free concurrency slot.
-- They stay queued; admit decides again when their message arrives.
-- KEYS[1] slots  KEYS[2] waiting  KEYS[3] dispatch
-- ARGV[1] now (epoch s)  ARGV[2] slot limit  ARGV[3] dispatch score
-- Returns the agent ids moved.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
if free <= 0 then return {} end
local popped = redis.call('ZPOPMIN', KEYS[2], free)
local ids = {}
for i = 1, #popped, 2 do
  redis.call('ZADD', KEYS[3], ARGV[3], popped[i])
  ids[#ids + 1] = popped[i]
end
return ids
