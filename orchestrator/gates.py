"""Quality gates: shell commands run in the worktree after the agent, in order, through a :class:`Toolbox` (so in
the agent's sandbox when it has one), each with a timeout, an output cap and an environment without secrets."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from orchestrator.agent.loop import StopSignal
from orchestrator.agent.tools import Toolbox
from orchestrator.models import GateResult, GateSpec
from orchestrator.sandbox import Sandbox

GATE_OUTPUT_LIMIT = 64_000
TAIL_CHARS = 4000
_STOP_POLL_SECONDS = 0.05


@contextmanager
def _kill_on_stop(stop: StopSignal | None, box: Toolbox) -> Iterator[None]:
    """While the gates run, a stop request kills the running gate at once (and latches the toolbox's stop)."""
    if stop is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(_STOP_POLL_SECONDS):
                box.kill_running()
                return

    watcher = threading.Thread(target=watch, name="gate-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def run_gates(gates: Sequence[GateSpec], worktree: Path, attempt: int, stop: StopSignal | None = None,
              toolbox: Toolbox | None = None, *, time_left: Callable[[], float] | None = None,
              sandbox: Sandbox | None = None) -> list[GateResult]:
    """Run every gate once, in order; a stop request kills the running gate and ends the round (StopRun).

    ``toolbox`` (e.g. the run's own, so that its ``kill_running`` reaches the gates) defaults to a new one on
    ``worktree`` launching through ``sandbox``. With ``time_left``, each gate's timeout is capped by the seconds
    the run has left; a gate with no time left is not started and fails.
    """
    box = toolbox or Toolbox(worktree, output_limit=GATE_OUTPUT_LIMIT, sandbox=sandbox)
    results = []
    with _kill_on_stop(stop, box):
        for gate in gates:
            if stop is not None:
                stop.check()
            timeout = float(gate.timeout_seconds)
            if time_left is not None:
                timeout = min(timeout, time_left())
            if timeout <= 0:
                results.append(GateResult(name=gate.name, passed=False, exit_code=None, duration_seconds=0.0,
                                          output_tail="[gate not run: the run has no time left]", attempt=attempt))
                continue
            outcome = box.run_shell(gate.command, timeout=timeout)
            if stop is not None:
                stop.check()
            tail = outcome.output[-TAIL_CHARS:]
            if outcome.timed_out:
                tail += f"\n[gate timed out after {timeout:g}s and was killed]"
            elif outcome.killed:
                tail += "\n[gate was killed]"
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
