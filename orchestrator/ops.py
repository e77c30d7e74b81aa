"""Housekeeping run by beat on the ``ops`` queue: health sweep, callbacks, day rollup, worktree cleanup.

Every job is safe to run twice at once (two beats): each stale agent is claimed by an atomic ZREM, callbacks
by a conditional ZADD, and a day is archived with SET NX.
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

from orchestrator.callbacks import Outbox, SendTask
from orchestrator.fleet import Fleet
from orchestrator.killswitch import Killswitch
from orchestrator.models import AgentResult, State, Usage, iso, utcnow
from orchestrator.runner import wake_waiters

log = logging.getLogger(__name__)


def outbox(fleet: Fleet) -> Outbox:
    """The callback outbox of a fleet."""
    s = fleet.settings
    secret = s.webhook_secret.get_secret_value() if s.webhook_secret else None
    return Outbox(fleet.r, fleet.keys, secret, s.callback_retry_base_seconds, s.callback_retry_max_seconds,
                  s.callback_give_up_hours * 3600)


def queue_callback(fleet: Fleet, result: AgentResult) -> bool:
    """Put a finished agent's result in the outbox if its spec asked for a callback; True if it did."""
    rec = fleet.store.get(result.agent_id or "") if result.agent_id else None
    callback = ((rec or {}).get("spec") or {}).get("callback")
    if callback:
        outbox(fleet).put(str(result.agent_id), callback, result.to_json())
    return bool(callback)


def deliver_callbacks(fleet: Fleet, send_task: SendTask) -> dict[str, Any]:
    """Send every due callback."""
    return outbox(fleet).deliver_due(send_task)


def health_sweep(fleet: Fleet, now: float | None = None) -> dict[str, Any]:
    """Recover agents whose heartbeat is older than the timeout; cost grows with stale agents only."""
    started = time.perf_counter()
    moment = now or time.time()
    s = fleet.settings
    expired = fleet.budget.expire_reservations()
    stale = cast(list[str], fleet.r.zrangebyscore(fleet.keys.heartbeats, "-inf",
                                                  moment - s.heartbeat_timeout_seconds, 0, 1000))
    recovered, failed = [], []
    for agent_id in stale:
        if not fleet.r.zrem(fleet.keys.heartbeats, agent_id):
            continue  # another sweeper claimed it
        lease_left = fleet.leases.seconds_left(agent_id)
        if lease_left > 0:
            # Its lease is still live (it died between renewing the lease and beating, or it is slow): look again
            # the moment the lease runs out, not a whole timeout later.
            fleet.r.zadd(fleet.keys.heartbeats, {agent_id: moment - s.heartbeat_timeout_seconds + lease_left})
            continue
        if recover_agent(fleet, agent_id, "heartbeat older than the timeout: worker presumed dead"):
            recovered.append(agent_id)
        else:
            failed.append(agent_id)
    overdue = enforce_deadlines(fleet, moment)
    woken = wake_waiters(fleet)
    pipe = fleet.r.pipeline()
    pipe.hincrby(fleet.keys.stats, "sweep_runs", 1)
    pipe.hincrby(fleet.keys.stats, "recoveries", len(recovered))
    pipe.hincrby(fleet.keys.stats, "recoveries_given_up", len(failed))
    pipe.hset(fleet.keys.stats, "last_sweep_at", str(moment))
    pipe.execute()
    return {"stale": len(stale), "recovered": recovered, "failed": failed, "expired_reservations": expired,
            "overdue": overdue, "woken": woken, "seconds": round(time.perf_counter() - started, 4)}


def enforce_deadlines(fleet: Fleet, now: float) -> list[str]:
    """Agents past their duration limit: stopped as ``timed_out`` (hard) or flagged once (soft).

    Each agent's own supervisor does this locally; the sweep is the backstop for one that cannot.
    """
    overdue = cast(list[str], fleet.r.zrangebyscore(fleet.keys.deadlines, "-inf", now, 0, 1000))
    switch = Killswitch(fleet.r, fleet.keys)
    for agent_id in overdue:
        if not fleet.r.zrem(fleet.keys.deadlines, agent_id):
            continue
        if fleet.budget.hard:
            switch.kill_agent(agent_id, "duration limit reached", status=State.TIMED_OUT)
        else:
            fleet.store.add_event(agent_id, "warning", "duration limit passed (soft mode: the agent goes on)")
    return overdue


