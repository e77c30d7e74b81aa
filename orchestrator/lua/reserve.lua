-- reserve: set tokens aside for one model call, against the day's and the agent's headroom at once. In hard mode a
-- call that cannot fit is refused (and the exhausted flags set); max_tokens comes back lowered to the headroom.
-- The day's keys get their TTL when the day's first reservation of an agent creates them.
-- KEYS[1] day used  KEYS[2] day reserved  KEYS[3] agent used  KEYS[4] agent reserved  KEYS[5] reservations (zset)
-- KEYS[6] reservation data (hash)  KEYS[7] day's agents (set)  KEYS[8] day exhausted flag
-- KEYS[9] agent exhausted flag  KEYS[10] day cost
-- ARGV[1] reservation id  ARGV[2] input bound  ARGV[3] max output  ARGV[4] min output worth a call
-- ARGV[5] daily limit  ARGV[6] agent limit  ARGV[7] '1' hard mode  ARGV[8] lease until  ARGV[9] agent id
-- ARGV[10] day  ARGV[11] day keys' ttl
-- Returns {1, max output granted, headroom} or {0, 0, headroom} when refused.
local v = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local day_used = tonumber(v[1] or '0')
local day_res = tonumber(v[2] or '0')
local ag_used = tonumber(v[3] or '0')
local ag_res = tonumber(v[4] or '0')
local input_bound = tonumber(ARGV[2])
local max_out = tonumber(ARGV[3])
local min_out = tonumber(ARGV[4])
local day_room = tonumber(ARGV[5]) - day_used - day_res
local agent_room = tonumber(ARGV[6]) - ag_used - ag_res
local headroom = math.min(day_room, agent_room)
local out = max_out
if ARGV[7] == '1' then
  if headroom < input_bound + min_out then
    if day_used + input_bound + min_out > tonumber(ARGV[5]) then
      redis.call('SET', KEYS[8], '1', 'EX', tonumber(ARGV[11]))
    end
    if ag_used + input_bound + min_out > tonumber(ARGV[6]) then
      redis.call('SET', KEYS[9], '1')
    end
    return {0, 0, headroom}
  end
  out = math.min(max_out, headroom - input_bound)
end
local amount = input_bound + out
redis.call('INCRBY', KEYS[2], amount)
redis.call('INCRBY', KEYS[4], amount)
redis.call('HSET', KEYS[6], ARGV[1], amount .. '|' .. ARGV[10] .. '|' .. ARGV[9])
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[1])
if redis.call('SADD', KEYS[7], ARGV[9]) == 1 then
  local ttl = tonumber(ARGV[11])
  redis.call('EXPIRE', KEYS[7], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('SET', KEYS[1], '0', 'NX', 'EX', ttl)
  redis.call('SET', KEYS[10], '0', 'NX', 'EX', ttl)
end
return {1, out, headroom}
