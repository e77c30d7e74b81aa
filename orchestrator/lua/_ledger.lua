-- Included (by the loader, orchestrator/scripts.py) in reserve and settle: the ledger's two compact counters.
-- A day's ledger is one string "used|reserved|cost_micro", an agent's "used|reserved" (integers): a turn reads
-- both with one MGET and writes each with one SET, where separate counters took a command per field.
-- The progress a turn saves with its reservation or settlement (fenced checkpoint and snapshot) is here too.
local function fields(raw, n)
  local out = {}
  for part in string.gmatch(raw or '', '[^|]+') do out[#out + 1] = tonumber(part) or 0 end
  for i = #out + 1, n do out[i] = 0 end
  return out
end
local function int(x)
  return string.format('%d', x)
end
-- Write a counter string, keeping the key's TTL; a day key is created with ``ttl`` (0: none).
local function put(key, existed, value, ttl)
  if existed or ttl == 0 then
    redis.call('SET', key, value, 'KEEPTTL')
  else
    redis.call('SET', key, value, 'EX', ttl)
  end
end
-- The fenced save of a turn's progress: 1 written (or nothing to write), 0 stale token (nothing written).
-- token '' means unfenced and nothing to write; a token with checkpoint '' only checks the fence.
local function save_progress(current_fence, token, cp_key, cp, snap_key, snap)
  if token == '' then return 1 end
  if current_fence ~= token then return 0 end
  if cp ~= '' then redis.call('SET', cp_key, cp) end
  if snap ~= '' then redis.call('SET', snap_key, snap) end
  return 1
end
