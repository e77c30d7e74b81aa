-- ratelimit_resume: the probe got through: end the pause (unless it was extended meanwhile) and announce it.
-- KEYS[1] rate-limit hash  KEYS[2] probe claim
-- ARGV[1] probe token  ARGV[2] now  ARGV[3] channel  ARGV[4] model
-- Returns 1 if the pause ended.
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
local cur = tonumber(redis.call('HGET', KEYS[1], 'until') or '0') or 0
if cur > tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[1], 'until', 'status', 'reason')
redis.call('PUBLISH', ARGV[3], cjson.encode({resume = ARGV[4]}))
return 1
