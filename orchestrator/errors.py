"""The fleet's error tree, grouped by what the caller should do: stop the run, or stop writing."""

from __future__ import annotations

from orchestrator.states import State


class FleetError(Exception):
    """Root of the fleet's own errors."""


class StopRun(FleetError):
    """The run must end now with ``status``; its work so far is kept."""

    def __init__(self, status: State, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class StaleFence(FleetError):
    """This process no longer owns the agent: another run took over; it must not write anything."""
