"""Run leases with fencing tokens: an agent runs only while its worker holds the lease.

Taking a lease bumps the agent's fencing token; every write of a run carries its token, and a write with a
stale token is refused (``store.StaleFence``). So a second delivery of the same task, or a worker that comes
back after it was presumed dead, cannot act for the agent.
"""

from __future__ import annotations

from typing import cast

import redis

from orchestrator.keys import Keys

# KEYS: lease, fence ; ARGV: holder, ttl_ms. Returns the new token, or 0 if another holder's lease is live.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. '|' then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""

# KEYS: lease, fence ; ARGV: holder, token, ttl_ms. 1 if renewed, 0 if the lease was lost.
_RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] .. '|' .. ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: lease ; ARGV: holder, token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. '|' .. ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    """Acquire, renew, release and break agent run leases."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._acquire = r.register_script(_ACQUIRE)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)

    def acquire(self, agent_id: str, holder: str, ttl_seconds: float) -> int | None:
        """Take the lease; returns the fencing token, or None if another live holder has it."""
        token = int(cast(int, self._acquire(
            keys=[self.keys.lease(agent_id), self.keys.fence(agent_id)], args=[holder, int(ttl_seconds * 1000)])))
        return token or None

    def renew(self, agent_id: str, holder: str, token: int, ttl_seconds: float) -> bool:
        """Extend the lease; False means it was lost (a newer run owns the agent)."""
        return bool(self._renew(keys=[self.keys.lease(agent_id), self.keys.fence(agent_id)],
                                args=[holder, token, int(ttl_seconds * 1000)]))

    def release(self, agent_id: str, holder: str, token: int) -> None:
        """Give the lease back (only if still ours)."""
        self._release(keys=[self.keys.lease(agent_id)], args=[holder, token])

    def seconds_left(self, agent_id: str) -> float:
        """Seconds until the agent's lease expires (0 when nobody holds it)."""
        ms = int(self.r.pttl(self.keys.lease(agent_id)))
        return ms / 1000 if ms > 0 else 0.0

    def holder(self, agent_id: str) -> str | None:
        """Who holds the lease now, if anyone."""
        value = self.r.get(self.keys.lease(agent_id))
        return str(value) if value else None

    def fence_out(self, agent_id: str) -> int:
        """Invalidate every current token (recovery): the old holder's writes are refused from now on."""
        pipe = self.r.pipeline()
        pipe.incr(self.keys.fence(agent_id))
        pipe.delete(self.keys.lease(agent_id))
        return int(pipe.execute()[0])
