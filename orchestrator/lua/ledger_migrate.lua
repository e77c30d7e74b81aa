-- ledger_migrate: fold one day's or one agent's counters of the first ledger layout (one key per field) into the
-- compact ledger string, then drop them. Idempotent: the old keys are gone once folded, so a second run adds 0.
-- The new key keeps the TTL of the old "used" key (or gets ARGV[2] when created without one; 0: none).
-- KEYS[1] new ledger ("used|reserved[|cost]")  KEYS[2..] old counters, in the new string's field order
-- ARGV[1] fields in the new string (2 agent, 3 day)  ARGV[2] ttl seconds for a new key without an old TTL
-- Returns the tokens used that were folded in.
--#include ledger
local n = tonumber(ARGV[1])
local cur = fields(redis.call('GET', KEYS[1]), n)
local pttl = redis.call('PTTL', KEYS[2])
local moved = 0
for i = 2, #KEYS do
  local old = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  cur[i - 1] = cur[i - 1] + old
  if i == 2 then moved = old end
end
local parts = {}
for i = 1, n do parts[i] = int(math.max(0, cur[i])) end
local value = table.concat(parts, '|')
if pttl > 0 then
  redis.call('SET', KEYS[1], value, 'PX', pttl)
elseif redis.call('EXISTS', KEYS[1]) == 1 or tonumber(ARGV[2]) == 0 then
  redis.call('SET', KEYS[1], value, 'KEEPTTL')
else
  redis.call('SET', KEYS[1], value, 'EX', ARGV[2])
end
redis.call('DEL', unpack(KEYS, 2))
return moved
