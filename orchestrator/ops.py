"""Housekeeping run by beat on the ``ops`` queue: health sweep, callbacks, day rollup, worktree cleanup.

Every job is safe to run twice at once (two beats): each state change is a lifecycle verb whose script claims
what it changes (a second sweeper finds the agent no longer running, a dispatch entry already pushed forward),
each callback is owned through a claim key while it is sent, and a day is archived with SET NX.

A recovery needs proof of death: a heartbeat older than the timeout *while the sweep could see Valkey*. After a
gap in the sweeps (Valkey or beat was away) every heartbeat looks old, so the sweep first gives live workers one
whole timeout to beat again before it presumes anyone dead. A Valkey outage therefore never counts as a death.
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
from orchestrator.keys import RECORD_TTL_SECONDS
from orchestrator.killswitch import Killswitch, kill
from orchestrator.states import State

log = logging.getLogger(__name__)

DEAD_REASON = "heartbeat older than the timeout: worker presumed dead"


def outbox(fleet: Fleet) -> Outbox:
    """The callback outbox of a fleet."""
    s = fleet.settings
    secret = s.webhook_secret.get_secret_value() if s.webhook_secret else None
    return Outbox(fleet.r, fleet.keys, secret, s.callback_retry_base_seconds, s.callback_retry_max_seconds,
                  s.callback_give_up_hours * 3600, allowed_hosts=s.webhook_allowed_hosts)


def deliver_callbacks(fleet: Fleet, send_task: SendTask) -> dict[str, Any]:
    """Send every due callback."""
    return outbox(fleet).deliver_due(send_task)


def visible_since(fleet: Fleet, now: float) -> float:
    """Since when the sweeps have seen Valkey without a gap (now, if the last sweep is too long ago)."""
    s = fleet.settings
    key = fleet.keys.sweep_state
    last, since = cast(list[str | None], fleet.r.hmget(key, "last", "since"))
    gap_limit = max(3 * s.health_sweep_interval_seconds, s.heartbeat_timeout_seconds)
    if last is None or since is None or now - float(last) > gap_limit:
        if last is not None:
            log.warning("first health sweep after %.0f s without one: live workers get %.0f s to beat before anyone "
                        "is presumed dead", now - float(last), s.heartbeat_timeout_seconds)
        since = str(now)
    fleet.r.hset(key, mapping={"last": str(now), "since": since})
    return float(since)


def health_sweep(fleet: Fleet, now: float | None = None) -> dict[str, Any]:
    """Recover dead runs, enforce deadlines, send overdue run messages, wake waiters; cost grows with stale only."""
    started = time.perf_counter()
    moment = now or time.time()
    s = fleet.settings
    expired = fleet.budget.expire_reservations()
    stale_before = moment - s.heartbeat_timeout_seconds
    since = visible_since(fleet, moment)
    recovered: list[str] = []
    stale: list[str] = []
    if since <= stale_before:
        stale = cast(list[str], fleet.r.zrangebyscore(fleet.keys.heartbeats, "-inf", stale_before, 0, 1000))
        for agent_id in stale:
            done, count, score = fleet.lifecycle.recover(agent_id, stale_before, DEAD_REASON)
            if done == 1:
                log.warning("recovering agent %s (recovery %d): %s", agent_id, count, DEAD_REASON)
                recovered.append(agent_id)
                fleet.dispatch(agent_id, score)
    overdue = enforce_deadlines(fleet, moment)
    resent = resend_dispatch(fleet)
    woken = fleet.wake()
    pipe = fleet.r.pipeline(transaction=False)
    pipe.hincrby(fleet.keys.stats, "sweep_runs", 1)
    pipe.hset(fleet.keys.stats, "last_sweep_at", str(moment))
    pipe.zremrangebyscore(fleet.keys.agents_all, "-inf", moment - RECORD_TTL_SECONDS)
    pipe.execute()
    return {"stale": len(stale), "recovered": recovered, "expired_reservations": expired, "overdue": overdue,
            "resent": resent, "woken": woken, "paused": since > stale_before,
            "seconds": round(time.perf_counter() - started, 4)}


def resend_dispatch(fleet: Fleet) -> int:
    """Send the run messages still owed (their sender died, or the broker refused them); returns how many."""
    sent = 0
    for agent_id, score in fleet.lifecycle.claim_dispatch():
        sent += fleet.dispatch(agent_id, score)
    return sent


def enforce_deadlines(fleet: Fleet, now: float) -> list[str]:
    """Agents past their duration limit: stopped as ``timed_out`` (hard) or flagged once (soft).

    Each agent's own supervisor does this locally; the sweep is the backstop for one that cannot.
    """
    overdue = cast(list[str], fleet.r.zrangebyscore(fleet.keys.deadlines, "-inf", now, 0, 1000))
    for agent_id in overdue:
        if not fleet.r.zrem(fleet.keys.deadlines, agent_id):
            continue  # another sweeper has it
        if fleet.budget.hard:
            kill(fleet, agent_id, "duration limit reached", status=State.TIMED_OUT)
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
        if fleet.r.exists(fleet.keys.lease(agent_id)):
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
