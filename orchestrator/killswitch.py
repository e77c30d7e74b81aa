"""The killswitch: one engaged state in Valkey that stops every agent and holds new work.

Engaging writes the state first (it survives worker and Valkey restarts with persistence on) and then publishes
a stop message that every running agent's listener acts on at once. A worker that missed the message sees the
state on its next heartbeat, and every run checks it before it starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from orchestrator.keys import Keys
from orchestrator.models import State, iso, utcnow

AUDIT_KEEP = 1000

_ENGAGE = """
if redis.call('HGET', KEYS[1], 'engaged') == '1' then return 0 end
redis.call('HSET', KEYS[1], 'engaged', '1', 'reason', ARGV[1], 'engaged_at', ARGV[2],
           'by', ARGV[3], 'engaged_ts', ARGV[4])
return 1
"""


def parse_stop_request(raw: Any) -> tuple[State, str] | None:
    """A persisted stop request as (status, reason)."""
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        return State(body.get("status") or State.KILLED.value), str(body.get("reason") or "stopped")
    except (ValueError, TypeError, AttributeError):
        return State.KILLED, str(raw)


class Killswitch:
    """Engage, release and inspect the fleet-wide stop; hold and release agents."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._engage = r.register_script(_ENGAGE)

    def engaged(self) -> bool:
        """Whether the fleet is stopped."""
        return self.r.hget(self.keys.killswitch, "engaged") == "1"

    def engage(self, reason: str, by: str, running: int = 0) -> dict[str, Any]:
        """Persist the engaged state, then broadcast the stop; returns the status.

        Engaging twice keeps the first reason and time; the stop is broadcast again either way.
        """
        now = iso(utcnow())
        first = bool(self._engage(keys=[self.keys.killswitch], args=[reason, now or "", by, time.time()]))
        if first:
            self.r.delete(self.keys.killswitch_stops)
        self.publish_stop("*", f"killswitch: {reason}")
        if first:
            self._audit({"event": "engage", "reason": reason, "by": by, "at": now, "running": running})
        return self.status()

    def release(self, by: str, resume: bool, enqueue: Callable[[str], None]) -> dict[str, Any]:
        """Let new work run again; with ``resume``, enqueue every held agent again."""
        self.r.hset(self.keys.killswitch, mapping={"engaged": "0", "released_at": iso(utcnow()) or "", "by": by})
        resumed = 0
        if resume:
            for agent_id in cast(list[str], self.r.zrange(self.keys.held, 0, -1)):
                if self.r.zrem(self.keys.held, agent_id):
                    enqueue(agent_id)
                    resumed += 1
        stats = self.status()
        self._audit({"event": "release", "by": by, "at": iso(utcnow()), "resumed": resumed,
                     "stopped": stats["stopped"], "slowest_stop_seconds": stats["slowest_stop_seconds"]})
        return {**self.status(), "resumed": resumed}

    def status(self) -> dict[str, Any]:
        """``killswitch status --json`` (CONTRACT section 4)."""
        state = cast(dict[str, str], self.r.hgetall(self.keys.killswitch))
        engaged = state.get("engaged") == "1"
        stops = cast(list[tuple[str, float]], self.r.zrange(self.keys.killswitch_stops, 0, -1, withscores=True))
        return {
            "engaged": engaged,
            "reason": state.get("reason") if engaged else None,
            "engaged_at": state.get("engaged_at") if engaged else None,
            "held": int(self.r.zcard(self.keys.held)),
            "stopped": len(stops),
            "slowest_stop_seconds": round(max((s for _, s in stops), default=0.0), 3),
        }

    def hold(self, agent_id: str, priority: int) -> None:
        """Keep an agent that may not start while engaged (higher priority resumes first)."""
        self.r.zadd(self.keys.held, {agent_id: -priority * 1e10 + time.time()})

    def publish_stop(self, agent: str, reason: str, status: State = State.KILLED) -> int:
        """Broadcast a stop to one agent (or ``*``); returns how many listeners got it."""
        body = {"agent": agent, "reason": reason, "status": status.value}
        return int(self.r.publish(self.keys.stop_channel, json.dumps(body)))

    def kill_agent(self, agent_id: str, reason: str, status: State = State.KILLED) -> None:
        """Stop one agent wherever it runs: persist the request, then broadcast it."""
        body = json.dumps({"reason": reason, "status": status.value})
        self.r.set(self.keys.stop_request(agent_id), body, ex=7 * 24 * 3600)
        self.publish_stop(agent_id, reason, status)

    def kill_requested(self, agent_id: str) -> tuple[State, str] | None:
        """The status and reason of a pending stop of one agent, if any."""
        return parse_stop_request(self.r.get(self.keys.stop_request(agent_id)))

    def record_stop(self, agent_id: str, reason: str) -> None:
        """Note how long a killswitch stop took for one agent (for status and the audit trail)."""
        state = cast(dict[str, str], self.r.hgetall(self.keys.killswitch))
        if state.get("engaged") != "1" or not reason.startswith("killswitch"):
            return
        self.r.zadd(self.keys.killswitch_stops, {agent_id: time.time() - float(state.get("engaged_ts") or 0)})

    def clear_kill(self, agent_id: str) -> None:
        """Forget a kill request (the agent is being resumed)."""
        self.r.delete(self.keys.stop_request(agent_id))

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """Engage/release events, newest first."""
        return [json.loads(e) for e in cast(list[str], self.r.lrange(self.keys.killswitch_audit, 0, limit - 1))]

    def _audit(self, event: dict[str, Any]) -> None:
        pipe = self.r.pipeline()
        pipe.lpush(self.keys.killswitch_audit, json.dumps(event))
        pipe.ltrim(self.keys.killswitch_audit, 0, AUDIT_KEEP - 1)
        pipe.execute()
