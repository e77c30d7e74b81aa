-- recover: the health sweep's verb for a run presumed dead: running -> recovering, counted once, the old run fenced
-- out, the agent put in the dispatch index. Exclusive: a second sweeper finds the agent no longer running.
-- KEYS[1] record  KEYS[2] lease  KEYS[3] fence  KEYS[4] heartbeats  KEYS[5] deadlines  KEYS[6] slots
-- KEYS[7] dispatch  KEYS[8] events  KEYS[9] stats
-- ARGV[1] agent id  ARGV[2] stale before (epoch s)  ARGV[3] dispatch score  ARGV[4] event JSON
-- Returns {1, recoveries} recovered; {0} not running, not stale or already claimed; {-1, ms} its lease is still
-- live (the heartbeat is rescheduled to the moment the lease runs out).
--#include fence
local id = ARGV[1]
local state = redis.call('HGET', KEYS[1], 'state')
local hb = redis.call('ZSCORE', KEYS[4], id)
if state ~= '"running"' then
  if hb then redis.call('ZREM', KEYS[4], id) end
  return {0}
end
if (not hb) or tonumber(hb) > tonumber(ARGV[2]) then return {0} end
local pttl = redis.call('PTTL', KEYS[2])
if pttl > 0 then
  redis.call('ZADD', KEYS[4], tostring(tonumber(ARGV[2]) + pttl / 1000), id)
  return {-1, pttl}
end
next_token(KEYS[3])
redis.call('DEL', KEYS[2])
local n = (tonumber(redis.call('HGET', KEYS[1], 'recoveries') or '0') or 0) + 1
redis.call('HSET', KEYS[1], 'state', '"recovering"', 'recoveries', n)
for i = 4, 6 do redis.call('ZREM', KEYS[i], id) end
redis.call('ZADD', KEYS[7], ARGV[3], id)
redis.call('RPUSH', KEYS[8], ARGV[4])
redis.call('LTRIM', KEYS[8], -500, -1)
redis.call('HINCRBY', KEYS[9], 'recoveries', 1)
return {1, n}
