-- hand_back: running -> recovering, by the run itself (warm shutdown). Lease, heartbeat, deadline and slot are
-- released, and the agent is put in the dispatch index: a message is sent now, or by the sweep if that fails.
-- A hand-back is not a recovery: nothing is counted. The run's fencing token dies with it.
-- KEYS[1] record  KEYS[2] lease  KEYS[3] fence  KEYS[4] heartbeats  KEYS[5] deadlines  KEYS[6] slots
-- KEYS[7] dispatch  KEYS[8] events
-- ARGV[1] fencing token  ARGV[2] holder  ARGV[3] agent id  ARGV[4] dispatch score  ARGV[5] event JSON
-- Returns 1, or 0 when the token is stale (or the agent is not running).
--#include fence
if redis.call('GET', KEYS[3]) ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= '"running"' then return 0 end
next_token(KEYS[3])
if redis.call('GET', KEYS[2]) == ARGV[2] .. '|' .. ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('HSET', KEYS[1], 'state', '"recovering"')
for i = 4, 6 do redis.call('ZREM', KEYS[i], ARGV[3]) end
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[3])
redis.call('RPUSH', KEYS[8], ARGV[5])
redis.call('LTRIM', KEYS[8], -500, -1)
return 1
