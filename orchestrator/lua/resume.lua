-- resume: a stopped agent (killed, failed, timed out, out of budget) or a held one -> queued, with a fresh
-- duration window; every per-agent key is made permanent again, a pending stop is dropped, and the agent is put
-- in the dispatch index.
-- KEYS[1] record  KEYS[2] active  KEYS[3] held  KEYS[4] dispatch  KEYS[5] stop request  KEYS[6] lease
-- KEYS[7] events  KEYS[8..] other per-agent keys to keep (fence, checkpoint, task index, usage counters)
-- ARGV[1] agent id  ARGV[2] dispatch score  ARGV[3] event JSON  ARGV[4..] states that may resume (JSON strings)
-- Returns {1, previous state} resumed, or {0, state} refused.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, 'null'} end
local allowed = false
for i = 4, #ARGV do
  if state == ARGV[i] then allowed = true end
end
if (not allowed) or redis.call('EXISTS', KEYS[6]) == 1 then return {0, state} end
redis.call('HSET', KEYS[1], 'state', '"queued"', 'finished_at', 'null', 'error', 'null', 'result', 'null',
           'window_start', 'null', 'stuck', 'null')
redis.call('PERSIST', KEYS[1])
for i = 7, #KEYS do redis.call('PERSIST', KEYS[i]) end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[5])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('RPUSH', KEYS[7], ARGV[3])
redis.call('LTRIM', KEYS[7], -500, -1)
return {1, state}
