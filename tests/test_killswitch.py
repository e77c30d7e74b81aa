"""The killswitch and kill_agent through real workers: everything stops at once, nothing is lost."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, text_turn
from tests.conftest import REPO_ROOT, Cluster, git, mirror_of

SLOW_TEXT = [{"type": "text", "text": "thinking very slowly " * 40}]
SLOW_TOOL = [*SLOW_TEXT, {"type": "tool_use", "name": "bash", "input": {"command": "echo mid > mid.txt"}}]


def scripts(offline: OfflineModel) -> None:
    offline.add_script("streamer", Script([bash("echo progress > work-$RANDOM.txt"),
                                           Turn(SLOW_TEXT, chunk_delay=0.5), text_turn("done")]))
    offline.add_script("sleeper", Script([bash("echo progress > work-$RANDOM.txt"),
                                          bash("bash -c 'sleep 600 & sleep 600'"), text_turn("done")]))
    offline.add_script("quick", Script([bash("echo quick > quick.txt"), text_turn("done")]))


def sleep_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def celery_control(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery", "-A", "orchestrator", "control", *args],
                          env=cluster.env(), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_drill_stops_every_agent_at_once_and_keeps_their_work(cluster: Cluster, sample_repo: Path,
                                                              offline: OfflineModel, pool: str) -> None:
    scripts(offline)
    assert sleep_pids() == []
    for name in ("w1", "w2"):
        cluster.worker(name, concurrency=3, pool=pool)
    pending = [cluster.submit({"task_id": f"drill-{kind}-{i}", "prompt": f"[[script:{kind}]] work",
                               "repo": str(sample_repo)}) for kind in ("streamer", "sleeper") for i in range(3)]
    cluster.wait_for(lambda: offline.open_streams() == 3 and len(sleep_pids()) == 6, timeout=60,
                     what="3 agents mid-stream and 3 inside sleep 600")
    started = time.monotonic()
    proc = celery_control(cluster, "killswitch", "drill")
    assert proc.returncode == 0, proc.stderr
    try:
        results = [p.get(timeout=30) for p in pending]
    except Exception as exc:  # say whether the fleet stored the results and only the coordinator missed them
        stored = [cluster.coordinator.backend.get_task_meta(p.id).get("status") for p in pending]
        raise AssertionError(f"{exc!r}; results stored in the backend: {stored}") from exc
    elapsed = time.monotonic() - started
    assert [r["status"] for r in results] == ["killed"] * 6, results
    assert elapsed < 10
    assert sleep_pids() == []  # no process of theirs survives
    cluster.wait_for(lambda: offline.open_streams() == 0, timeout=2, what="every stream closed")
    assert all(c.status != "open" for c in offline.calls())
    mirror = mirror_of(cluster.workspace)
    for r in results:  # each branch holds the work done before the stop
        assert r["commit"] is not None
        files = git(mirror, "ls-tree", "--name-only", r["commit"]).split()
        assert any(f.startswith("work-") for f in files), files
    status = cluster.cli_json("killswitch", "status")
    assert status["engaged"] is True and status["reason"] == "drill" and status["engaged_at"]
    assert status["stopped"] == 6 and status["slowest_stop_seconds"] < 5
    budget = cluster.cli_json("budget")
    assert budget["daily"]["reserved"] == 0 and budget["daily"]["used"] == offline.usage_for()["total_tokens"]


def test_engaged_fleet_holds_new_work_until_release_resume(cluster: Cluster, sample_repo: Path,
                                                          offline: OfflineModel) -> None:
    scripts(offline)
    cluster.worker()
    cluster.cli("killswitch", "engage", "--reason", "maintenance")
    pending = cluster.submit({"task_id": "held-1", "prompt": "[[script:quick]] go", "repo": str(sample_repo)})
    agent_id = cluster.agent_for("held-1")
    cluster.wait_for(lambda: cluster.record(agent_id)["state"] == "held", what="agent held")
    status = cluster.cli_json("killswitch", "status")
    assert status == {**status, "engaged": True, "reason": "maintenance", "held": 1}
    assert offline.calls() == []  # it never reached the model
    cluster.cli("killswitch", "release", "--resume")
    result = pending.get(timeout=60)
    assert result["status"] == "completed" and result["agent_id"] == agent_id
    assert cluster.cli_json("killswitch", "status")["held"] == 0
    audit = cluster.cli_json("killswitch", "audit")
    assert [e["event"] for e in audit] == ["release", "engage"]
    assert audit[1]["reason"] == "maintenance" and audit[1]["by"] and audit[0]["resumed"] == 1


def test_worker_started_after_engage_runs_nothing(cluster: Cluster, sample_repo: Path,
                                                  offline: OfflineModel) -> None:
    scripts(offline)
    cluster.cli("killswitch", "engage", "--reason", "no worker saw the broadcast")
    pending = cluster.submit({"task_id": "late-1", "prompt": "[[script:quick]] go", "repo": str(sample_repo)})
    cluster.worker()  # it never saw the broadcast: the persisted state stops it
    agent_id = cluster.agent_for("late-1")
    cluster.wait_for(lambda: cluster.record(agent_id)["state"] == "held", what="agent held")
    time.sleep(1)
    assert offline.calls() == []
    assert not pending.ready()


def test_kill_agent_stops_one_and_leaves_the_others(cluster: Cluster, sample_repo: Path,
                                                    offline: OfflineModel) -> None:
    offline.add_script("steady", Script([Turn(SLOW_TOOL, chunk_delay=0.6), Turn(SLOW_TOOL, chunk_delay=0.6),
                                         Turn(SLOW_TOOL, chunk_delay=0.6), text_turn("done")]))
    cluster.worker(concurrency=3)
    pending = {i: cluster.submit({"task_id": f"k-{i}", "prompt": "[[script:steady]] go", "repo": str(sample_repo)})
               for i in range(3)}
    victim = cluster.agent_for("k-1")
    cluster.wait_for(lambda: offline.open_streams() == 3, what="all three streaming")
    proc = celery_control(cluster, "kill_agent", victim)
    assert proc.returncode == 0, proc.stderr
    assert pending[1].get(timeout=20)["status"] == "killed"
    assert [pending[i].get(timeout=60)["status"] for i in (0, 2)] == ["completed", "completed"]


def test_resume_continues_a_killed_agent_from_its_checkpoint(cluster: Cluster, sample_repo: Path,
                                                              offline: OfflineModel) -> None:
    offline.add_script("resumable", Script([bash("echo one > one.txt"), Turn(SLOW_TOOL, chunk_delay=0.6),
                                            bash("echo two > two.txt"), text_turn("done")]))
    cluster.worker()
    pending = cluster.submit({"task_id": "res-1", "prompt": "[[script:resumable]] go", "repo": str(sample_repo)})
    agent_id = cluster.agent_for("res-1")
    cluster.wait_for(lambda: offline.open_streams() == 1 and any(c.turn == 1 for c in offline.calls()),
                     what="second turn streaming")
    cluster.cli("kill", agent_id, "--reason", "operator test")
    killed = pending.get(timeout=20)
    assert killed["status"] == "killed" and killed["turns"] == 1
    cluster.cli("resume", agent_id)
    final = cluster.wait_for(lambda: (r := cluster.record(agent_id))["state"] == "completed" and r, timeout=60,
                             what="resumed agent to complete")
    turns_asked = [c.turn for c in offline.calls() if c.agent == agent_id]
    assert turns_asked.count(0) == 1  # the finished turn was not asked again
    assert turns_asked.count(1) == 2  # only the turn in flight at the kill was asked again
    assert final["result"]["turns"] == 4
    files = git(mirror_of(cluster.workspace), "ls-tree", "--name-only", final["commit"]).split()
    assert {"one.txt", "mid.txt", "two.txt"} <= set(files)
