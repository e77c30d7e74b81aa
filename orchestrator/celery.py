"""The fleet's Celery app: Valkey broker and backend, configured for agent runs of up to the duration limit.

Every process that loads the app (worker, beat, the CLI, Flower via ``celery -A orchestrator flower``) gets the
same configuration from here, transport options included, so none of them can disagree about redelivery.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery
from celery.app.control import Control
from kombu.entity import Exchange, Queue

from beat_schedule import build_schedule
from orchestrator.broker import use_fleet_sentinel_transport
from orchestrator.flower_guard import check_flower_auth
from orchestrator.settings import get_settings

AGENTS_QUEUE = "agents"
OPS_QUEUE = "ops"
SPAWN_TASK = "orchestrator.spawn_agent"

settings = get_settings()

# `celery -A orchestrator flower` without authentication would serve an open dashboard that can revoke tasks and
# shut down workers: refuse unless ORCHESTRATOR_FLOWER_ALLOW_UNAUTHENTICATED says so explicitly.
if (_flower_refusal := check_flower_auth(sys.argv, os.environ, settings.flower_allow_unauthenticated)) is not None:
    sys.exit(_flower_refusal)

# The Redis transport redelivers an unacknowledged message after `visibility_timeout` (celery #5935). An agent
# may run for the whole duration limit, and acks are late, so the timeout must exceed the longest run with room
# to spare; duplicate deliveries that still happen (a crashed worker, a forced redelivery) are stopped by the
# run lease and its fencing token, not by this number.
VISIBILITY_TIMEOUT = int(settings.max_task_duration_minutes * 60 * 2) + 3600

transport_options = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    # Ten priority levels so the spec's 0-9 priority maps one to one (kombu: 0 is served first).
    "priority_steps": list(range(10)),
    "queue_order_strategy": "priority",
    # Fail fast and retry rather than hang when Valkey is unreachable.
    "socket_connect_timeout": 5,
    "health_check_interval": 30,
    # A primary that vanishes without closing the connection (a dead host in a failover) must not hang a publish.
    "socket_timeout": 30,
    # A sentinel:// broker: the master's name and the sentinels' own password (celery #6551, #7997).
    **settings.sentinel_transport_options(settings.broker_url),
}

# sentinel:// brokers use kombu's Sentinel transport with a fix for workers that died in a failover (see
# orchestrator/broker.py: without it the drill in tests/test_sentinel.py ends one or both workers).
use_fleet_sentinel_transport()

# The result backend reads its own options, and beat and the CLI load it too: a sentinel:// backend without
# `master_name` fails in every process that touches it.
result_transport_options = {"socket_connect_timeout": 5, "health_check_interval": 30,
                            **settings.sentinel_transport_options(settings.result_backend_url)}


class FleetControl(Control):  # type: ignore[misc]
    """Celery's remote control, plus: the killswitch and kill requests are persisted before the broadcast."""

    def broadcast(self, command: str, arguments: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Persist a stop first (so a worker that misses the broadcast still sees it), then broadcast."""
        if command in ("killswitch", "kill_agent"):
            from orchestrator.fleet import Fleet
            from orchestrator.killswitch import Killswitch, kill

            fleet = Fleet.create(settings)
            arguments = dict(arguments or {})
            if command == "killswitch":
                Killswitch(fleet.r, fleet.keys).engage(str(arguments.get("reason") or "celery control"),
                                                       by="celery control", running=fleet.budget.running())
            elif arguments.get("agent_id"):
                kill(fleet, str(arguments["agent_id"]), str(arguments.get("reason") or "killed by operator"))
        return super().broadcast(command, arguments, *args, **kwargs)


app = Celery("orchestrator", broker=settings.broker_url, backend=settings.result_backend_url,
             control=FleetControl, include=["workers.tasks", "workers.signals"])

app.conf.update(
    broker_transport_options=transport_options,
    # The result backend's own pub/sub and connection settings: same visibility rules, explicit timeouts.
    result_backend_transport_options=result_transport_options,
    broker_connection_retry_on_startup=True,
    # A result the backend could not store while Valkey was away is retried, not lost.
    result_backend_always_retry=True,
    result_backend_max_retries=120,
    # JSON only: the coordinator does not import us, and pickle from a shared broker is remote code execution.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    # Late acks: a message is acknowledged only when its run ends, so a worker that dies mid-run does not lose
    # it; the run lease makes a redelivered copy harmless.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One agent per pool process at a time: a process never holds a second agent message it cannot start.
    worker_prefetch_multiplier=1,
    # A broker blip must not cancel agents that are mid-run.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # Flower and `celery events` need task events; STARTED shows which agents are running.
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    # Results (and the coordinator's view of them) are kept for a week.
    result_expires=7 * 24 * 3600,
    result_extended=True,
    # Agents go to `agents`, housekeeping to `ops`, so a flood of agents cannot starve the health sweep.
    task_queues=[Queue(q, Exchange(q), routing_key=q) for q in (AGENTS_QUEUE, OPS_QUEUE)],
    task_default_queue=AGENTS_QUEUE,
    task_routes={SPAWN_TASK: {"queue": AGENTS_QUEUE}, "orchestrator.ops.*": {"queue": OPS_QUEUE}},
    task_default_priority=0,
    # The agent loop enforces time itself (and commits work); Celery's hard limit is only a backstop.
    task_time_limit=int(settings.max_task_duration_minutes * 60) + 1800,
    worker_hijack_root_logger=False,
    timezone=settings.timezone,
    enable_utc=True,
    beat_schedule=build_schedule(settings),
)

def celery_priority(spec_priority: int | None) -> int:
    """Spec priority 0-9 (higher first; 5 when unset) as a kombu Redis priority (0 first)."""
    value = 5 if spec_priority is None else int(spec_priority)
    return 9 - max(0, min(9, value))


def enqueue_run(store: Any, agent_id: str) -> None:
    """Send an agent's run message to ``agents`` at its spec's priority, under its original Celery task id."""
    rec = store.get(agent_id)
    if rec is None:
        raise LookupError(f"agent {agent_id} has no record")
    app.send_task(SPAWN_TASK, kwargs={"spec": rec["spec"], "run_agent_id": agent_id},
                  task_id=rec.get("celery_task_id"), queue=AGENTS_QUEUE, priority=celery_priority(rec.get("priority")))


# Custom remote-control commands must be registered in every process that loads the app, the `celery control`
# CLI included, or it refuses them as unknown.
import workers.control  # noqa: E402, F401
