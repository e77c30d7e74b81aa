-- save: a run's progress, fenced: the checkpoint (when given), the worktree snapshot (when given) and record fields
-- in one step, so the transcript and the files a resume rebuilds never disagree. The token is enough: every
-- transition out of running (hand_back, recover, finish) replaces it.
-- KEYS[1] record  KEYS[2] fence  KEYS[3] checkpoint  KEYS[4] snapshot
-- ARGV[1] fencing token ('' only for an agent no run owns)  ARGV[2] checkpoint JSON or ''  ARGV[3] snapshot or ''
-- ARGV[4..] field, value
-- Returns 1, or 0 when the token is stale (nothing was written).
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[3], ARGV[2]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], ARGV[3]) end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
return 1
