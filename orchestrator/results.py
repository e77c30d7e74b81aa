"""A finished agent's result: the record fields it sets, and the outbox entry its finish writes in the same step.

Light on purpose (no agent stack): the operator's ``kill`` finishes an idle agent through here.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from orchestrator.models import AgentResult, Usage, iso, utcnow
from orchestrator.states import State

if TYPE_CHECKING:
    from orchestrator.fleet import Fleet


def callback_entry(fleet: Fleet, callback: dict[str, Any] | None,
                   result: AgentResult) -> tuple[str, str, str] | None:
    """(outbox member, item key, item JSON) of the callback a spec asked for, or None without one."""
    if not callback or not result.agent_id:
        return None
    from orchestrator.callbacks import idempotency_key

    agent_id = result.agent_id
    body = result.to_json()
    item = {"agent_id": agent_id, "callback": callback, "result": body,
            "idempotency_key": idempotency_key(agent_id, body), "attempts": 0, "created": time.time(),
            "last_error": None}
    return agent_id, fleet.keys.outbox_item(agent_id), json.dumps(item)


def result_fields(result: AgentResult) -> dict[str, Any]:
    """The record fields a final result sets."""
    data = result.to_json()
    return {"result": data, "finished_at": result.finished_at, "commit": result.commit, "error": result.error,
            "turns": result.turns, "usage": data["usage"], "worker": result.worker}


def finish_unstarted(fleet: Fleet, rec: dict[str, Any], status: State, error: str,
                     fence: str | None = None) -> AgentResult | None:
    """Give an agent that is not running its final result (killed while queued, held or waiting; given up).

    Without ``fence`` it only succeeds while no run owns the agent (None otherwise: that run stops itself).
    """
    now = iso(utcnow())
    spec = rec.get("spec") or {}
    # turns and usage as the last checkpoint has them (the record's copy is only as fresh as the last heartbeat)
    cp = fleet.store.load_checkpoint(rec["agent_id"]) or {}
    result = AgentResult(agent_id=rec["agent_id"], task_id=rec.get("task_id"), status=status, branch=rec.get("branch"),
                         commit=rec.get("commit"), turns=int(cp.get("turns", rec.get("turns")) or 0),
                         usage=Usage.model_validate(cp.get("usage", rec.get("usage")) or {}), error=error,
                         started_at=rec.get("started_at") or now, finished_at=now,
                         metadata=spec.get("metadata") or {})
    done = fleet.lifecycle.finish(rec["agent_id"], rec.get("task_id"), status, result_fields(result), fence=fence,
                                  outbox=callback_entry(fleet, spec.get("callback"), result), event=error)
    return result if done == 1 else None
