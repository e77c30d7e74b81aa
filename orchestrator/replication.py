"""``WAIT`` after the writes that matter, so that a Sentinel failover cannot take them back.

Valkey replicates asynchronously: a write the primary acknowledged and had not yet sent to its replica is gone if
the primary dies and Sentinel promotes that replica. With ``ORCHESTRATOR_STATE_WAIT_REPLICAS=n`` the fleet sends
``WAIT n timeout`` right after the writes whose loss would cost money or run an agent twice (admission: lease and
fencing token; a token reservation and its settlement; finish) and checks how many replicas acknowledged. Sentinel
promotes the most up-to-date replica, so a write one replica acknowledged survives the failover.

A short answer (the replica is down, or lagging past the timeout) is logged and the run goes on: availability
first. What that risks is written down in docs/scale-out.md ("What a failover can lose").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

log = logging.getLogger(__name__)

#: Seconds between two warnings about short WAITs (the ones in between are counted in the next warning).
WARN_EVERY_SECONDS = 30.0


class StateRedis(redis.Redis):
    """The fleet's state client: a ``redis.Redis`` that also carries the replication policy of its settings."""

    wait_replicas: int = 0
    wait_timeout_ms: int = 100


class _ShortLog:
    """Throttles the short-WAIT warning to one line per ``WARN_EVERY_SECONDS`` per process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = 0.0
        self.missed = 0

    def warn(self, message: str, *args: Any) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last < WARN_EVERY_SECONDS and self.last:
                self.missed += 1
                return
            missed, self.missed, self.last = self.missed, 0, now
        suffix = f" ({missed} more since the last warning)" if missed else ""
        log.warning(message + suffix, *args)


_short = _ShortLog()


def replicated(r: Any, what: str) -> int | None:
    """After a write that matters: ``WAIT`` for the configured replicas; how many acknowledged (None: WAIT is off).

    Never raises: the write is done either way, and an unconfirmed one is logged for the operator.
    """
    if not isinstance(r, StateRedis) or r.wait_replicas <= 0:
        return None
    try:
        acked = int(r.wait(r.wait_replicas, r.wait_timeout_ms))
    except redis.RedisError as exc:
        _short.warn("valkey: could not confirm that the %s reached a replica (%s); a failover now could lose it",
                    what, exc)
        return 0
    if acked < r.wait_replicas:
        _short.warn("valkey: %s acknowledged by %d of %d replica(s) within %d ms; a failover now could lose it",
                    what, acked, r.wait_replicas, r.wait_timeout_ms)
    return acked
