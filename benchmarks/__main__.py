"""Run the benchmarks and print one table: ``python -m benchmarks [--quick] [--only NAME]... [--json PATH]``.

Everything runs on loopback: a valkey-server, Celery prefork workers and the offline model, all started here and
stopped before exit (also on failure, Ctrl-C or SIGTERM). A full run takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from types import ModuleType

from benchmarks import (
    bench_budget,
    bench_capacity,
    bench_failover,
    bench_foundation,
    bench_health,
    bench_killswitch,
    bench_sandbox,
    bench_traffic,
)
from benchmarks.harness import Benchmark, Harness, Outcome, print_table, terminate_as_interrupt

#: Benchmark modules, in run order; each exposes ``BENCHMARKS: list[Benchmark]``. Add new modules here.
MODULES: list[ModuleType] = [bench_foundation, bench_budget, bench_killswitch, bench_health, bench_traffic,
                             bench_sandbox, bench_capacity, bench_failover]


def registry() -> list[Benchmark]:
    """Every registered benchmark, in run order."""
    found: list[Benchmark] = []
    for module in MODULES:
        found.extend(module.BENCHMARKS)
    return found


def run(benchmarks: Sequence[Benchmark], harness: Harness) -> list[Outcome]:
    """Run each benchmark; a failure is recorded in its outcome and the next one still runs."""
    outcomes = []
    for bench in benchmarks:
        harness.log(f"{bench.name}: {bench.description}")
        outcome = Outcome(bench)
        start = time.monotonic()
        try:
            outcome.rows = bench.run(harness)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            outcome.error = f"{type(exc).__name__}: {exc}"[:300]
        outcome.seconds = time.monotonic() - start
        harness.log(f"{bench.name}: {'failed' if outcome.error else 'done'} in {outcome.seconds:.1f}s")
        outcomes.append(outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the selected benchmarks, print the table; 1 if any benchmark failed."""
    benchmarks = registry()
    names = [b.name for b in benchmarks]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Run the benchmarks and print one table.")
    parser.add_argument("--quick", action="store_true", help="fewer agents, turns and repetitions")
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(names)}")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--offline-nagle", action="store_true",
                        help="keep Nagle's algorithm on the offline model's sockets (adds ~40 ms per model call)")
    args = parser.parse_args(argv)
    if args.list:
        for b in benchmarks:
            print(f"{b.name:12} {b.description}")
        return 0
    selected = [b for b in benchmarks if not args.only or b.name in args.only]

    load = os.getloadavg()[0]  # other work on the machine skews every figure: say how busy it was
    started = time.monotonic()
    with terminate_as_interrupt(), Harness(quick=args.quick, nagle=args.offline_nagle) as harness:
        outcomes = run(selected, harness)
    total = time.monotonic() - started

    mode = "quick" if args.quick else "full"
    title = (f"benchmarks: {mode} run, {date.today().isoformat()}, {os.cpu_count()} cores, load {load:.2f} at start, "
             f"{total:.0f}s"
             f"{', offline model with Nagle' if args.offline_nagle else ''} (ratio = value / baseline)")
    print_table(outcomes, title)
    if args.json:
        args.json.write_text(json.dumps({
            "mode": mode, "date": date.today().isoformat(), "cores": os.cpu_count(), "load_at_start": load,
            "seconds": round(total, 1),
            "offline_nagle": args.offline_nagle,
            "benchmarks": [{"name": o.benchmark.name, "seconds": round(o.seconds, 1), "error": o.error,
                            "rows": [r.to_json() for r in o.rows]} for o in outcomes],
        }, indent=2) + "\n")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
