"""Budgets through real workers: hard limits never overspend, slots cap concurrency, leases come back."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash
from tests.conftest import Cluster, git, mirror_of

FINAL = {"completed", "gates_failed", "failed", "killed", "budget_exceeded", "timed_out"}


def forever(offline: OfflineModel) -> None:
    offline.add_script("forever", Script([bash("echo step >> progress.txt; echo working")], repeat_last=True))


def test_hard_agent_limit_stops_agent_within_its_tokens(cluster: Cluster, sample_repo: Path,
                                                        offline: OfflineModel) -> None:
    forever(offline)
    cluster.worker()
    result = cluster.submit({"task_id": "cap-1", "prompt": "[[script:forever]] loop", "repo": str(sample_repo),
                             "token_limit": 8_000}).get(timeout=120)
    assert result["status"] == "budget_exceeded", result
    served = offline.usage_for(result["agent_id"])["total_tokens"]
    assert 0 < served <= 8_000
    assert result["usage"]["total_tokens"] == served
    # Its work so far is committed on its branch.
    assert result["commit"] is not None
    assert "step" in git(mirror_of(cluster.workspace), "show", f"{result['commit']}:progress.txt")
    budget = cluster.cli_json("budget")
    mine = next(a for a in budget["agents"] if a["agent_id"] == result["agent_id"])
    assert mine["limit"] == 8_000 and mine["used"] == served and mine["status"] in ("at_limit", "approaching_limit")


def test_hard_daily_limit_holds_across_racing_agents_on_two_workers(cluster: Cluster, sample_repo: Path,
                                                                     offline: OfflineModel) -> None:
    forever(offline)
    daily = 30_000
    workers = [cluster.worker(f"w{i}", concurrency=2, wait=False, daily_token_limit=daily) for i in (1, 2)]
    for w in workers:
        w.wait_ready()
    pending = [cluster.submit({"task_id": f"race-{i}", "prompt": "[[script:forever]] go", "repo": str(sample_repo)})
               for i in range(8)]
    results = [p.get(timeout=180) for p in pending]
    assert all(r["status"] in FINAL for r in results)
    assert {r["status"] for r in results} == {"budget_exceeded"}
    served = offline.usage_for()["total_tokens"]
    assert 0 < served <= daily
    budget = cluster.cli_json("budget", daily_token_limit=daily)
    assert budget["daily"]["used"] == served  # the ledger equals what the model served
    assert budget["daily"]["reserved"] == 0
    assert budget["daily"]["status"] == "at_limit"
    assert sum(r["usage"]["total_tokens"] for r in results) == served
    assert len({r["worker"] for r in results}) == 2  # both workers really took part


def test_concurrency_cap_is_never_exceeded_and_waiting_agents_all_run(cluster: Cluster, sample_repo: Path,
                                                                      offline: OfflineModel) -> None:
    offline.add_script("slowish", Script([Turn([{"type": "text", "text": "hmm"}], delay=0.8)]))
    for i in (1, 2):
        cluster.worker(f"w{i}", concurrency=3, max_concurrent_agents=2)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with cluster.state() as r:
            while not stop.is_set():
                samples.append(int(r.zcount("orch:slots", time.time(), "+inf")))
                time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    pending = [cluster.submit({"task_id": f"cc-{i}", "prompt": "[[script:slowish]] go", "repo": str(sample_repo)})
               for i in range(5)]
    results = [p.get(timeout=120) for p in pending]
    stop.set()
    sampler.join()
    assert [r["status"] for r in results] == ["completed"] * 5
    assert max(samples) == 2  # the cap was reached, and never passed
    # The model never had more than two agents' calls open at once.
    events = sorted([(c.started_at, 1) for c in offline.calls()] + [(c.finished_at or 0, -1) for c in offline.calls()],
                    key=lambda e: (e[0], e[1]))
    open_calls = peak = 0
    for _, delta in events:
        open_calls += delta
        peak = max(peak, open_calls)
    assert peak <= 2


def test_sigkilled_worker_gives_back_its_reservation_and_slot(cluster: Cluster, sample_repo: Path,
                                                              offline: OfflineModel) -> None:
    offline.add_script("hang", Script([Turn([{"type": "text", "text": "zzz"}], delay=120)]))
    leases = {"reservation_lease_seconds": 5, "slot_lease_seconds": 5, "health_sweep_interval_seconds": 1}
    doomed = cluster.worker("doomed", concurrency=1, **leases)
    cluster.worker("ops", concurrency=1, queues="ops", **leases)
    cluster.beat(**leases)
    cluster.submit({"task_id": "kill-1", "prompt": "[[script:hang]] go", "repo": str(sample_repo)})
    cluster.wait_for(lambda: offline.open_streams() == 1, what="the model call to start")
    before = cluster.cli_json("budget", **leases)
    assert before["daily"]["reserved"] > 0 and before["concurrency"]["running"] == 1
    doomed.signal(signal.SIGKILL)
    killed_at = time.monotonic()

    def released() -> bool:
        doc = cluster.cli_json("budget", **leases)
        return doc["daily"]["reserved"] == 0 and doc["concurrency"]["running"] == 0

    cluster.wait_for(released, timeout=20, what="reservation and slot to come back")
    assert time.monotonic() - killed_at <= 5 + 1 + 6  # lease + sweep interval + slack


def test_soft_mode_goes_past_the_limit_with_warnings(cluster: Cluster, sample_repo: Path,
                                                     offline: OfflineModel) -> None:
    cluster.worker(budget_enforcement="soft")
    result = cluster.submit({"task_id": "soft-1", "prompt": "Fix the failing test.", "repo": str(sample_repo),
                             "token_limit": 1_000}).get(timeout=90)
    assert result["status"] == "completed"
    assert result["usage"]["total_tokens"] > 1_000
    assert any("exceeded" in w for w in result["warnings"]), result["warnings"]
    record = cluster.record(result["agent_id"])
    assert any(e["kind"] == "warning" and "exceeded" in e["message"] for e in record["events"])
    budget = cluster.cli_json("budget", budget_enforcement="soft")
    mine = next(a for a in budget["agents"] if a["agent_id"] == result["agent_id"])
    assert mine["status"] == "exceeded" and mine["percent"] > 100
    assert budget["enforcement"] == "soft"


def test_budget_json_shape(cluster: Cluster) -> None:
    doc = cluster.cli_json("budget")
    assert set(doc) >= {"date", "timezone", "enforcement", "cost_usd", "daily", "concurrency", "agents"}
    assert doc["daily"] == {**doc["daily"], "limit": 10_000_000, "used": 0, "percent": 0.0, "status": "within_budget"}
    assert doc["concurrency"]["limit"] == 10 and doc["concurrency"]["running"] == 0
    assert doc["agents"] == []


def test_hard_duration_limit_stops_the_agent_with_its_work_committed(cluster: Cluster, sample_repo: Path,
                                                                     offline: OfflineModel) -> None:
    offline.add_script("long", Script([bash("echo started > started.txt"),
                                       Turn([{"type": "text", "text": "x" * 400},
                                             {"type": "tool_use", "name": "bash", "input": {"command": "sleep 600"}}],
                                            chunk_delay=0.1)], repeat_last=True))
    cluster.worker(max_task_duration_minutes=0.05)  # 3 seconds
    started = time.monotonic()
    result = cluster.submit({"task_id": "slow-1", "prompt": "[[script:long]] go", "repo": str(sample_repo)})
    result = result.get(timeout=60)
    assert result["status"] == "timed_out" and "duration" in result["error"]
    assert time.monotonic() - started < 20
    assert "started.txt" in git(mirror_of(cluster.workspace), "ls-tree", "--name-only", result["commit"])


def test_cli_says_what_to_do_when_valkey_is_down(cluster: Cluster) -> None:
    from orchestrator.testing.cluster import free_port

    proc = cluster.cli("agents", check=False, state_url=f"redis://127.0.0.1:{free_port()}/0")
    assert proc.returncode == 2
    assert "cannot reach Valkey at redis://127.0.0.1:" in proc.stderr and "valkey-server" in proc.stderr
