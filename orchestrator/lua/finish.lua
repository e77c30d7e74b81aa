-- finish: a live agent -> its final status, in one step: result and record fields, every index cleared, the lease
-- and a pending stop dropped, the finished counter, the callback put in the outbox, an event, and every per-agent
-- key given the record's TTL, so nothing of the agent outlives its record. The run's fencing token dies with it.
-- KEYS[1] record  KEYS[2] lease  KEYS[3] fence  KEYS[4] active  KEYS[5] heartbeats  KEYS[6] deadlines
-- KEYS[7] slots  KEYS[8] waiting  KEYS[9] held  KEYS[10] dispatch  KEYS[11] stop request  KEYS[12] stats
-- KEYS[13] outbox  KEYS[14] outbox item  KEYS[15] events  KEYS[16..] other per-agent keys that expire with the
-- record (checkpoint, task index, usage counters)
-- ARGV[1] fencing token ('' when no run owns the agent)  ARGV[2] agent id  ARGV[3] ttl seconds  ARGV[4] status
-- ARGV[5] outbox item JSON or ''  ARGV[6] outbox due score  ARGV[7] outbox member  ARGV[8] event JSON
-- ARGV[9..] record field, value pairs
-- Returns 1 finished, 0 stale token, -1 a run holds the lease (an unfenced finish may not overrule it),
-- 2 already final, 3 no record.
--#include fence
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 3 end
if state ~= '"queued"' and state ~= '"running"' and state ~= '"held"' and state ~= '"recovering"' then return 2 end
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
next_token(KEYS[3])
redis.call('SREM', KEYS[4], ARGV[2])
for i = 5, 10 do redis.call('ZREM', KEYS[i], ARGV[2]) end
redis.call('DEL', KEYS[2], KEYS[11])
redis.call('HINCRBY', KEYS[12], 'finished:' .. ARGV[4], 1)
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[14], ARGV[5], 'EX', ARGV[3])
  redis.call('ZADD', KEYS[13], ARGV[6], ARGV[7])
end
redis.call('RPUSH', KEYS[15], ARGV[8])
redis.call('LTRIM', KEYS[15], -500, -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
for i = 15, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
return 1
