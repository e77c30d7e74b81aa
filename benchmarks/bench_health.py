"""Health benchmarks: how fast a dead worker's agent runs again, and what the health sweep costs.

* ``recovery``: a worker is SIGKILLed (its whole process group) while its agent streams a model turn; the figure
  is the time from the kill to that agent's next model request, made from another worker, against the bound the
  settings promise: ``heartbeat_timeout_seconds + health_sweep_interval_seconds`` (3 s + 1 s here; heartbeats
  every 0.5 s; beat running). The doomed worker consumes only ``agents``; the survivor consumes ``ops`` (the
  sweeps) and is told to consume ``agents`` too (``app.control.add_consumer``) just before the kill, so the agent
  starts on the doomed worker and can only resume on the survivor. The agent's ``recovering`` event splits the
  time into detection (the sweep) and re-dispatch.
* ``sweep``: ``orchestrator.ops.health_sweep(fleet, now=...)`` in this process against the run's Valkey, with
  100, 1,000 and 10,000 agent records and heartbeats of which 5 are stale; then 10,000 with none stale and with
  100 stale. Median of several sweeps; the stale agents are made stale again before each one.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import socket
import time
from datetime import datetime
from typing import Any

from benchmarks.harness import Benchmark, Harness, ModelServer, Row, median
from orchestrator.fleet import Fleet
from orchestrator.keys import Keys
from orchestrator.ops import health_sweep
from orchestrator.settings import STATE_DB, Settings
from orchestrator.store import AgentStore
from orchestrator.testing.cluster import Worker
from orchestrator.testing.offline_model import Script, Turn, bash, text_turn

FAST = {"heartbeat_interval_seconds": 0.5, "heartbeat_timeout_seconds": 3, "health_sweep_interval_seconds": 1}
BOUND_SECONDS = FAST["heartbeat_timeout_seconds"] + FAST["health_sweep_interval_seconds"]
FIVE = "bench-health-five"
SLOW = "x" * 600
SCRIPTS = {FIVE: Script([
    bash("echo a > a.txt"), bash("echo b > b.txt"),
    # The third turn streams for about 2 s; the worker dies 0.2 s into it (and the survivor asks for it again).
    Turn([{"type": "text", "text": SLOW}, {"type": "tool_use", "name": "bash", "input": {"command": "echo c > c.txt"}}],
         chunk_delay=0.15),
    bash("echo d > d.txt"), text_turn("done"),
])}


def _node(worker: Worker) -> str:
    """The worker's node name as the broadcast addresses it (``%h`` is the host name)."""
    return worker.name.replace("%h", socket.gethostname())


def _streaming(model: ModelServer, agent_id: str, turn: int) -> bool:
    return any(c.get("agent") == agent_id and c.get("turn") == turn and c.get("status") == "open"
               for c in model.calls(agent_id))


def _recover_once(h: Harness, model: ModelServer, survivor: Worker, repo: str) -> tuple[float, float, float]:
    """One SIGKILL mid-stream: (kill -> next model request, kill -> recovering event, longest gap between sweeps
    meanwhile) in seconds."""
    keys = Keys("orch:")
    control = h.coordinator.control
    with h.started(lambda: h.queue_worker(model.url, "doomed", 1, "agents", **FAST)) as doomed:
        doomed.wait_ready()
        task_id = h.unique("health")
        result = h.send({"task_id": task_id, "prompt": f"[[script:{FIVE}]] go", "repo": repo})
        try:
            with h.valkey.client(STATE_DB) as r:
                agent_id = str(h.wait_for(lambda: r.get(keys.task_index(task_id)), 30, "the agent id"))
                store = AgentStore(r, keys)
                h.wait_for(lambda: _streaming(model, agent_id, 2), 60, "the third turn to stream")
                control.add_consumer("agents", destination=[_node(survivor)], reply=True, timeout=5)
                time.sleep(0.2)
                killed_at = time.time()
                doomed.signal(signal.SIGKILL)  # the whole process group: main process and pool child

                def resumed() -> float | None:
                    later = [float(c["started_at"]) for c in model.calls(agent_id) if c["started_at"] > killed_at]
                    return min(later) if later else None

                next_call = float(h.wait_for(resumed, 30, "the agent's next model request"))
                out: dict[str, Any] = result.get(timeout=60)
                if out.get("status") != "completed" or not str(out.get("worker")).startswith("survivor"):
                    raise RuntimeError(f"the agent did not complete on the survivor: {out!r}")
                recovering = [datetime.fromisoformat(e["at"]).timestamp() for e in store.events(agent_id)
                              if e["kind"] == "recovering"]
                if not recovering:
                    raise RuntimeError(f"no recovering event for agent {agent_id}")
        finally:
            control.cancel_consumer("agents", destination=[_node(survivor)], reply=True, timeout=5)
            h.forget([result])
    return next_call - killed_at, recovering[0] - killed_at, _sweep_gap(survivor, killed_at, recovering[0])


