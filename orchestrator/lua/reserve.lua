-- reserve: set tokens aside for one model call, against the day's and the agent's headroom at once. In hard mode a
-- call that cannot fit is refused (and the exhausted flags set); max_tokens comes back lowered to the headroom.
-- A run's progress (checkpoint and snapshot, fenced) may ride along: it is written first, refused or not, so the
-- loop's checkpoint after a turn's tools costs no round trip of its own. A stale token writes nothing at all.
-- The reservation is a member of the reservations zset, scored by its lease: "id|amount|day|agent", so settling,
-- renewing and expiring it needs no other key.
-- KEYS[1] day ledger  KEYS[2] agent ledger  KEYS[3] reservations (zset)  KEYS[4] day's agents (set)
-- KEYS[5] day exhausted flag  KEYS[6] agent exhausted flag  KEYS[7] fence  KEYS[8] checkpoint  KEYS[9] snapshot
-- ARGV[1] reservation id  ARGV[2] input bound  ARGV[3] max output  ARGV[4] min output worth a call
-- ARGV[5] daily limit  ARGV[6] agent limit  ARGV[7] '1' hard mode  ARGV[8] lease until  ARGV[9] agent id
-- ARGV[10] day  ARGV[11] day keys' ttl  ARGV[12] '1' register the agent in the day's agents
-- ARGV[13] fencing token ('' unfenced)  ARGV[14] checkpoint JSON or '' (fence check only)  ARGV[15] snapshot or ''
-- Returns {1, max output granted, headroom, member} or {0, 0, headroom} when refused; {-1} stale token.
--#include ledger
local v = redis.call('MGET', KEYS[1], KEYS[2], KEYS[7])
if save_progress(v[3], ARGV[13], KEYS[8], ARGV[14], KEYS[9], ARGV[15]) == 0 then return {-1} end
local day = fields(v[1], 3)
local agent = fields(v[2], 2)
local input_bound = tonumber(ARGV[2])
local max_out = tonumber(ARGV[3])
local min_out = tonumber(ARGV[4])
local ttl = tonumber(ARGV[11])
local day_room = tonumber(ARGV[5]) - day[1] - day[2]
local agent_room = tonumber(ARGV[6]) - agent[1] - agent[2]
local headroom = math.min(day_room, agent_room)
local out = max_out
if ARGV[7] == '1' then
  if headroom < input_bound + min_out then
    if day[1] + input_bound + min_out > tonumber(ARGV[5]) then
      redis.call('SET', KEYS[5], '1', 'EX', ttl)
    end
    if agent[1] + input_bound + min_out > tonumber(ARGV[6]) then
      redis.call('SET', KEYS[6], '1')
    end
    return {0, 0, headroom}
  end
  out = math.min(max_out, headroom - input_bound)
end
local amount = input_bound + out
local member = ARGV[1] .. '|' .. int(amount) .. '|' .. ARGV[10] .. '|' .. ARGV[9]
put(KEYS[1], v[1], int(day[1]) .. '|' .. int(day[2] + amount) .. '|' .. int(day[3]), ttl)
put(KEYS[2], v[2], int(agent[1]) .. '|' .. int(agent[2] + amount), 0)
redis.call('ZADD', KEYS[3], ARGV[8], member)
if ARGV[12] == '1' and redis.call('SADD', KEYS[4], ARGV[9]) == 1 then
  redis.call('EXPIRE', KEYS[4], ttl)
end
return {1, out, headroom, member}