def hand_back_worker(fleet: Fleet, worker: str) -> list[str]:
    """Ask every agent running on ``worker`` to checkpoint, release its lease and go back to the queue."""
    switch = Killswitch(fleet.r, fleet.keys)
    handed = []
    for rec in fleet.store.list_agents():
        if rec.get("worker") == worker and rec.get("state") == State.RUNNING.value:
            switch.publish_stop(rec["agent_id"], f"worker {worker} is shutting down", State.RECOVERING)
            handed.append(rec["agent_id"])
    return handed


def recover_agent(fleet: Fleet, agent_id: str, reason: str) -> bool:
    """Fence out the old run and re-enqueue the agent from its checkpoint; False if it failed for good."""
    rec = fleet.store.get(agent_id)
    if rec is None or State(rec["state"]).final:
        return False
    fleet.leases.fence_out(agent_id)
    fleet.budget.release_slot(agent_id)
    recoveries = int(rec.get("recoveries") or 0) + 1
    if recoveries > fleet.settings.max_recoveries:
        result = AgentResult(
            agent_id=agent_id, task_id=rec.get("task_id"), status=State.FAILED, worker=rec.get("worker"),
            branch=rec.get("branch"), turns=int(rec.get("turns") or 0),
            usage=Usage.model_validate(rec.get("usage") or {}),
            error=f"{reason}; gave up after {fleet.settings.max_recoveries} recoveries",
            started_at=rec.get("started_at"), finished_at=iso(utcnow()),
            metadata=(rec.get("spec") or {}).get("metadata") or {},
        )
        fleet.store.finish(agent_id, result)
        fleet.store.add_event(agent_id, "failed", result.error or "")
        queue_callback(fleet, result)
        return False
    fleet.store.update(agent_id, state=State.RECOVERING.value, recoveries=recoveries)
    fleet.store.add_event(agent_id, "recovering", f"{reason} (recovery {recoveries})")
    log.warning("recovering agent %s: %s", agent_id, reason)
    requeue(fleet, agent_id)
    return True


def requeue(fleet: Fleet, agent_id: str) -> None:
    """Enqueue an agent again; if the broker refuses, leave it for the next sweep rather than lose it."""
    try:
        fleet.enqueue(agent_id)
    except Exception:
        log.exception("could not enqueue agent %s; the next sweep retries", agent_id)
        fleet.r.zadd(fleet.keys.heartbeats, {agent_id: 0})


def budget_rollup(fleet: Fleet, now: float | None = None) -> dict[str, Any]:
    """Archive yesterday's summary (in the fleet's timezone); running it twice changes nothing."""
    moment = now or time.time()
    tz = ZoneInfo(fleet.settings.timezone)
    yesterday = (datetime.fromtimestamp(moment, tz).date() - timedelta(days=1)).isoformat()
    agents = fleet.store.get_many(fleet.budget.day_agent_ids(yesterday))
    summary = fleet.budget.summary(agents, day=yesterday)
    archived = fleet.budget.archive_day(yesterday, summary)
    return {"day": yesterday, "archived": archived}


def cleanup_worktrees(fleet: Fleet, now: float | None = None) -> dict[str, Any]:
    """Remove worktrees of agents finished longer ago than the retention period, never a leased one."""
    moment = now or time.time()
    retention = fleet.settings.worktree_retention_hours * 3600
    root = fleet.workspace.root / "worktrees"
    removed = []
    for path in sorted(root.iterdir()) if root.exists() else []:
        agent_id = path.name
        rec = fleet.store.get(agent_id)
        if fleet.leases.holder(agent_id) is not None:
            continue
        finished = rec.get("finished_at") if rec else None
        if rec is not None and (not State(rec["state"]).final or rec["state"] == State.KILLED.value):
            continue  # live, or killed and resumable: keep
        if finished and moment - datetime.fromisoformat(finished).timestamp() < retention:
            continue
        repo = ((rec or {}).get("spec") or {}).get("repo")
        if repo:
            fleet.workspace.remove(agent_id, repo)
        else:
            shutil.rmtree(path, ignore_errors=True)
        removed.append(agent_id)
    return {"removed": removed, "disk_bytes": fleet.workspace.disk_usage()}
