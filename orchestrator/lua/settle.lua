-- settle: replace a reservation by what the call really used (0 to release it unbilled). Idempotent: a reservation
-- settles or is released once; a later call finds nothing and returns {0}.
-- KEYS[1] reservations (zset)  KEYS[2] this reservation (hash)  KEYS[3] its day's reserved  KEYS[4] its agent's
-- reserved  KEYS[5] day used  KEYS[6] agent used  KEYS[7] day cost (micro-dollars)
-- ARGV[1] reservation id  ARGV[2] tokens used  ARGV[3] cost (micro-dollars)  ARGV[4] day keys' ttl
-- Returns {1, agent used, day used} so the caller checks thresholds without another round trip.
local amount = tonumber(redis.call('HGET', KEYS[2], 'amount') or '-1')
if amount < 0 then return {0} end
redis.call('DECRBY', KEYS[3], amount)
redis.call('DECRBY', KEYS[4], amount)
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
local used = tonumber(ARGV[2])
if used > 0 then
  redis.call('INCRBY', KEYS[5], used)
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[4]))
  redis.call('INCRBY', KEYS[6], used)
  redis.call('INCRBY', KEYS[7], tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[7], tonumber(ARGV[4]))
end
local agent_used = tonumber(redis.call('GET', KEYS[6]) or '0')
local day_used = tonumber(redis.call('GET', KEYS[5]) or '0')
return {1, agent_used, day_used}