_SWEEP_RECEIVED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] "
                             r"celery\.worker\.strategy: Task orchestrator\.ops\.health_sweep\[")


def _sweep_gap(survivor: Worker, start: float, end: float) -> float:
    """The longest time without a sweep arriving at the survivor between ``start`` and ``end`` (its log)."""
    arrivals = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                for m in map(_SWEEP_RECEIVED.match, survivor.log().splitlines()) if m]
    points = [start, *(t for t in arrivals if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(points))


def bench_recovery(h: Harness) -> list[Row]:
    """Worker SIGKILLed mid-run -> the agent's next model request on another worker, vs the configured bound."""
    reps = 1 if h.quick else 4
    h.fresh_state()
    repo = str(h.sample_repo("health"))
    totals: list[float] = []
    detect: list[float] = []
    gaps: list[float] = []
    with h.model_server(SCRIPTS) as model, \
            h.started(lambda: h.queue_worker(model.url, "survivor", 1, "ops", **FAST)) as survivor, \
            h.beat(**FAST):
        survivor.wait_ready()
        for _ in range(reps):
            total, detected, gap = _recover_once(h, model, survivor, repo)
            totals.append(total)
            detect.append(detected)
            gaps.append(gap)
            h.log(f"recovery: next request {total * 1000:.0f} ms after the kill (recovering at {detected * 1000:.0f} "
                  f"ms; longest gap between sweeps meanwhile {gap * 1000:.0f} ms)")
    bound = BOUND_SECONDS * 1000
    ms = [x * 1000 for x in totals]
    redispatch = [(t - d) * 1000 for t, d in zip(totals, detect, strict=True)]
    label = (f"bound: heartbeat timeout {FAST['heartbeat_timeout_seconds']:g} s + sweep interval "
             f"{FAST['health_sweep_interval_seconds']:g} s")
    name = "worker death"
    return [
        Row(name, "SIGKILL -> next model request elsewhere, median", median(ms), "ms", label, bound,
            f"{reps} kills mid-stream; heartbeats every {FAST['heartbeat_interval_seconds']:g} s; beat running"),
        Row(name, "SIGKILL -> next model request elsewhere, max", max(ms), "ms", label, bound,
            ("within the bound" if max(ms) <= bound else "OVER the bound") + "; longest gap between sweeps at the "
            f"survivor while detecting: {max(gaps) * 1000:.0f} ms"),
        Row(name, "  of which SIGKILL -> sweep marks it recovering", median(detect) * 1000, "ms",
            note="median; the heartbeat must age past the timeout, then the next sweep finds it"),
        Row(name, "  of which recovering -> next model request", median(redispatch), "ms",
            note="median; re-enqueue, lease, worktree, checkpoint, reserve"),
    ]


# ---------------------------------------------------------------------------------------------- sweep


def _seed(fleet: Fleet, total: int, stale: int, now: float) -> list[str]:
    """``total`` running agents with records, heartbeats and deadlines; the first ``stale`` have old heartbeats."""
    keys = fleet.keys
    ids = [f"agent-{i:05d}" for i in range(total)]
    pipe = fleet.r.pipeline(transaction=False)
    for i, agent_id in enumerate(ids):
        pipe.hset(keys.agent(agent_id), mapping={
            "agent_id": json.dumps(agent_id), "task_id": json.dumps(f"task-{i}"), "state": '"running"',
            "worker": '"w1@host"', "turns": "3", "recoveries": "0", "spec": json.dumps({"metadata": {}})})
        pipe.zadd(keys.heartbeats, {agent_id: now - (300 if i < stale else 5)})
        pipe.zadd(keys.deadlines, {agent_id: now + 3600})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    return ids[:stale]


def _restale(fleet: Fleet, stale: list[str], now: float) -> None:
    """Make the stale agents stale and running again, as before the first sweep; the sweeps have seen Valkey
    for an hour (else the sweep first gives every worker a timeout to beat again, see ops.visible_since)."""
    pipe = fleet.r.pipeline(transaction=False)
    pipe.hset(fleet.keys.sweep_state, mapping={"last": str(now - 1), "since": str(now - 3600)})
    for agent_id in stale:
        pipe.zadd(fleet.keys.heartbeats, {agent_id: now - 300})
        pipe.hset(fleet.keys.agent(agent_id), mapping={"state": '"running"', "recoveries": "0"})
    pipe.execute()


def bench_sweep(h: Harness) -> list[Row]:
    """``health_sweep`` run time for 100 to 10,000 agent records: it grows with stale agents, not all agents."""
    runs = 3 if h.quick else 9
    cases = [(100, 5), (1_000, 5), (10_000, 5), (10_000, 0), (10_000, 100)]
    results: dict[tuple[int, int], list[float]] = {case: [] for case in cases}
    fleets: dict[tuple[int, int], tuple[Fleet, list[str], list[str]]] = {}
    r = h.valkey.client(STATE_DB)
    quiet = logging.getLogger("orchestrator.ops")  # one warning per recovered agent
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    now = time.time()
    try:
        for total, stale in cases:  # every case seeded first (its own key prefix), then swept in turn
            settings = Settings(broker_url=h.valkey.url, workspace_dir=h.tmp / "sweep-ws", _env_file=None,
                                key_prefix=f"bench:sweep:{h.run_id}:{total}:{stale}:", heartbeat_timeout_seconds=60)
            enqueued: list[str] = []
            fleet = Fleet.create(settings, r=r, enqueue=enqueued.append)
            fleets[(total, stale)] = (fleet, _seed(fleet, total, stale, now), enqueued)
            _restale(fleet, [], now)
            health_sweep(fleet, now=now)  # warm: Lua scripts loaded, connection up
        for _ in range(runs):
            for case, (fleet, stale_ids, enqueued) in fleets.items():  # interleaved, so drift hits every case
                _restale(fleet, stale_ids, now)
                enqueued.clear()
                start = time.perf_counter()
                report = health_sweep(fleet, now=now)
                results[case].append((time.perf_counter() - start) * 1000)
                if sorted(report["recovered"]) != stale_ids or sorted(enqueued) != stale_ids:
                    raise AssertionError(f"sweep {case} recovered {len(report['recovered'])} agents")
    finally:
        quiet.setLevel(level)
        for fleet, _, _ in fleets.values():
            h.flush_fleet_state(fleet.keys.prefix)
        r.close()
    base = median(results[(100, 5)])
    rows = []
    for (total, stale), times in results.items():
        rows.append(Row("health sweep", f"{total:,} records, {stale} stale", median(times), "ms",
                        "100 records, 5 stale", base, f"median of {runs}; {min(times):.2f}-{max(times):.2f} ms"))
    per_stale = (median(results[(10_000, 100)]) - median(results[(10_000, 0)])) / 100
    rows.append(Row("health sweep", "  per stale agent recovered", per_stale, "ms",
                    note="(10,000/100 stale - 10,000/0 stale) / 100; enqueue is an in-process no-op here "
                         "(a Celery send_task in the fleet)"))
    return rows


BENCHMARKS = [
    Benchmark("recovery", "worker SIGKILLed mid-run -> the agent's next model request elsewhere vs the bound",
              bench_recovery),
    Benchmark("sweep", "health_sweep run time for 100 to 10,000 agent records vs stale agents", bench_sweep),
]
