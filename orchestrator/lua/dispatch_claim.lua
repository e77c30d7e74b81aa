-- dispatch_claim: take the agents whose run message is overdue (their sender died, or the broker refused it), and
-- push each one's score to the next retry time, so concurrent sweepers never send the same one at once.
-- KEYS[1] dispatch
-- ARGV[1] now (epoch s)  ARGV[2] next retry score  ARGV[3] at most this many
-- Returns the agent ids claimed (each now scored ARGV[2]).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
