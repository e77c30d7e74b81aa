-- dispatched: a run message was sent: drop the agent's dispatch entry if it is still the one it was sent for.
-- KEYS[1] dispatch
-- ARGV[1] agent id  ARGV[2] the score it was sent for
-- Returns 1 if dropped.
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
