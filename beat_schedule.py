"""The beat schedule: every periodic job of the fleet, all on the ``ops`` queue.

Each job is safe to run twice (two beats, or a late and an on-time run): the sweep claims each stale agent with
an atomic step, and the day rollup archives a day only once.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab


def build_schedule(settings: Any) -> dict[str, dict[str, Any]]:
    """The ``beat_schedule`` for the given settings (intervals come from ``ORCHESTRATOR_*``)."""
    sweep = float(settings.health_sweep_interval_seconds)
    return {
        "health-sweep": {
            "task": "orchestrator.ops.health_sweep",
            "schedule": sweep,
            "options": {"queue": "ops", "expires": sweep * 2},
        },
        "deliver-callbacks": {
            "task": "orchestrator.ops.deliver_callbacks",
            "schedule": 5.0,
            "options": {"queue": "ops", "expires": 30},
        },
        "budget-rollup": {
            "task": "orchestrator.ops.budget_rollup",
            # Midnight in ORCHESTRATOR_TIMEZONE (the app's timezone); the job archives the day that ended.
            "schedule": crontab(minute="0", hour="0"),
            "options": {"queue": "ops"},
        },
        "workspace-cleanup": {
            "task": "orchestrator.ops.cleanup_worktrees",
            "schedule": 3600.0,
            "options": {"queue": "ops", "expires": 1800},
        },
    }
