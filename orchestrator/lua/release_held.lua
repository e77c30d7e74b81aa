-- release_held: the killswitch is released with --resume: one held agent -> queued, put in the dispatch index.
-- KEYS[1] record  KEYS[2] held  KEYS[3] dispatch
-- ARGV[1] agent id  ARGV[2] dispatch score
-- Returns 1 if the agent was held.
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'state') == '"held"' then redis.call('HSET', KEYS[1], 'state', '"queued"') end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
