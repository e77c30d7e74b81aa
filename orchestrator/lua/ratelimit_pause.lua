-- ratelimit_pause: extend the fleet-wide pause of one model (never shorten it), drop the caller's probe claim,
-- and tell every running agent at once on the stop channel.
-- KEYS[1] rate-limit hash  KEYS[2] probe claim
-- ARGV[1] until (epoch s)  ARGV[2] status  ARGV[3] reason  ARGV[4] probe token or ''  ARGV[5] channel  ARGV[6] model
-- ARGV[7] hash ttl
-- Returns the pause's end (as a string).
local cur = tonumber(redis.call('HGET', KEYS[1], 'until') or '0') or 0
local new = tonumber(ARGV[1])
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
if new > cur then
  redis.call('HSET', KEYS[1], 'until', ARGV[1], 'status', ARGV[2], 'reason', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('PUBLISH', ARGV[5], cjson.encode({pause = ARGV[6], ['until'] = new, status = tonumber(ARGV[2])}))
  return ARGV[1]
end
return tostring(cur)
