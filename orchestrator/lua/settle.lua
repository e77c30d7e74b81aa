-- settle: replace a reservation by what the call really used (0 to release it unbilled). Idempotent: a reservation
-- settles or is released once; a later call finds nothing and returns {0}.
-- KEYS[1] reservations (zset)  KEYS[2] reservation data (hash)  KEYS[3] its day's reserved  KEYS[4] its agent's
-- reserved  KEYS[5] day used  KEYS[6] agent used  KEYS[7] day cost (micro-dollars)
-- ARGV[1] reservation id  ARGV[2] tokens used  ARGV[3] cost (micro-dollars)
-- Returns {1, agent used, day used} so the caller checks thresholds without another round trip.
local data = redis.call('HGET', KEYS[2], ARGV[1])
if not data then return {0} end
local amount = tonumber(string.match(data, '^(%d+)'))
redis.call('DECRBY', KEYS[3], amount)
redis.call('DECRBY', KEYS[4], amount)
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
local used = tonumber(ARGV[2])
if used > 0 then
  local day_used = redis.call('INCRBY', KEYS[5], used)
  local agent_used = redis.call('INCRBY', KEYS[6], used)
  redis.call('INCRBY', KEYS[7], tonumber(ARGV[3]))
  return {1, agent_used, day_used}
end
local v = redis.call('MGET', KEYS[6], KEYS[5])
return {1, tonumber(v[1] or '0'), tonumber(v[2] or '0')}
