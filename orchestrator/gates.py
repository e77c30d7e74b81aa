"""Quality gates: shell commands run in the worktree after the agent, in order, each in its own process group
with a timeout, an output cap and an environment without secrets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from orchestrator.agent.loop import StopSignal
from orchestrator.agent.tools import Toolbox
from orchestrator.models import GateResult, GateSpec

GATE_OUTPUT_LIMIT = 64_000
TAIL_CHARS = 4000


def run_gates(gates: Sequence[GateSpec], worktree: Path, attempt: int, stop: StopSignal | None = None,
              toolbox: Toolbox | None = None) -> list[GateResult]:
    """Run every gate once, in order; a stop request ends the round early (the loop raises on it)."""
    box = toolbox or Toolbox(worktree, output_limit=GATE_OUTPUT_LIMIT)
    results = []
    for gate in gates:
        if stop is not None:
            stop.check()
        outcome = box.run_shell(gate.command, timeout=gate.timeout_seconds)
        tail = outcome.output[-TAIL_CHARS:]
        if outcome.timed_out:
            tail += f"\n[gate timed out after {gate.timeout_seconds}s and was killed]"
        elif outcome.start_error:
            tail = outcome.start_error
        results.append(GateResult(
            name=gate.name, passed=outcome.exit_code == 0 and not outcome.timed_out and not outcome.killed,
            exit_code=None if outcome.timed_out else outcome.exit_code,
            duration_seconds=round(outcome.duration_seconds, 3), output_tail=tail, attempt=attempt,
        ))
    if stop is not None:
        stop.check()
    return results


def gate_feedback(results: Sequence[GateResult]) -> str:
    """The message that sends failed gates back to the agent for a repair round."""
    parts = ["The quality gates failed. Fix the problems, then end your turn."]
    for r in results:
        if not r.passed:
            parts.append(f"\n## Gate `{r.name}` failed (exit code {r.exit_code})\n```\n{r.output_tail[-2000:]}\n```")
    return "\n".join(parts)
