"""The killswitch: one engaged state in Valkey that stops every agent and holds new work; and single kills.

Engaging writes the state first (it survives worker and Valkey restarts with persistence on) and then publishes
a stop message that every running agent's listener acts on at once. A worker that missed the message sees the
state on its next heartbeat, and admission checks it atomically before any run starts (an agent admitted while
engaged is held). A kill is the same for one agent; one that is not running (queued, waiting, held) is finished
at once, since no run would ever see its stop.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, cast

import redis

from orchestrator import scripts
from orchestrator.keys import Keys
from orchestrator.lifecycle import now_iso
from orchestrator.states import State

if TYPE_CHECKING:
    from orchestrator.fleet import Fleet

AUDIT_KEEP = 1000
STOP_REQUEST_TTL_SECONDS = 7 * 24 * 3600


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
    """Engage, release and inspect the fleet-wide stop; request single stops."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._engage = scripts.load(r, "killswitch_engage")

    def engaged(self) -> bool:
        """Whether the fleet is stopped."""
        return self.r.hget(self.keys.killswitch, "engaged") == "1"

    def engage(self, reason: str, by: str, running: int = 0) -> dict[str, Any]:
        """Persist the engaged state, then broadcast the stop; returns the status.

        Engaging twice keeps the first reason and time; the stop is broadcast again either way.
        """
        now = now_iso()
        first = bool(self._engage(keys=[self.keys.killswitch, self.keys.killswitch_stops],
                                  args=[reason, now, by, time.time()]))
        self.publish_stop("*", f"killswitch: {reason}")
        if first:
            self._audit({"event": "engage", "reason": reason, "by": by, "at": now, "running": running})
        return self.status()

    def mark_released(self, by: str) -> None:
        """Let new work run again (held agents stay held until resumed)."""
        self.r.hset(self.keys.killswitch, mapping={"engaged": "0", "released_at": now_iso(), "by": by})

    def status(self) -> dict[str, Any]:
        """``killswitch status --json`` (CONTRACT section 4), plus how many stopped and the slowest stop."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.keys.killswitch)
        pipe.zcard(self.keys.held)
        pipe.zrange(self.keys.killswitch_stops, 0, -1, withscores=True)
        state, held, stops = cast(tuple[dict[str, str], int, list[tuple[str, float]]], pipe.execute())
        engaged = state.get("engaged") == "1"
        return {
            "engaged": engaged,
            "reason": state.get("reason") if engaged else None,
            "engaged_at": state.get("engaged_at") if engaged else None,
            "held": int(held),
            "stopped": len(stops),
            "slowest_stop_seconds": round(max((s for _, s in stops), default=0.0), 3),
        }

    def publish_stop(self, agent: str, reason: str, status: State = State.KILLED) -> int:
        """Broadcast a stop to one agent (or ``*``); returns how many listeners got it."""
        body = {"agent": agent, "reason": reason, "status": status.value}
        return int(self.r.publish(self.keys.stop_channel, json.dumps(body)))

    def request_stop(self, agent_id: str, reason: str, status: State = State.KILLED) -> None:
        """Stop one agent wherever it runs: persist the request, then broadcast it."""
        body = json.dumps({"reason": reason, "status": status.value})
        self.r.set(self.keys.stop_request(agent_id), body, ex=STOP_REQUEST_TTL_SECONDS)
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

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """Engage/release events, newest first."""
        return [json.loads(e) for e in cast(list[str], self.r.lrange(self.keys.killswitch_audit, 0, limit - 1))]

    def _audit(self, event: dict[str, Any]) -> None:
        pipe = self.r.pipeline()
        pipe.lpush(self.keys.killswitch_audit, json.dumps(event))
        pipe.ltrim(self.keys.killswitch_audit, 0, AUDIT_KEEP - 1)
        pipe.execute()


def release(fleet: Fleet, by: str, resume: bool) -> dict[str, Any]:
    """Release the killswitch; with ``resume``, every held agent goes back to the queue."""
    switch = Killswitch(fleet.r, fleet.keys)
    switch.mark_released(by)
    resumed = 0
    if resume:
        for agent_id in cast(list[str], fleet.r.zrange(fleet.keys.held, 0, -1)):
            score = fleet.lifecycle.release_held(agent_id)
            if score is not None:
                fleet.dispatch(agent_id, score)
                resumed += 1
    stats = switch.status()
    switch._audit({"event": "release", "by": by, "at": now_iso(), "resumed": resumed,
                   "stopped": stats["stopped"], "slowest_stop_seconds": stats["slowest_stop_seconds"]})
    return {**stats, "resumed": resumed}


def kill(fleet: Fleet, agent_id: str, reason: str, status: State = State.KILLED) -> str:
    """Stop one agent: a running one through its stop request, an idle one finished here and now.

    Returns what happened: ``stopping`` (its run stops itself), ``finished`` (it was idle), ``final`` (it had
    already finished), or ``unknown``.
    """
    rec = fleet.store.get(agent_id)
    if rec is None:
        return "unknown"
    if State(rec["state"]).final:
        return "final"
    Killswitch(fleet.r, fleet.keys).request_stop(agent_id, reason, status)
    if rec["state"] == State.RUNNING.value:
        return "stopping"
    from orchestrator.results import finish_unstarted

    done = finish_unstarted(fleet, rec, status, f"stopped before it ran: {reason}")
    return "finished" if done is not None else "stopping"
