-- admit: the one door into `running`. Decides, atomically with the killswitch, a pending stop, the run lease and
-- the concurrency slots, what a delivery of an agent's run message may do:
--   started  queued|recovering|held -> running: new fencing token, lease, slot, heartbeat, deadline
--   held     the killswitch is engaged: -> held (held index); nothing runs
--   waiting  no free slot (hard mode): stays queued, parked in the waiting index until a slot frees
--   busy     another run holds the lease, or the agent is running: this delivery does nothing
--   final    the agent already finished: this delivery does nothing
--   stop     a kill is pending for an agent that never started: lease taken so the caller finishes it
--   give_up  recovered more often than allowed: lease taken so the caller fails it
-- For stop and give_up the dispatch entry stays (score pushed to ARGV[13]), so a caller that dies before it
-- finishes the agent leaves it to the sweep rather than stranded.
-- KEYS[1] record  KEYS[2] lease  KEYS[3] fence  KEYS[4] killswitch  KEYS[5] stop request  KEYS[6] slots
-- KEYS[7] waiting  KEYS[8] held  KEYS[9] dispatch  KEYS[10] heartbeats  KEYS[11] deadlines
-- ARGV[1] agent id  ARGV[2] holder  ARGV[3] lease ms  ARGV[4] now (epoch s)  ARGV[5] slot lease until
-- ARGV[6] slot limit  ARGV[7] '1': take a slot past the limit (soft mode)  ARGV[8] duration seconds
-- ARGV[9] worker (JSON)  ARGV[10] now (JSON ISO time)  ARGV[11] max recoveries  ARGV[12] waiting/held score
-- ARGV[13] dispatch retry score
-- Returns {outcome, fencing token, window start (string), over the slot limit (0/1)}
--#include fence
local id = ARGV[1]
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'unknown', 0, '0', 0} end
if state == '"running"' then return {'busy', 0, '0', 0} end
if state ~= '"queued"' and state ~= '"recovering"' and state ~= '"held"' then return {'final', 0, '0', 0} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'busy', 0, '0', 0} end
local started = redis.call('HGET', KEYS[1], 'started_at')
local never_started = (not started) or started == 'null'
local stop = redis.call('EXISTS', KEYS[5]) == 1
local recoveries = tonumber(redis.call('HGET', KEYS[1], 'recoveries') or '0') or 0
local outcome = 'started'
if stop and never_started then
  outcome = 'stop'
elseif recoveries > tonumber(ARGV[11]) then
  outcome = 'give_up'
elseif redis.call('HGET', KEYS[4], 'engaged') == '1' then
  redis.call('HSET', KEYS[1], 'state', '"held"')
  redis.call('ZADD', KEYS[8], ARGV[12], id)
  redis.call('ZREM', KEYS[7], id)
  redis.call('ZREM', KEYS[9], id)
  return {'held', 0, '0', 0}
end
local over = 0
if outcome == 'started' then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[4])
  if not redis.call('ZSCORE', KEYS[6], id) and redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[6]) then
    if ARGV[7] ~= '1' then
      redis.call('HSET', KEYS[1], 'state', '"queued"')
      redis.call('ZADD', KEYS[7], ARGV[12], id)
      redis.call('ZREM', KEYS[8], id)
      redis.call('ZREM', KEYS[9], id)
      return {'waiting', 0, '0', 0}
    end
    over = 1
  end
  redis.call('ZADD', KEYS[6], ARGV[5], id)
end
local fence = next_token(KEYS[3])
redis.call('SET', KEYS[2], ARGV[2] .. '|' .. fence, 'PX', ARGV[3])
redis.call('ZREM', KEYS[7], id)
redis.call('ZREM', KEYS[8], id)
if outcome ~= 'started' then
  redis.call('ZADD', KEYS[9], ARGV[13], id)
  return {outcome, fence, '0', 0}
end
redis.call('ZREM', KEYS[9], id)
local window = redis.call('HGET', KEYS[1], 'window_start')
if (not window) or window == 'null' then window = ARGV[4] end
redis.call('HSET', KEYS[1], 'state', '"running"', 'worker', ARGV[9], 'heartbeat_at', ARGV[10], 'window_start', window)
if never_started then redis.call('HSET', KEYS[1], 'started_at', ARGV[10]) end
redis.call('ZADD', KEYS[10], ARGV[4], id)
redis.call('ZADD', KEYS[11], tonumber(window) + tonumber(ARGV[8]), id)
return {'started', fence, window, over}
