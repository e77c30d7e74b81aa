-- forget_task: drop a task index entry whose agent record is gone, so the task_id is free again.
-- KEYS[1] task index
-- ARGV[1] the agent id it must still point at
-- Returns 1 if dropped.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
