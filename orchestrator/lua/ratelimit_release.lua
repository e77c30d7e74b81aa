-- ratelimit_release: drop a probe claim if it is still the caller's.
-- KEYS[1] probe claim
-- ARGV[1] probe token
-- Returns 1 if dropped.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
