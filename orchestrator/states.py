"""Agent states (CONTRACT sections 2 and 4), without pydantic so the operator's path stays light."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Agent states: the live ones and the final statuses of CONTRACT section 2."""

    QUEUED = "queued"
    RUNNING = "running"
    HELD = "held"
    RECOVERING = "recovering"
    COMPLETED = "completed"
    PUSH_FAILED = "push_failed"
    GATES_FAILED = "gates_failed"
    FAILED = "failed"
    KILLED = "killed"
    BUDGET_EXCEEDED = "budget_exceeded"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"

    @property
    def final(self) -> bool:
        """Whether the agent has stopped (a stopped agent may still be resumed by an operator)."""
        return self not in LIVE_STATES


LIVE_STATES = frozenset({State.QUEUED, State.RUNNING, State.HELD, State.RECOVERING})
#: Final states an operator may resume from the checkpoint (``held`` is live but resumable too).
RESUMABLE_STATES = (State.KILLED, State.FAILED, State.TIMED_OUT, State.BUDGET_EXCEEDED, State.HELD)
