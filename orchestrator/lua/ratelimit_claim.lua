-- ratelimit_claim: once the pause is over, exactly one agent may probe the model.
-- KEYS[1] rate-limit hash  KEYS[2] probe claim
-- ARGV[1] probe token  ARGV[2] now  ARGV[3] claim ttl (ms)
-- Returns 'probe' (this caller probes), 'busy' (another does), or the pause's end while still paused.
local cur = tonumber(redis.call('HGET', KEYS[1], 'until') or '0') or 0
if cur > tonumber(ARGV[2]) then return tostring(cur) end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[3]) then return 'probe' end
return 'busy'
