"""Health: dead, frozen and stopping workers; duplicate deliveries; Valkey restarts; stuck agents."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery import Celery

from orchestrator.budget import ledger_fields
from orchestrator.fleet import Fleet
from orchestrator.ops import health_sweep
from orchestrator.settings import STATE_DB, Settings
from orchestrator.testing.cluster import Valkey, Worker, fleet_env
from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, text_turn
from tests.conftest import Cluster, git, mirror_of

FAST = {"heartbeat_interval_seconds": 0.5, "heartbeat_timeout_seconds": 3, "health_sweep_interval_seconds": 1}
SLOW = "x" * 600


def slow_tool(command: str, chunk_delay: float = 0.4) -> Turn:
    return Turn([{"type": "text", "text": SLOW}, {"type": "tool_use", "name": "bash", "input": {"command": command}}],
                chunk_delay=chunk_delay)


def five_turns(offline: OfflineModel, name: str = "five", chunk_delay: float = 0.4) -> None:
    offline.add_script(name, Script([bash("echo a > a.txt"), bash("echo b > b.txt"),
                                     slow_tool("echo c > c.txt", chunk_delay), bash("echo d > d.txt"),
                                     text_turn("done")]))


def turns_of(offline: OfflineModel, agent_id: str) -> list[int]:
    return [c.turn for c in offline.calls() if c.agent == agent_id]


def completed_usage(offline: OfflineModel, agent_id: str) -> int:
    return sum(c.usage["total_tokens"] for c in offline.calls() if c.agent == agent_id and c.status == "completed")


def ledger_used(cluster: Cluster, agent_id: str) -> int:
    with cluster.state() as r:
        return ledger_fields(r.get(f"orch:budget:agent:{agent_id}:ledger"), 1)[0]


def start_mid_run(cluster: Cluster, offline: OfflineModel, repo: Path, worker: str, task_id: str,
                  **settings: Any) -> tuple[Worker, Any, str]:
    """A worker running one five-turn agent, returned once the agent's third (slow) turn is streaming."""
    five_turns(offline, chunk_delay=1.0)
    proc = cluster.worker(worker, concurrency=1, **settings)
    pending = cluster.submit({"task_id": task_id, "prompt": "[[script:five]] go", "repo": str(repo)})
    agent_id = cluster.agent_for(task_id)
    cluster.wait_for(lambda: 2 in turns_of(offline, agent_id) and offline.open_streams() == 1, timeout=30,
                     what="the third turn streaming")
    return proc, pending, agent_id


def test_sigkilled_worker_agent_resumes_elsewhere_from_checkpoint(cluster: Cluster, sample_repo: Path,
                                                                  offline: OfflineModel) -> None:
    doomed, pending, agent_id = start_mid_run(cluster, offline, sample_repo, "doomed", "crash-1", **FAST)
    cluster.worker("survivor", concurrency=1, **FAST)
    cluster.beat(**FAST)
    doomed.signal(signal.SIGKILL)  # the whole process group: main process and pool child
    result = pending.get(timeout=60)
    assert result["status"] == "completed" and result["worker"].startswith("survivor@"), result
    turns = turns_of(offline, agent_id)
    assert sorted(turns) == [0, 1, 2, 2, 3, 4]  # only the turn in flight was asked twice
    assert result["turns"] == 5
    mirror = mirror_of(cluster.workspace)
    assert git(mirror, "rev-list", "--count", f"{git(sample_repo, 'rev-parse', 'main').strip()}..{result['branch']}"
               ).strip() == "1"  # exactly one final commit
    assert {"a.txt", "b.txt", "c.txt", "d.txt"} <= set(git(mirror, "ls-tree", "--name-only", result["commit"]).split())
    # Tokens counted once: the result and the ledger hold every completed call exactly once.
    assert result["usage"]["total_tokens"] == completed_usage(offline, agent_id) == ledger_used(cluster, agent_id)
    record = cluster.record(agent_id)
    assert record["recoveries"] == 1 and any(e["kind"] == "recovering" for e in record["events"])


