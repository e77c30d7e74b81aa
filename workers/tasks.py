"""Celery entry points: thin wrappers that turn messages into calls of the ``orchestrator`` library."""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import Ignore

from orchestrator import ops
from orchestrator.celery import AGENTS_QUEUE, SPAWN_TASK, app
from orchestrator.fleet import Fleet
from orchestrator.models import AgentResult
from orchestrator.runner import execute, intake

log = logging.getLogger(__name__)
_fleet: Fleet | None = None


def fleet() -> Fleet:
    """This process's fleet handles (created lazily, after the prefork fork)."""
    global _fleet
    if _fleet is None:
        _fleet = Fleet.create(enqueue=enqueue_agent)
    return _fleet


def celery_priority(spec_priority: int) -> int:
    """Spec priority 0-9 (higher first) as a kombu Redis priority (0 first)."""
    return 9 - max(0, min(9, spec_priority))


def enqueue_agent(agent_id: str) -> None:
    """Send an admitted agent to the ``agents`` queue at its priority, under its original Celery task id."""
    rec = fleet().store.get(agent_id)
    if rec is None:
        log.error("cannot enqueue unknown agent %s", agent_id)
        return
    app.send_task(
        SPAWN_TASK, kwargs={"spec": rec["spec"], "run_agent_id": agent_id}, task_id=rec.get("celery_task_id"),
        queue=AGENTS_QUEUE, priority=celery_priority(int(rec.get("priority") or 5)),
    )


@app.task(name=SPAWN_TASK, bind=True, acks_late=True)
def spawn_agent(self: Any, spec: Any = None, run_agent_id: str | None = None) -> dict[str, Any]:
    """Validate a spec and queue its agent at the spec's priority; on that second delivery, run it."""
    f = fleet()
    if run_agent_id is None:
        decided = intake(f, spec, self.request.id)
        if isinstance(decided, AgentResult):
            return decided.to_json()
        enqueue_agent(decided)  # same task id: the coordinator's AsyncResult gets the run's result
        raise Ignore()
    result = execute(f, run_agent_id, worker=self.request.hostname or "unknown")
    if result is None:
        raise Ignore()  # held, waiting for a slot, or owned by another delivery: tracked in Valkey, not lost
    if ops.queue_callback(f, result):
        app.send_task("orchestrator.ops.deliver_callbacks", queue="ops")  # deliver now, off the agents queue
    return result.to_json()


@app.task(name="orchestrator.ops.health_sweep")
def health_sweep() -> dict[str, Any]:
    """Find dead or stuck agents and recover them; expire stale budget leases."""
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
