-- beat: a running agent's heartbeat, fenced. Renews the lease (taking it again if it expired while Valkey was
-- away and no sweep fenced the run out), the heartbeat, the slot and the open token reservation, writes progress
-- fields, and answers with the persisted stops in the same round trip.
-- KEYS[1] record  KEYS[2] lease  KEYS[3] fence  KEYS[4] heartbeats  KEYS[5] slots  KEYS[6] killswitch
-- KEYS[7] stop request  KEYS[8] reservations
-- ARGV[1] fencing token  ARGV[2] holder  ARGV[3] lease ms  ARGV[4] now (epoch s)  ARGV[5] slot lease until
-- ARGV[6] agent id  ARGV[7] open reservation id or ''  ARGV[8] reservation lease until  ARGV[9..] field, value
-- Returns {1 or 0 (lease lost), killswitch engaged ('1' or ''), killswitch reason, stop request JSON or ''}
if redis.call('GET', KEYS[3]) ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= '"running"' then
  return {0, '', '', ''}
end
local mine = ARGV[2] .. '|' .. ARGV[1]
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= mine then return {0, '', '', ''} end
redis.call('SET', KEYS[2], mine, 'PX', ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[6])
if ARGV[7] ~= '' then redis.call('ZADD', KEYS[8], 'XX', ARGV[8], ARGV[7]) end
if #ARGV > 8 then redis.call('HSET', KEYS[1], unpack(ARGV, 9)) end
local ks = redis.call('HMGET', KEYS[6], 'engaged', 'reason')
return {1, ks[1] or '', ks[2] or '', redis.call('GET', KEYS[7]) or ''}
