-- create: register a new agent for a coordinator task_id, unless that task_id already has one.
-- The new agent is queued and put in the dispatch index, so a run message is sent even if the sender dies
-- before it could send one (the health sweep sends what is still there after the dispatch grace).
-- KEYS[1] task index   KEYS[2] record   KEYS[3] all agents (zset)   KEYS[4] active (set)   KEYS[5] dispatch (zset)
-- ARGV[1] agent id     ARGV[2] created at (epoch s)   ARGV[3] dispatch score   ARGV[4..] record field, value pairs
-- Returns {1, agent id} when created, {0, existing agent id} when the task_id already has an agent.
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
return {1, ARGV[1]}
