"""Scale-out: an agent resumes on another host with its work, from a workspace directory of its own."""

from __future__ import annotations

import signal
from pathlib import Path

from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, edit, text_turn
from tests.conftest import Cluster, git

FAST = {"heartbeat_interval_seconds": 0.5, "heartbeat_timeout_seconds": 3, "health_sweep_interval_seconds": 1}


def test_a_sigkilled_hosts_agent_resumes_elsewhere_with_its_uncommitted_work(cluster: Cluster, sample_repo: Path,
                                                                             offline: OfflineModel) -> None:
    offline.add_script("hosts", Script([
        edit(command="str_replace", path="calc.py", old_str="return a - b", new_str="return a + b"),
        bash("mkdir -p notes && echo 'written on the first host' > notes/untracked.txt"),
        Turn([{"type": "text", "text": "thinking " * 60}, {"type": "tool_use", "name": "bash",
                                                           "input": {"command": "echo third > third.txt"}}],
             chunk_delay=0.5),  # the host dies while this turn streams
        text_turn("done"),
    ]))
    host_a = cluster.worker("hosta", concurrency=1, workspace_dir=str(cluster.tmp / "host-a"), **FAST)
    pending = cluster.submit({"task_id": "move-1", "prompt": "[[script:hosts]] go", "repo": str(sample_repo)})
    agent_id = cluster.agent_for("move-1")
    cluster.wait_for(lambda: any(c.agent == agent_id and c.turn == 2 and c.status == "open" for c in offline.calls()),
                     timeout=60, what="the third turn streaming on host A")
    host_a.signal(signal.SIGKILL)  # the whole process group: the host is gone, its disk with it
    cluster.worker("hostb", concurrency=1, workspace_dir=str(cluster.tmp / "host-b"), **FAST)
    cluster.beat(**FAST)
    result = pending.get(timeout=90)
    assert result["status"] == "completed" and result["worker"].startswith("hostb@"), result
    mirror_b = next((cluster.tmp / "host-b" / "mirrors").glob("*.git"))
    files = set(git(mirror_b, "ls-tree", "-r", "--name-only", result["commit"]).split())
    assert {"calc.py", "notes/untracked.txt", "third.txt"} <= files
    assert "return a + b" in git(mirror_b, "show", f"{result['commit']}:calc.py")
    assert "first host" in git(mirror_b, "show", f"{result['commit']}:notes/untracked.txt")
    turns = sorted(c.turn for c in offline.calls() if c.agent == agent_id)
    assert turns == [0, 1, 2, 2, 3], turns  # only the turn in flight was asked twice
