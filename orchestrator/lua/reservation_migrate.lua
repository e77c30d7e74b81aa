-- reservation_migrate: rewrite one open reservation of the first ledger layout (member = id, data in a hash) as a
-- member "id|amount|day|agent" with the same lease. Idempotent: the old member and its data are gone afterwards.
-- KEYS[1] reservations (zset)  KEYS[2] the old reservation-data hash
-- ARGV[1] reservation id
-- Returns 1 rewritten, 0 nothing to do.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
local data = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if not score or not data then return 0 end
redis.call('ZADD', KEYS[1], score, ARGV[1] .. '|' .. data)
return 1