def test_same_task_delivered_twice_runs_once(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    five_turns(offline)
    cluster.worker(concurrency=4)
    spec = {"task_id": "twice-1", "prompt": "[[script:five]] go", "repo": str(sample_repo)}
    first = cluster.submit(spec)
    agent_id = cluster.agent_for("twice-1")
    cluster.wait_for(lambda: turns_of(offline, agent_id), what="the agent to start")
    second = cluster.submit(spec)
    # A forced redelivery of the run message itself (what the Redis transport does after visibility_timeout).
    for _ in range(2):
        cluster.coordinator.send_task("orchestrator.spawn_agent", kwargs={"spec": spec, "run_agent_id": agent_id},
                                      task_id=first.id, queue="agents")
    assert second.get(timeout=30)["status"] == "duplicate"
    result = first.get(timeout=60)
    assert result["status"] == "completed"
    time.sleep(1)
    assert sorted(turns_of(offline, agent_id)) == [0, 1, 2, 3, 4]  # one run only
    assert result["usage"]["total_tokens"] == ledger_used(cluster, agent_id)


def test_frozen_worker_writes_nothing_after_it_thaws(cluster: Cluster, sample_repo: Path,
                                                    offline: OfflineModel) -> None:
    frozen, pending, agent_id = start_mid_run(cluster, offline, sample_repo, "frozen", "freeze-1", **FAST)
    frozen.signal(signal.SIGSTOP)
    try:
        cluster.worker("thawed-out", concurrency=1, **FAST)
        cluster.beat(**FAST)
        result = pending.get(timeout=60)
        assert result["status"] == "completed" and result["worker"].startswith("thawed-out@")
        with cluster.state() as r:
            before = (r.hgetall(f"orch:agent:{agent_id}"), r.get(f"orch:checkpoint:{agent_id}"),
                      r.get(f"orch:budget:agent:{agent_id}:ledger"))
        head = git(mirror_of(cluster.workspace), "rev-parse", result["branch"]).strip()
        thawed_at = time.time()
    finally:
        frozen.signal(signal.SIGCONT)
    time.sleep(6)  # the old worker finishes its stale stream and notices its fencing token is stale
    with cluster.state() as r:
        after = (r.hgetall(f"orch:agent:{agent_id}"), r.get(f"orch:checkpoint:{agent_id}"),
                 r.get(f"orch:budget:agent:{agent_id}:ledger"))
    assert after[0] == before[0] and after[1] == before[1]
    assert git(mirror_of(cluster.workspace), "rev-parse", result["branch"]).strip() == head
    assert [c for c in offline.calls() if c.agent == agent_id and c.started_at > thawed_at] == []
    frozen_log = (cluster.tmp / "frozen.log").read_text()
    assert "stale" in frozen_log or "lease lost" in frozen_log or "newer run" in frozen_log


def test_valkey_restart_mid_run_loses_nothing(offline: OfflineModel, sample_repo: Path, tmp_path: Path) -> None:
    five_turns(offline, chunk_delay=0.3)
    data = tmp_path / "valkey-data"
    server = Valkey(data_dir=data, persistence=True)
    port = server.port
    env = fleet_env(server.url, tmp_path / "ws", offline.url, **FAST)
    worker = Worker(env, "w1@%h", concurrency=1, log_path=tmp_path / "w1.log").wait_ready()
    coordinator = Celery(broker=server.url, backend=server.url.rsplit("/", 1)[0] + "/1")
    try:
        async_result = coordinator.send_task("orchestrator.spawn_agent", queue="agents", kwargs={
            "spec": {"task_id": "vk-1", "prompt": "[[script:five]] go", "repo": str(sample_repo)}})
        deadline = time.monotonic() + 30
        while not any(c.turn >= 1 for c in offline.calls()) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()  # persistence on: the AOF keeps every acknowledged write
        time.sleep(3)
        server = Valkey(port=port, data_dir=data, persistence=True)
        with server.client(1) as results:
            key = f"celery-task-meta-{async_result.id}"
            deadline = time.monotonic() + 90
            meta: dict[str, Any] = {}
            while meta.get("status") not in ("SUCCESS", "FAILURE") and time.monotonic() < deadline:
                time.sleep(0.2)
                meta = json.loads(results.get(key) or "{}")
        assert meta.get("status") == "SUCCESS", (meta, worker.log()[-3000:])
        assert meta["result"]["status"] == "completed"
        assert meta["result"]["turns"] == 5
        agent_id = meta["result"]["agent_id"]
        assert set(turns_of(offline, agent_id)) == {0, 1, 2, 3, 4}
    finally:
        worker.stop()
        coordinator.close()
        server.stop()


def test_sigterm_hands_the_agent_back_at_once(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    # Default 60 s heartbeat timeout: the sweep cannot be what resumes it.
    leaving, pending, agent_id = start_mid_run(cluster, offline, sample_repo, "leaving", "term-1")
    cluster.worker("staying", concurrency=1)
    leaving.signal(signal.SIGTERM, group=False)  # a warm shutdown, as on a redeploy
    terminated_at = time.time()
    result = pending.get(timeout=60)
    assert result["status"] == "completed" and result["worker"].startswith("staying@")
    resumed = [c for c in offline.calls() if c.agent == agent_id and c.started_at > terminated_at]
    assert resumed and resumed[0].started_at - terminated_at < 5  # promptly, not after the heartbeat timeout
    leaving.popen.wait(30)
    assert sorted(turns_of(offline, agent_id)) == [0, 1, 2, 2, 3, 4]


def test_looping_agent_is_flagged_and_stopped(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    offline.add_script("loop", Script([bash("echo same")], repeat_last=True))
    cluster.worker(stuck_repeat_limit=4, stuck_action="stop")
    result = cluster.submit({"task_id": "loop-1", "prompt": "[[script:loop]] go", "repo": str(sample_repo)})
    result = result.get(timeout=60)
    assert result["status"] == "failed" and "stuck" in result["error"]
    assert result["turns"] == 4
    record = cluster.record(result["agent_id"])
    assert any(e["kind"] == "stuck" for e in record["events"])


def seen_for_a_while(fleet: Fleet, now: float) -> None:
    """A sweep history: the sweeps have seen Valkey without a gap for longer than the heartbeat timeout."""
    fleet.r.hset(fleet.keys.sweep_state, mapping={"last": str(now - 1), "since": str(now - 3600)})


def test_sweep_finds_the_few_stale_among_ten_thousand(valkey: Valkey, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, broker_url=valkey.url, workspace_dir=tmp_path / "ws",  # type: ignore[call-arg]
                        heartbeat_timeout_seconds=60)
    enqueued: list[str] = []
    fleet = Fleet.create(settings, r=valkey.client(STATE_DB), enqueue=enqueued.append)
    now = time.time()
    seen_for_a_while(fleet, now)
    stale = [f"stale-{i}" for i in range(5)]
    pipe = fleet.r.pipeline()
    for i in range(10_000):
        pipe.zadd(fleet.keys.heartbeats, {f"ok-{i}": now - 5})
    for agent_id in stale:
        pipe.zadd(fleet.keys.heartbeats, {agent_id: now - 300})
        pipe.hset(fleet.keys.agent(agent_id), mapping={"agent_id": json.dumps(agent_id), "state": '"running"',
                                                        "spec": json.dumps({"metadata": {}})})
    pipe.execute()
    report: dict[str, Any] = health_sweep(fleet, now=now)
    assert sorted(report["recovered"]) == stale and sorted(enqueued) == stale
    assert fleet.r.zcard(fleet.keys.heartbeats) == 10_000
    assert all(fleet.store.get(a)["state"] == "recovering" for a in stale)  # type: ignore[index]
    assert fleet.r.zcard(fleet.keys.dispatch) == 0  # every message sent: nothing owed
    again = health_sweep(fleet, now=now)  # a second beat right after finds nothing to do
    assert again["recovered"] == [] and len(enqueued) == 5


def test_after_a_gap_in_the_sweeps_nobody_is_presumed_dead_at_once(valkey: Valkey, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, broker_url=valkey.url, workspace_dir=tmp_path / "ws",  # type: ignore[call-arg]
                        heartbeat_timeout_seconds=60, health_sweep_interval_seconds=30)
    fleet = Fleet.create(settings, r=valkey.client(STATE_DB), enqueue=lambda agent_id: None)
    now = time.time()
    fleet.r.hset(fleet.keys.sweep_state, mapping={"last": str(now - 100), "since": str(now - 3600)})  # Valkey away
    fleet.r.zadd(fleet.keys.heartbeats, {"a1": now - 100})
    fleet.r.hset(fleet.keys.agent("a1"), mapping={"agent_id": '"a1"', "state": '"running"', "spec": "{}"})
    assert health_sweep(fleet, now=now)["recovered"] == []  # its worker may be alive: give it a timeout to beat
    assert health_sweep(fleet, now=now + 30)["recovered"] == []
    assert health_sweep(fleet, now=now + 61)["recovered"] == ["a1"]  # no beat for a whole timeout since: dead


def test_cleanup_removes_old_finished_worktrees_but_never_a_leased_one(valkey: Valkey, tmp_path: Path) -> None:
    from orchestrator.models import AgentSpec
    from orchestrator.ops import cleanup_worktrees
    from orchestrator.runner import new_record
    from orchestrator.states import State
    from orchestrator.testing.sample_repo import make_sample_repo

    repo = make_sample_repo(tmp_path / "repo")
    settings = Settings(_env_file=None, broker_url=valkey.url, workspace_dir=tmp_path / "ws",  # type: ignore[call-arg]
                        worktree_retention_hours=1)
    fleet = Fleet.create(settings, r=valkey.client(STATE_DB))
    ids = {}
    for name in ("old", "fresh", "leased", "killed"):
        spec = AgentSpec(task_id=name, prompt="p", repo=str(repo))
        agent_id, _, _ = fleet.lifecycle.create(new_record(spec, None), name)
        fleet.workspace.prepare(agent_id, str(repo), "main", f"agent/{agent_id}")
        ids[name] = agent_id
    now = time.time()
    long_ago = "2020-01-01T00:00:00+00:00"
    for name, status, finished in (("old", State.COMPLETED, long_ago), ("fresh", State.COMPLETED, None),
                                   ("leased", State.COMPLETED, long_ago), ("killed", State.KILLED, long_ago)):
        fleet.lifecycle.finish(ids[name], name, status, {"finished_at": finished or datetime.now(UTC).isoformat()})
    fleet.r.set(fleet.keys.lease(ids["leased"]), "someone|9", ex=60)
    report = cleanup_worktrees(fleet, now=now)
    assert report["removed"] == [ids["old"]]
    assert not fleet.workspace.worktree_path(ids["old"]).exists()
    for name in ("fresh", "leased", "killed"):
        assert fleet.workspace.worktree_path(ids[name]).exists(), name
    assert report["disk_bytes"] > 0


def test_a_refused_run_message_is_sent_by_a_later_sweep(valkey: Valkey, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, broker_url=valkey.url, workspace_dir=tmp_path / "ws",  # type: ignore[call-arg]
                        heartbeat_timeout_seconds=60)
    sent: list[str] = []
    broker_up = [False]

    def flaky_enqueue(agent_id: str) -> None:
        if not broker_up[0]:
            raise ConnectionError("broker down")
        sent.append(agent_id)

    fleet = Fleet.create(settings, r=valkey.client(STATE_DB), enqueue=flaky_enqueue)
    clock = [time.time()]
    fleet.lifecycle.clock = lambda: clock[0]
    seen_for_a_while(fleet, clock[0])
    fleet.r.zadd(fleet.keys.heartbeats, {"a1": clock[0] - 300})
    fleet.r.hset(fleet.keys.agent("a1"), mapping={"agent_id": '"a1"', "state": '"running"', "spec": "{}"})
    assert health_sweep(fleet, now=clock[0])["recovered"] == ["a1"]
    assert sent == [] and fleet.r.zscore(fleet.keys.dispatch, "a1") is not None  # owed, not lost
    for _ in range(9):  # the broker stays down for a while: no recovery is counted again, nothing is lost
        clock[0] += 10
        seen_for_a_while(fleet, clock[0])
        assert health_sweep(fleet, now=clock[0])["recovered"] == []
    broker_up[0] = True
    clock[0] += 31
    seen_for_a_while(fleet, clock[0])
    assert health_sweep(fleet, now=clock[0])["resent"] == 1
    assert sent == ["a1"] and fleet.r.zscore(fleet.keys.dispatch, "a1") is None
    record = fleet.store.get("a1") or {}
    assert record["state"] == "recovering" and record["recoveries"] == 1
    assert fleet.r.hget(fleet.keys.stats, "recoveries") == "1"
