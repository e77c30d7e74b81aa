-- killswitch_engage: engage the fleet-wide stop unless it is engaged already (the first reason and time stay).
-- KEYS[1] killswitch (hash)  KEYS[2] this engagement's stop timings (zset, cleared on a first engage)
-- ARGV[1] reason  ARGV[2] engaged at (ISO)  ARGV[3] by  ARGV[4] engaged at (epoch s)
-- Returns 1 if this call engaged it, 0 if it already was.
if redis.call('HGET', KEYS[1], 'engaged') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'engaged', '1', 'reason', ARGV[1], 'engaged_at', ARGV[2], 'by', ARGV[3],
           'engaged_ts', ARGV[4])
redis.call('DEL', KEYS[2])
return 1
