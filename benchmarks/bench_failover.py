"""Failover: from the Valkey primary's death to the fleet working again, through Sentinel.

A primary, a replica and three sentinels on loopback (``SentinelGroup``, ``down-after-milliseconds`` 1000), two
prefork workers and beat on the sentinel URLs, four agents in a 2 s shell command. The primary is SIGKILLed; the
figures are the times from the kill to: the sentinels naming the new primary, the fleet's next model request, and
every agent's result at the coordinator. The baseline is the sentinels' detection delay (``down-after``): no client
can act before the sentinels agree the primary is gone.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from benchmarks.harness import Benchmark, Harness, Row, median
from orchestrator.testing.cluster import Beat, SentinelGroup, Worker, close_coordinator, fleet_env, wait_until
from orchestrator.testing.offline_model import Script, bash, text_turn

NAME = "failover"
DOWN_AFTER_MS = 1000


def _drill(h: Harness, run: int) -> tuple[float, float, float]:
    group = SentinelGroup(root=h.tmp / f"ha-{run}", down_after_ms=DOWN_AFTER_MS)
    script = f"bench-failover-{run}"
    procs: list[Worker | Beat] = []
    coordinator: Celery | None = None
    try:
        with h.offline_model({script: Script([bash("sleep 2; echo one > one.txt"), bash("echo two > two.txt"),
                                              text_turn("done")])}) as model:
            env = fleet_env(group.url(0), h.tmp / f"ws-failover-{run}", model.url, heartbeat_interval_seconds=0.5,
                            heartbeat_timeout_seconds=15, health_sweep_interval_seconds=1)
            procs = [Worker(env, f"fo{run}-{i}@%h", concurrency=2, log_path=h.tmp / f"failover-{run}-{i}.log")
                     for i in (1, 2)]
            procs.append(Beat(env, log_path=h.tmp / f"failover-{run}-beat.log"))
            for w in procs[:2]:
                w.wait_ready()  # type: ignore[union-attr]
            options: dict[str, Any] = {"master_name": "mymaster"}
            coordinator = Celery(broker=group.url(0), backend=group.url(1))
            coordinator.conf.update(broker_transport_options=options, result_backend_transport_options=options,
                                    result_backend_always_retry=True, result_expires=3600)
            repo = h.sample_repo(f"failover-{run}")
            pending = [coordinator.send_task("orchestrator.spawn_agent", queue="agents", kwargs={"spec": {
                "task_id": h.unique("failover"), "prompt": f"[[script:{script}]] go", "repo": str(repo)}})
                for _ in range(4)]
            wait_until(lambda: len({c.agent for c in model.calls() if c.turn == 0 and c.status == "completed"}) == 4,
                       60, "four agents in their command")
            old = group.primary
            killed = time.time()
            group.kill_primary()
            group.wait_failover(old.port)
            promoted = time.time() - killed
            wait_until(lambda: any(c.started_at > killed for c in model.calls()), 60, "the next model request")
            next_request = min(c.started_at for c in model.calls() if c.started_at > killed) - killed
            results = [p.get(timeout=120) for p in pending]
            done = time.time() - killed
            if [r["status"] for r in results] != ["completed"] * 4:
                raise RuntimeError(f"not every agent completed through the failover: {results}")
            return promoted, next_request, done
    finally:
        if coordinator is not None:
            close_coordinator(coordinator)
        for p in procs:
            p.stop()
        group.stop()


def bench_failover(h: Harness) -> list[Row]:
    """SIGKILL the Valkey primary under four running agents: new primary, next model request, all results."""
    drills = [_drill(h, i) for i in range(1 if h.quick else 3)]
    floor = DOWN_AFTER_MS
    note = f"{len(drills)} drill(s): " + "; ".join(f"{a:.1f}/{b:.1f}/{c:.1f} s" for a, b, c in drills)
    return [
        Row(NAME, "primary SIGKILLed -> sentinels name the new primary", median([d[0] for d in drills]) * 1000, "ms",
            "sentinel down-after", floor, note=note + " (promoted/next request/all done)"),
        Row(NAME, "primary SIGKILLed -> the fleet's next model request", median([d[1] for d in drills]) * 1000, "ms",
            "sentinel down-after", floor, note="4 agents mid-command on 2 prefork workers"),
        Row(NAME, "primary SIGKILLed -> every result at the coordinator", median([d[2] for d in drills]) * 1000, "ms",
            "sentinel down-after", floor, note="each agent still had 2 turns to run"),
    ]


BENCHMARKS = [Benchmark(NAME, "Valkey primary killed under running agents: time to working again", bench_failover)]
