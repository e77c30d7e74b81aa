-- Included (by the loader, orchestrator/scripts.py) in admit, hand_back, finish and recover.
-- A fencing token is "<n>:<server time in microseconds>": n grows with every run, and the time part keeps a token
-- unique even when a failover loses the last write and n goes back (a second run never gets the first one's token).
local function next_token(key)
  local n = tonumber(string.match(redis.call('GET', key) or '0', '^(%d+)')) or 0
  local t = redis.call('TIME')
  local token = (n + 1) .. ':' .. t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', key, token)
  return token
end
