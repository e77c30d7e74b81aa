"""Celery entry points: thin wrappers that turn messages into calls of the ``orchestrator`` library."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.exceptions import Ignore

from orchestrator import ops
from orchestrator.celery import OPS_QUEUE, SPAWN_TASK, app, enqueue_run
from orchestrator.fleet import Fleet
from orchestrator.models import AgentResult
from orchestrator.runner import execute, intake

log = logging.getLogger(__name__)
_fleet: Fleet | None = None
_fleet_lock = threading.Lock()


def fleet() -> Fleet:
    """This process's fleet handles (created lazily, after the prefork fork; once, in the threads pool too)."""
    global _fleet
    with _fleet_lock:
        if _fleet is None:
            f = Fleet.create()
            f.enqueue = lambda agent_id: enqueue_run(f.store, agent_id)
            _fleet = f
        return _fleet


_last_cleanup = [0.0]
CLEANUP_EVERY_SECONDS = 3600.0


def _clean_own_workspace(f: Fleet) -> None:
    """Remove this worker's finished worktrees, at most once an hour (workers share no workspace)."""
    now = time.monotonic()
    with _fleet_lock:
        if _last_cleanup[0] and now - _last_cleanup[0] < CLEANUP_EVERY_SECONDS:
            return
        _last_cleanup[0] = now
    try:
        ops.cleanup_worktrees(f)
    except Exception:
        log.exception("worktree cleanup failed (the next one retries)")


@app.task(name=SPAWN_TASK, bind=True, acks_late=True)
def spawn_agent(self: Any, spec: Any = None, run_agent_id: str | None = None) -> dict[str, Any]:
    """Validate a spec and queue its agent at the spec's priority; on that second delivery, run it."""
    f = fleet()
    if run_agent_id is None:
        decided = intake(f, spec, self.request.id)
        if isinstance(decided, AgentResult):
            return decided.to_json()
        agent_id, score = decided
        if score:  # same task id: the coordinator's AsyncResult gets the run's result
            f.dispatch(agent_id, score)
        raise Ignore()
    result = execute(f, run_agent_id, worker=self.request.hostname or "unknown")
    _clean_own_workspace(f)
    if result is None:
        raise Ignore()  # held, waiting for a slot, or owned by another delivery: tracked in Valkey, not lost
    if isinstance(spec, dict) and spec.get("callback"):
        app.send_task("orchestrator.ops.deliver_callbacks", queue=OPS_QUEUE)  # deliver now, off the agents queue
    return result.to_json()


@app.task(name="orchestrator.ops.health_sweep")
def health_sweep() -> dict[str, Any]:
    """Find dead or stuck agents and recover them; expire stale budget leases; send owed run messages."""
    return ops.health_sweep(fleet())


@app.task(name="orchestrator.ops.deliver_callbacks")
def deliver_callbacks() -> dict[str, Any]:
    """Send due callbacks from the outbox."""
    return ops.deliver_callbacks(fleet(), send_task=app.send_task)


@app.task(name="orchestrator.ops.budget_rollup")
def budget_rollup() -> dict[str, Any]:
    """Archive the summary of the day that ended (idempotent)."""
    return ops.budget_rollup(fleet())


@app.task(name="orchestrator.ops.cleanup_worktrees")
def cleanup_worktrees() -> dict[str, Any]:
    """Remove worktrees of agents finished longer ago than the retention period."""
    return ops.cleanup_worktrees(fleet())
