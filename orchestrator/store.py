"""Agent records (read side), events and rejected specs in Valkey; writes of an agent's state go through
``orchestrator.lifecycle``."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from orchestrator.errors import StaleFence
from orchestrator.keys import RECORD_TTL_SECONDS, REJECTED_KEEP, Keys
from orchestrator.lifecycle import event_json
from orchestrator.replication import StateRedis
from orchestrator.settings import parse_sentinel_url

if TYPE_CHECKING:
    from orchestrator.models import Rejection
    from orchestrator.settings import Settings

__all__ = ["RECORD_FIELDS", "AgentStore", "StaleFence", "connect", "public_record"]

Redis = redis.Redis

RECORD_FIELDS = (
    "agent_id", "task_id", "state", "worker", "turns", "usage", "heartbeat_at", "started_at", "finished_at",
    "branch", "commit", "error",
)
ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
              "total_tokens": 0, "cost_usd": 0.0}


MAX_STATE_CONNECTIONS = 10_000


def state_client(settings: Settings, *, retry_seconds: float | None = None, socket_connect_timeout: float = 5,
                 socket_timeout: float = 30) -> StateRedis:
    """A new client for fleet state: a single server, or the master a Sentinel group names.

    A Valkey restart, a Sentinel failover or a network blip must not fail an agent: every command retries with
    backoff for about ``retry_seconds`` (``valkey_retry_seconds`` by default). Model calls wait meanwhile (no
    reservation, no call: fail closed). The client carries the ``WAIT`` policy (``orchestrator.replication``).
    """
    seconds = settings.valkey_retry_seconds if retry_seconds is None else retry_seconds
    options: dict[str, Any] = {
        "decode_responses": True, "health_check_interval": 30, "socket_connect_timeout": socket_connect_timeout,
        "socket_timeout": socket_timeout,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.1), max(0, int(seconds / 2) + 3)),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        # Every running agent holds one connection for its stop listener (pub/sub) besides the pooled ones: a
        # threads-pool worker with 100 agents needs more than redis-py's default cap of 100.
        "max_connections": MAX_STATE_CONNECTIONS,
    }
    url = settings.state_redis_url
    target = parse_sentinel_url(url)
    client: StateRedis
    if target is None:
        client = cast(StateRedis, StateRedis.from_url(url, **options))
    else:
        # The sentinels name the master; a connection that finds it gone (or demoted: READONLY) asks them again.
        # redis-py's Script reloads a script the promoted replica never saw (NOSCRIPT) on its next call.
        sentinel = Sentinel(list(target.hosts),  # type: ignore[no-untyped-call]
                            sentinel_kwargs=settings.sentinel_kwargs(target))
        client = sentinel.master_for(  # type: ignore[no-untyped-call]
            settings.sentinel_master, redis_class=StateRedis, db=target.db, username=target.username,
            password=target.password, **options)
    client.wait_replicas = settings.state_wait_replicas
    client.wait_timeout_ms = settings.state_wait_timeout_ms
    return client


_clients: dict[tuple[Any, ...], StateRedis] = {}


def connect(settings: Settings) -> Redis:
    """The process's client for fleet state (one per configuration; redis-py pools reset themselves after fork).

    ``ORCHESTRATOR_STATE_URL`` (or the broker's) may be a ``sentinel://`` list: the client then follows the master
    that ``ORCHESTRATOR_SENTINEL_MASTER`` names through failovers.
    """
    s = settings
    key = (s.state_redis_url, s.valkey_retry_seconds, s.sentinel_master, s.sentinel_password, s.state_wait_replicas,
           s.state_wait_timeout_ms)
    client = _clients.get(key)
    if client is None:
        if len(_clients) >= 8:  # tests build many configurations; a process uses one
            _clients.clear()
        client = _clients[key] = state_client(s)
    return client


class AgentStore:
    """Reads agent records (each field JSON-encoded in one hash per agent), events and rejected specs."""

    def __init__(self, r: Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys

    # -- reads ----------------------------------------------------------------------------------------
    def get(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's record, or None."""
        raw = cast(dict[str, str], self.r.hgetall(self.keys.agent(agent_id)))
        return _decode(raw) if raw else None

    def get_many(self, agent_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Records of several agents, in order, skipping missing ones."""
        pipe = self.r.pipeline(transaction=False)
        ids = list(agent_ids)
        for agent_id in ids:
            pipe.hgetall(self.keys.agent(agent_id))
        return [_decode(raw) for raw in pipe.execute() if raw]

    def agent_for_task(self, task_id: str) -> str | None:
        """The agent spawned for a coordinator task_id (None once its record is gone)."""
        value = self.r.get(self.keys.task_index(task_id))
        if not value or not self.r.exists(self.keys.agent(str(value))):
            return None
        return str(value)

    def list_agents(self, include_finished: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """Live agents (or every agent, newest first) as records."""
        if include_finished:
            ids = cast(list[str], self.r.zrevrange(self.keys.agents_all, 0, limit - 1))
        else:
            ids = sorted(cast(set[str], self.r.smembers(self.keys.agents_active)))
        return self.get_many(ids)

    def load_snapshot(self, agent_id: str) -> bytes | None:
        """The worktree snapshot (a git bundle) saved with the last checkpoint that followed tools, or None."""
        raw = self.r.get(self.keys.snapshot(agent_id))
        return base64.b64decode(raw) if raw else None

    def load_checkpoint(self, agent_id: str) -> dict[str, Any] | None:
        """The last checkpoint, or None for a fresh agent."""
        raw = self.r.get(self.keys.checkpoint(agent_id))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    # -- events ---------------------------------------------------------------------------------------
    def add_event(self, agent_id: str, kind: str, message: str) -> None:
        """Append a user-visible event (warning, stuck...) to the agent's record."""
        key = self.keys.events(agent_id)
        pipe = self.r.pipeline()
        pipe.rpush(key, event_json(kind, message))
        pipe.ltrim(key, -500, -1)
        pipe.expire(key, RECORD_TTL_SECONDS)
        pipe.execute()

    def events(self, agent_id: str) -> list[dict[str, Any]]:
        """The agent's events, oldest first."""
        raw = cast(list[str], self.r.lrange(self.keys.events(agent_id), 0, -1))
        return [json.loads(e) for e in raw]

    # -- rejected specs -------------------------------------------------------------------------------
    def reject(self, rejection: Rejection) -> None:
        """Keep a rejected spec for ``orchestrator rejected``."""
        pipe = self.r.pipeline()
        pipe.lpush(self.keys.rejected, rejection.model_dump_json())
        pipe.ltrim(self.keys.rejected, 0, REJECTED_KEEP - 1)
        pipe.execute()

    def rejected(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Rejected specs, newest first."""
        raw = cast(list[str], self.r.lrange(self.keys.rejected, 0, limit - 1))
        return [json.loads(item) for item in raw]


def _decode(raw: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def public_record(record: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """The record as listed by ``agents --json`` (CONTRACT section 4), plus a heartbeat age."""
    out = {name: record.get(name) for name in RECORD_FIELDS}
    out["usage"] = record.get("usage") or dict(ZERO_USAGE)
    hb = record.get("heartbeat_at")
    age = (now or time.time()) - datetime.fromisoformat(hb).timestamp() if hb else None
    out["heartbeat_age_seconds"] = round(age, 1) if age is not None else None
    for extra in ("created_at", "priority", "recoveries", "stop_reason", "waiting", "warnings"):
        if extra in record:
            out[extra] = record[extra]
    return out
