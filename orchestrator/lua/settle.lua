-- settle: replace a reservation by what the call really used (0 to release it unbilled). Idempotent: a reservation
-- settles or is released once (whoever removes its member from the zset); a later call finds nothing.
-- A run's progress (checkpoint and snapshot, fenced) may ride along, so the checkpoint after a model reply costs no
-- round trip of its own. The tokens are charged even when the token is stale (they were spent); the progress is
-- then not written, and the answer says so.
-- KEYS[1] reservations (zset)  KEYS[2] the reservation's day ledger  KEYS[3] its agent's ledger  KEYS[4] fence
-- KEYS[5] checkpoint  KEYS[6] snapshot
-- ARGV[1] member "id|amount|day|agent"  ARGV[2] tokens used  ARGV[3] cost (micro-dollars)
-- ARGV[4] fencing token ('' unfenced)  ARGV[5] checkpoint JSON or '' (fence check only)  ARGV[6] snapshot or ''
-- ARGV[7] day ttl
-- Returns {settled 1/0, agent used, day used, progress saved 1/0}, so the caller checks thresholds without
-- another round trip.
--#include ledger
local settled = redis.call('ZREM', KEYS[1], ARGV[1])
local v = redis.call('MGET', KEYS[2], KEYS[3], KEYS[4])
local saved = save_progress(v[3], ARGV[4], KEYS[5], ARGV[5], KEYS[6], ARGV[6])
local day = fields(v[1], 3)
local agent = fields(v[2], 2)
if settled == 0 then return {0, agent[1], day[1], saved} end
local amount = tonumber(string.match(ARGV[1], '^[^|]*|(%d+)|')) or 0
local used = tonumber(ARGV[2])
day[1] = day[1] + used
agent[1] = agent[1] + used
put(KEYS[2], v[1], int(day[1]) .. '|' .. int(math.max(0, day[2] - amount)) .. '|' .. int(day[3] + tonumber(ARGV[3])),
    tonumber(ARGV[7]))
put(KEYS[3], v[2], int(agent[1]) .. '|' .. int(math.max(0, agent[2] - amount)), 0)
return {1, agent[1], day[1], saved}
