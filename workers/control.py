"""Remote-control commands: ``celery -A orchestrator control killswitch [REASON]`` and ``kill_agent AGENT_ID``.

Each worker that receives the broadcast makes sure the state is persisted and publishes the stop to its agents.
The sending side (``orchestrator.celery.FleetControl``) persists the state before it broadcasts, so the stop
holds even for workers that miss the broadcast.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command

from orchestrator.fleet import Fleet
from orchestrator.killswitch import Killswitch, kill


@control_command(args=[("reason", str)], signature="[REASON]")
def killswitch(state: Any, reason: str = "celery control") -> dict[str, Any]:
    """Engage the fleet killswitch: every agent stops, new work is held."""
    fleet = Fleet.create()
    status = Killswitch(fleet.r, fleet.keys).engage(reason, by=f"celery control via {state.consumer.hostname}")
    return {"ok": "killswitch engaged", "status": status}


@control_command(args=[("agent_id", str), ("reason", str)], signature="AGENT_ID [REASON]")
def kill_agent(state: Any, agent_id: str, reason: str = "killed by operator") -> dict[str, Any]:
    """Stop one agent wherever it runs."""
    outcome = kill(Fleet.create(), agent_id, reason)
    return {"ok": f"kill requested for agent {agent_id}: {outcome}"}
