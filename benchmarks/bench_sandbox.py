"""What the sandbox adds to every agent command: ``python -m benchmarks.bench_sandbox [--runs N]``, or as benchmark
``sandbox`` of ``python -m benchmarks``.

Per-command wall time (median and p99 over ``--runs`` runs, after a warm-up) of:

* ``subprocess.run(["bash", "-c", "true"])``: the baseline;
* ``Toolbox.run_shell("true")`` without a sandbox (own process group, output capture, pidfd exit watch);
* ``Toolbox.run_shell("true")`` through ``Sandbox`` (bubblewrap) with the limits backend this host picks
  (``limits_backend()``), and with ``rlimit`` forced when that differs;

and, per sandboxed row, the time added over the unsandboxed toolbox. The worktree is a temporary directory; the
environment is ``safe_env()`` (so the toolchains on this process's ``PATH`` are exposed, as for a real agent).

In ``python -m benchmarks`` it also runs the same scripted agent (``bash`` turns) through a real worker with the
sandbox on and with ``ORCHESTRATOR_SANDBOX=off``: turns per second, on against off.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.bench_foundation import WARM, _fleet_run, reps, tool_turns, turns_script
from benchmarks.harness import Benchmark, Harness, Row, median, percentile
from orchestrator.agent.tools import Toolbox, safe_env
from orchestrator.sandbox import Sandbox, SandboxConfig, check_available, limits_backend

WARMUP = 10


def _measure(step: Callable[[], object], runs: int) -> list[float]:
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def _p99(times: Sequence[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]


def _toolbox_step(box: Toolbox) -> Callable[[], object]:
    def step() -> object:
        outcome = box.run_shell("true")
        if outcome.exit_code != 0:
            raise RuntimeError(f"`true` failed: {outcome}")
        return outcome

    return step


def _command_rows(runs: int) -> list[tuple[str, list[float]]]:
    """Per-command wall times of every case (seconds)."""
    backend = limits_backend()
    configs = [(f"sandbox ({backend} limits)", SandboxConfig())]
    if backend != "rlimit":
        configs.append(("sandbox, rlimit forced", SandboxConfig(limits="rlimit")))
    for _, config in configs:
        check_available(config)
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        worktree = Path(tmp)
        env = safe_env()
        rows.append(("bash -c true (subprocess.run)", _measure(
            lambda: subprocess.run(["bash", "-c", "true"], check=True), runs)))
        rows.append(("Toolbox.run_shell, no sandbox", _measure(_toolbox_step(Toolbox(worktree, env=env)), runs)))
        for label, config in configs:
            box = Toolbox(worktree, env=env, sandbox=Sandbox(config, worktree, env))
            rows.append((f"Toolbox.run_shell, {label}", _measure(_toolbox_step(box), runs)))
    return rows


def bench_sandbox(h: Harness) -> list[Row]:
    """Per-command overhead of the sandbox vs no sandbox; turns/s of a scripted agent with the sandbox vs off."""
    rows = _command_rows(100 if h.quick else 300)
    base = rows[1][1]
    out = []
    for label, times in rows[2:]:
        out.append(Row(NAME, f"{label}: per command, median", median(times) * 1000, "ms",
                       "no sandbox", median(base) * 1000,
                       note=f"+{(median(times) - median(base)) * 1000:.1f} ms (goal: under +15 ms)"))
        out.append(Row(NAME, f"{label}: per command, p99", percentile(times, 99) * 1000, "ms",
                       "no sandbox", percentile(base, 99) * 1000,
                       note=f"+{(percentile(times, 99) - percentile(base, 99)) * 1000:.1f} ms"))
    n = tool_turns(h)
    script = f"bench-turns-{n}"
    rates: dict[str, list[float]] = {"bwrap": [], "off": []}
    with h.model_server({script: turns_script(n), WARM: turns_script(3)}) as model:
        for mode in ("bwrap", "off"):
            repo = h.sample_repo(f"sandbox-turns-{mode}")
            with h.worker(model.url, name=f"sandbox-{mode}", concurrency=1, sandbox=mode):
                _fleet_run(h, model, repo, WARM, 10)
                for _ in range(reps(h)):
                    run = _fleet_run(h, model, repo, script, n + 10)
                    rates[mode].append(run.turns / run.seconds)
    out.append(Row(NAME, "scripted agent through a worker, sandbox on", median(rates["bwrap"]), "turns/s",
                   "ORCHESTRATOR_SANDBOX=off", median(rates["off"]), note=f"{n} bash turns + 1 text turn per run"))
    return out


NAME = "sandbox"
BENCHMARKS = [Benchmark(NAME, "what bubblewrap adds per command and per agent turn", bench_sandbox)]


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    runs: int = args.runs
    backend = limits_backend()
    rows = _command_rows(runs)

    base_median = statistics.median(rows[1][1])
    base_p99 = _p99(rows[1][1])
    print(f"sandbox overhead per command, {runs} runs each; limits backend here: {backend}")
    header = f"{'case':<44} {'median ms':>10} {'p99 ms':>9} {'x baseline':>11} {'added median':>13} {'added p99':>10}"
    print(header)
    print("-" * len(header))
    baseline = statistics.median(rows[0][1])
    for index, (label, times) in enumerate(rows):
        median, p99 = statistics.median(times), _p99(times)
        added = f"{(median - base_median) * 1000:+.2f}" if index >= 2 else ""
        added_p99 = f"{(p99 - base_p99) * 1000:+.2f}" if index >= 2 else ""
        print(f"{label:<44} {median * 1000:>10.2f} {p99 * 1000:>9.2f} {median / baseline:>10.2f}x "
              f"{added:>13} {added_p99:>10}")
    print("(added = over 'Toolbox.run_shell, no sandbox')")


if __name__ == "__main__":
    main()
