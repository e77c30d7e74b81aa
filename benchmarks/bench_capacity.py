"""Capacity: memory per running agent and agents per host, in the Celery pools evaluated.

One worker process tree at a time (``celery -A orchestrator worker -P <pool> -c <n>``) runs ``n`` agents whose model
turn streams slowly (the offline model in its own process), so every agent is mid-call when the tree is measured.
Memory is PSS (proportional set size: a page shared by k processes counts 1/k to each), summed over the worker's
whole process tree from ``/proc/<pid>/smaps_rollup``; RSS is shown too. The figures:

* **MiB per running agent**: (PSS with ``n`` agents running) / ``n``, everything included (the main process too);
* **idle tree**: the worker's PSS before any agent runs;
* **agents per 4 GiB host**: ``(4096 - idle) / marginal``, with the marginal cost of one more running agent from
  the same run ((PSS running - PSS idle) / n).

The baseline is the prefork pool (one process per agent), which is what the fleet ran before: 74 MiB PSS per
running agent measured with 16 agents before the agent stack was preloaded and frozen in the parent (see
``workers/signals.py``). ``--quick`` runs 8 prefork agents and 32 threaded ones; a full run 16 and 100.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.harness import Benchmark, Harness, ModelServer, Row, median
from orchestrator.keys import Keys
from orchestrator.lifecycle import AdmitParams, Lifecycle
from orchestrator.settings import STATE_DB
from orchestrator.testing.cluster import Proc
from orchestrator.testing.offline_model import Script, Turn
from orchestrator.workspace import Workspace

NAME = "capacity"
SLOW = "bench-capacity-slow"
HOST_MIB = 4096


@dataclass
class Footprint:
    """One pool at one size."""

    pool: str
    agents: int
    processes: int
    idle_pss_mib: float
    pss_mib: float
    rss_mib: float

    @property
    def per_agent(self) -> float:
        """PSS of the whole tree per running agent."""
        return self.pss_mib / self.agents

    @property
    def marginal(self) -> float:
        """What one more running agent adds."""
        return max(0.01, (self.pss_mib - self.idle_pss_mib) / self.agents)

    @property
    def per_host(self) -> int:
        """Running agents that fit a host of ``HOST_MIB`` MiB (PSS)."""
        return int((HOST_MIB - self.idle_pss_mib) / self.marginal)


def _kib(pid: int, field: str, path: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def _tree(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    found = [pid]
    for child in out:
        found += _tree(int(child))
    return found


def _pss(pids: Sequence[int]) -> float:
    return sum(_kib(p, "Pss:", "smaps_rollup") for p in pids) / 1024


def _rss(pids: Sequence[int]) -> float:
    return sum(_kib(p, "VmRSS:", "status") for p in pids) / 1024


def _measure(h: Harness, model: ModelServer, pool: str, agents: int) -> Footprint:
    env = h.env(model.url, max_concurrent_agents=10_000, heartbeat_interval_seconds=5)
    name = f"cap-{pool}-{agents}"
    argv = [sys.executable, "-m", "celery", "-A", "orchestrator", "worker", "-P", pool, "-c", str(agents),
            "-Q", "agents", "-n", f"{name}@%h", "--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    with h.started(lambda: Proc(argv, env=env, log_path=h.tmp / f"{name}.log")) as worker:
        worker.wait_for_log(" ready.", 120)
        time.sleep(1.0)
        idle = _pss(_tree(worker.pid))
        repo = h.sample_repo(name)
        results = [h.send({"task_id": h.unique(name), "prompt": f"[[script:{SLOW}]] go", "repo": str(repo)})
                   for _ in range(agents)]
        try:
            h.wait_for(lambda: model.open_streams() >= agents, 300, f"{agents} agents streaming")
            time.sleep(1.0)
            pids = _tree(worker.pid)
            footprint = Footprint(pool, agents, len(pids), idle, _pss(pids), _rss(pids))
        finally:
            h.forget(results)
            worker.stop()
    h.flush_fleet_state()
    model.reset()
    return footprint


def bench_capacity(h: Harness) -> list[Row]:
    """PSS per running agent and agents per 4 GiB host: prefork (one process per agent) vs threads."""
    sizes = {"prefork": 8 if h.quick else 16, "threads": 32 if h.quick else 100}
    scripts = {SLOW: Script([Turn([{"type": "text", "text": "waiting " * 200}], chunk_delay=20.0)])}
    found: dict[str, Footprint] = {}
    with h.model_server(scripts) as model:
        for pool, agents in sizes.items():
            found[pool] = _measure(h, model, pool, agents)
    prefork, threads = found["prefork"], found["threads"]
    rows = []
    for fp in (prefork, threads):
        note = (f"{fp.agents} agents running in {fp.processes} process(es): {fp.pss_mib:.0f} MiB PSS, "
                f"{fp.rss_mib:.0f} MiB RSS; idle tree {fp.idle_pss_mib:.0f} MiB")
        base = None if fp is prefork else prefork.per_agent
        rows.append(Row(NAME, f"{fp.pool}: MiB PSS per running agent", fp.per_agent, "MiB",
                        "prefork" if base is not None else None, base, note=note))
        rows.append(Row(NAME, f"{fp.pool}: MiB RSS per running agent", fp.rss_mib / fp.agents, "MiB"))
        rows.append(Row(NAME, f"{fp.pool}: running agents per {HOST_MIB // 1024} GiB host (PSS)", fp.per_host,
                        "agents", "prefork" if fp is not prefork else None,
                        prefork.per_host if fp is not prefork else None,
                        note=f"marginal {fp.marginal:.2f} MiB per agent"))
    return rows


def bench_checkpoint(h: Harness) -> list[Row]:
    """What a host-independent checkpoint costs per turn: the worktree snapshot (git) and its write to Valkey."""
    runs = 20 if h.quick else 60
    repo = str(h.sample_repo("checkpoint"))
    ws = Workspace(h.tmp / "checkpoint-ws")
    wt = ws.prepare("cp-agent", repo, "main", "agent/cp-agent")
    for i in range(50):  # a worktree with some files and a committed round, as a few turns in
        (wt.path / f"module_{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    ws.commit(wt, "round", "agent", "agent@agents", "main")
    keys = Keys(f"bench:checkpoint:{h.run_id}:")
    with h.valkey.client(STATE_DB) as r:
        life = Lifecycle(r, keys, AdmitParams(60, 600, 10**6, True, 3))
        agent_id, _, _ = life.create({"task_id": "cp", "state": "queued", "spec": {}, "recoveries": 0}, "cp")
        fence = life.admit(agent_id, "bench", "bench", priority=5, duration_seconds=3600).fence
        transcript = {"messages": [{"role": "user", "content": "x" * 20_000}], "turns": 10}
        plain: list[float] = []
        changed: list[float] = []
        unchanged: list[float] = []
        fingerprints: list[float] = []
        sizes: list[int] = []
        previous: str | None = None
        for i in range(runs):
            t0 = time.perf_counter()
            life.save(agent_id, fence, transcript, turns=i)
            plain.append(time.perf_counter() - t0)
            (wt.path / "module_0.py").write_text(f"changed {i}\n")  # a tool changed a file
            t0 = time.perf_counter()
            snap = ws.snapshot(wt, "cp-agent", "main", previous=previous)
            assert snap is not None
            life.save(agent_id, fence, transcript, snapshot=base64.b64encode(snap.bundle).decode(), turns=i)
            changed.append(time.perf_counter() - t0)
            sizes.append(len(snap.bundle))
            previous = snap.key
            t0 = time.perf_counter()
            assert ws.snapshot(wt, "cp-agent", "main", previous=previous) is None  # nothing changed since
            unchanged.append(time.perf_counter() - t0)
            before = ws.fingerprint(wt)
            t0 = time.perf_counter()
            assert ws.fingerprint(wt) == before  # what a turn whose tools changed no file pays: no git at all
            fingerprints.append(time.perf_counter() - t0)
    note = f"bundle {median([float(x) for x in sizes]) / 1024:.1f} KiB (50 files, 1 agent commit)"
    return [
        Row(NAME, "checkpoint after tools that changed files: snapshot + save", median(changed) * 1000, "ms",
            "transcript-only save", median(plain) * 1000, note=note),
        Row(NAME, "checkpoint after tools that changed no file: fingerprint", median(fingerprints) * 1000, "ms",
            "transcript-only save", median(plain) * 1000, note="what such a turn pays: a stat walk, no git"),
        Row(NAME, "  git check when only ignored files changed", median(unchanged) * 1000, "ms",
            "transcript-only save", median(plain) * 1000, note="temporary index + write-tree; no bundle, no write"),
    ]


BENCHMARKS = [Benchmark(NAME, "memory per running agent and agents per host: prefork vs threads pool",
                        bench_capacity),
              Benchmark("checkpoint", "host-independent checkpoint cost per turn (worktree snapshot)",
                        bench_checkpoint)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run only this benchmark (``python -m benchmarks.bench_capacity [--quick]``)."""
    from benchmarks.__main__ import main as run

    args = list(argv if argv is not None else sys.argv[1:])
    return run(["--only", NAME, *args])


if __name__ == "__main__":
    sys.exit(main())

