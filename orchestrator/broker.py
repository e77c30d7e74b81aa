"""kombu's Sentinel transport, with one fix: a worker must outlive a failover.

Found by the Sentinel drill (tests/test_sentinel.py), kombu 5.7 / Celery 5.7: when the primary dies under a worker,
Celery's reconnect (``Consumer.on_connection_error_after_connected``) first ``collect()``s the broken connection,
which detaches its transport (``Transport.client = None``) while the default channel, whose pending BRPOP failed
before it could close, stays open; the ``close()`` that follows then restores the unacknowledged messages through
that channel, which needs a new pool, whose parameters come from ``Transport.client``: ``AttributeError: 'NoneType'
object has no attribute 'hostname'``. Celery calls that an unrecoverable error and the worker shuts down: alive a
while (its running agents finish) but consuming nothing, then gone. Acknowledging a running task's message later
through the same channel fails the same way.

The fix: a channel remembers the connection it was opened for and builds a pool from it when its transport has been
detached. The channel's restore and acknowledgements then go through Sentinel to the current master, as they would
have before the failover.
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis

#: What ``orchestrator.celery`` points kombu's ``sentinel`` alias at (every process that loads the app).
SENTINEL_TRANSPORT = "orchestrator.broker:SentinelTransport"


class SentinelChannel(kombu_redis.SentinelChannel):
    """kombu's Sentinel channel; it keeps working after its transport was detached by a reconnect."""

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._opened_for = connection.client  # the kombu Connection whose parameters this channel uses
        super().__init__(connection, *args, **kwargs)  # type: ignore[no-untyped-call]

    def _get_pool(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport.client is not None or self._opened_for is None:
            return super()._get_pool(asynchronous)  # type: ignore[no-untyped-call]
        transport.client = self._opened_for  # only for the parameters of the new pool
        try:
            return super()._get_pool(asynchronous)  # type: ignore[no-untyped-call]
        finally:
            transport.client = None


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with :class:`SentinelChannel`."""

    Channel = SentinelChannel


def use_fleet_sentinel_transport() -> None:
    """Make ``sentinel://`` URLs use :class:`SentinelTransport` in this process.

    An alias, not Celery's ``broker_transport``: kombu's failover to the next URL of a ``;`` list re-reads the
    transport from that URL's scheme.
    """
    kombu.transport.TRANSPORT_ALIASES["sentinel"] = SENTINEL_TRANSPORT
    kombu.transport._transport_cache.pop("sentinel", None)
