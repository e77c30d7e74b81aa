"""Agent records, checkpoints, events and rejected specs in Valkey."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from orchestrator.keys import RECORD_TTL_SECONDS, REJECTED_KEEP, Keys
from orchestrator.models import AgentResult, AgentSpec, Rejection, State, Usage, iso, utcnow
from orchestrator.settings import Settings, get_settings

Redis = redis.Redis

# Write record fields only while the writer still holds the newest fencing token (or without a token).
_FENCED_HSET = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# KEYS: checkpoint, record, fence ; ARGV: token or '', checkpoint JSON, field, value, ...
_FENCED_CHECKPOINT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
if #ARGV > 2 then redis.call('HSET', KEYS[2], unpack(ARGV, 3)) end
return 1
"""

RECORD_FIELDS = (
    "agent_id", "task_id", "state", "worker", "turns", "usage", "heartbeat_at", "started_at", "finished_at",
    "branch", "commit", "error",
)


@lru_cache(maxsize=4)
def _client(url: str, retry_seconds: float) -> Redis:
    # A Valkey restart or a network blip must not fail an agent: every command retries with backoff for about
    # `valkey_retry_seconds`. Model calls wait meanwhile (no reservation, no call: fail closed).
    retries = max(0, int(retry_seconds / 2) + 3)
    return redis.Redis.from_url(
        url, decode_responses=True, health_check_interval=30, socket_connect_timeout=5, socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def connect(settings: Settings | None = None) -> Redis:
    """The process's client for fleet state (redis-py pools reset themselves after fork)."""
    s = settings or get_settings()
    return _client(s.state_redis_url, s.valkey_retry_seconds)


class StaleFence(RuntimeError):
    """This process no longer owns the agent: another run took over; it must not write anything."""


class AgentStore:
    """Reads and writes agent records; each field is stored JSON-encoded in one hash per agent."""

    def __init__(self, r: Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._fenced_hset = r.register_script(_FENCED_HSET)
        self._fenced_checkpoint = r.register_script(_FENCED_CHECKPOINT)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> AgentStore:
        """A store on the configured state server."""
        s = settings or get_settings()
        return cls(connect(s), Keys(s.key_prefix))

    # -- creation -------------------------------------------------------------------------------------
    def create(self, spec: AgentSpec, celery_task_id: str | None) -> tuple[str, bool]:
        """Register an agent for ``spec``; returns (agent_id, created). An existing task_id is a duplicate."""
        agent_id = uuid.uuid4().hex[:16]
        if not self.r.set(self.keys.task_index(spec.task_id), agent_id, nx=True):
            existing = self.r.get(self.keys.task_index(spec.task_id))
            return str(existing), False
        now = utcnow()
        record: dict[str, Any] = {
            "agent_id": agent_id, "task_id": spec.task_id, "state": State.QUEUED.value, "worker": None,
            "turns": 0, "usage": None, "heartbeat_at": None, "started_at": None, "finished_at": None,
            "branch": spec.branch or f"agent/{agent_id}", "commit": None, "error": None,
            "created_at": iso(now), "celery_task_id": celery_task_id, "priority": spec.priority,
            "spec": spec.model_dump(mode="json"), "recoveries": 0, "result": None,
        }
        pipe = self.r.pipeline()
        pipe.hset(self.keys.agent(agent_id), mapping={k: json.dumps(v) for k, v in record.items()})
        pipe.zadd(self.keys.agents_all, {agent_id: now.timestamp()})
        pipe.sadd(self.keys.agents_active, agent_id)
        pipe.execute()
        return agent_id, True

    # -- reads ----------------------------------------------------------------------------------------
    def get(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's record, or None."""
        raw = cast(dict[str, str], self.r.hgetall(self.keys.agent(agent_id)))
        return _decode(raw) if raw else None

    def get_many(self, agent_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Records of several agents, in order, skipping missing ones."""
        pipe = self.r.pipeline()
        ids = list(agent_ids)
        for agent_id in ids:
            pipe.hgetall(self.keys.agent(agent_id))
        return [_decode(raw) for raw in pipe.execute() if raw]

    def agent_for_task(self, task_id: str) -> str | None:
        """The agent spawned for a coordinator task_id."""
        value = self.r.get(self.keys.task_index(task_id))
        return str(value) if value else None

    def list_agents(self, include_finished: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """Live agents (or every agent, newest first) as records."""
        if include_finished:
            ids = cast(list[str], self.r.zrevrange(self.keys.agents_all, 0, limit - 1))
        else:
            ids = sorted(cast(set[str], self.r.smembers(self.keys.agents_active)))
        return self.get_many(ids)

    # -- writes ---------------------------------------------------------------------------------------
    def update(self, agent_id: str, fence: int | None = None, **fields: Any) -> None:
        """Set record fields; with ``fence``, only while that fencing token is still the newest."""
        args: list[str] = ["" if fence is None else str(fence)]
        for name, value in fields.items():
            args += [name, json.dumps(value)]
        ok = self._fenced_hset(keys=[self.keys.agent(agent_id), self.keys.fence(agent_id)], args=args)
        if not ok:
            raise StaleFence(f"agent {agent_id}: fencing token {fence} is stale")

    def add_event(self, agent_id: str, kind: str, message: str) -> None:
        """Append a user-visible event (warning, recovery...) to the agent's record."""
        event = {"at": iso(utcnow()), "kind": kind, "message": message}
        key = self.keys.agent(agent_id) + ":events"
        pipe = self.r.pipeline()
        pipe.rpush(key, json.dumps(event))
        pipe.ltrim(key, -500, -1)
        pipe.expire(key, RECORD_TTL_SECONDS)
        pipe.execute()

    def events(self, agent_id: str) -> list[dict[str, Any]]:
        """The agent's events, oldest first."""
        raw = cast(list[str], self.r.lrange(self.keys.agent(agent_id) + ":events", 0, -1))
        return [json.loads(e) for e in raw]

    def finish(self, agent_id: str, result: AgentResult, fence: int | None = None) -> None:
        """Record the final result and move the agent out of the active set."""
        data = result.to_json()
        self.update(
            agent_id, fence, state=result.status.value, result=data, finished_at=result.finished_at,
            commit=result.commit, error=result.error, turns=result.turns, usage=data["usage"],
            worker=result.worker,
        )
        pipe = self.r.pipeline()
        pipe.hincrby(self.keys.stats, f"finished:{result.status.value}", 1)
        pipe.srem(self.keys.agents_active, agent_id)
        pipe.zrem(self.keys.heartbeats, agent_id)
        pipe.zrem(self.keys.deadlines, agent_id)
        pipe.expire(self.keys.agent(agent_id), RECORD_TTL_SECONDS)
        pipe.expire(self.keys.checkpoint(agent_id), RECORD_TTL_SECONDS)
        pipe.execute()

    def reactivate(self, agent_id: str, state: State) -> None:
        """Put a stopped agent back among the live ones (resume, recovery)."""
        self.update(agent_id, state=state.value, finished_at=None, error=None)
        self.r.persist(self.keys.agent(agent_id))
        self.r.sadd(self.keys.agents_active, agent_id)

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, agent_id: str, checkpoint: Mapping[str, Any], fence: int | None = None,
                        **fields: Any) -> None:
        """Store the transcript (and record fields) after a completed turn, in one fenced step."""
        args: list[str] = ["" if fence is None else str(fence), json.dumps(checkpoint)]
        for name, value in fields.items():
            args += [name, json.dumps(value)]
        keys = [self.keys.checkpoint(agent_id), self.keys.agent(agent_id), self.keys.fence(agent_id)]
        if not self._fenced_checkpoint(keys=keys, args=args):
            raise StaleFence(f"agent {agent_id}: fencing token {fence} is stale")

    def load_checkpoint(self, agent_id: str) -> dict[str, Any] | None:
        """The last checkpoint, or None for a fresh agent."""
        raw = self.r.get(self.keys.checkpoint(agent_id))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

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
    out["usage"] = record.get("usage") or Usage().model_dump()
    hb = record.get("heartbeat_at")
    age = (now or time.time()) - datetime.fromisoformat(hb).timestamp() if hb else None
    out["heartbeat_age_seconds"] = round(age, 1) if age is not None else None
    for extra in ("created_at", "priority", "recoveries", "stop_reason"):
        if extra in record:
            out[extra] = record[extra]
    return out
