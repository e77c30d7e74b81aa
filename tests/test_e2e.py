"""End to end: a real worker (prefork), a real valkey-server, the offline model over HTTP, real git repos."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.testing.offline_model import OfflineModel, Script, bash, text_turn
from tests.conftest import Cluster, git, mirror_of

CONTRACT_RESULT_FIELDS = {"agent_id", "task_id", "status", "worker", "branch", "commit", "turns", "usage", "gates",
                          "error", "started_at", "finished_at", "metadata"}
USAGE_FIELDS = {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                "total_tokens", "cost_usd"}


def test_agent_fixes_failing_test_end_to_end(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    cluster.worker()
    spec = {"task_id": "fix-1", "prompt": "Fix the failing test in this repository.", "repo": str(sample_repo),
            "metadata": {"ticket": "ENG-1"}}
    result = cluster.submit(spec).get(timeout=90)

    assert set(result) >= CONTRACT_RESULT_FIELDS and set(result["usage"]) == USAGE_FIELDS
    assert result["status"] == "completed", result
    assert result["task_id"] == "fix-1" and result["metadata"] == {"ticket": "ENG-1"}
    agent_id = result["agent_id"]
    assert result["branch"] == f"agent/{agent_id}"
    assert result["turns"] == 5 and result["error"] is None

    # The commit is on the agent's branch, contains the fix, and names the agent as its author.
    mirror = mirror_of(cluster.workspace)
    assert git(mirror, "rev-parse", result["branch"]).strip() == result["commit"]
    assert "return a + b" in git(mirror, "show", f"{result['commit']}:calc.py")
    assert agent_id in git(mirror, "log", "-1", "--format=%an %s", result["commit"])
    assert git(mirror, "rev-parse", f"{result['commit']}^").strip() == git(sample_repo, "rev-parse", "main").strip()

    # The agent ran the tests with bash after its edit, and they passed.
    record = cluster.record(agent_id)
    assert record["state"] == "completed" and record["result"]["commit"] == result["commit"]
    with cluster.state() as r:
        checkpoint = json.loads(r.get(f"orch:checkpoint:{agent_id}"))
    last_results = checkpoint["messages"][-2]["content"]
    assert "2 passed" in last_results[0]["content"]

    # Usage in the result equals what the offline model served for this agent.
    served = offline.usage_for(agent_id)
    for field in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                  "total_tokens"):
        assert result["usage"][field] == served[field], field
    assert result["usage"]["total_tokens"] > 0 and result["usage"]["cost_usd"] > 0
    assert len([c for c in offline.calls() if c.agent == agent_id]) == 5

    listed = cluster.cli_json("agents", "--all")
    mine = next(a for a in listed if a["agent_id"] == agent_id)
    assert mine["state"] == "completed" and mine["commit"] == result["commit"]
    for field in ("agent_id", "task_id", "state", "worker", "turns", "usage", "heartbeat_at", "started_at",
                  "finished_at", "branch", "commit", "error"):
        assert field in mine, field
    assert cluster.cli_json("agents") == []  # nothing live any more


def test_duplicate_task_id_spawns_nothing(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    cluster.worker()
    spec = {"task_id": "dup-1", "prompt": "Fix the failing test.", "repo": str(sample_repo)}
    first = cluster.submit(spec).get(timeout=90)
    second = cluster.submit(spec).get(timeout=30)
    assert first["status"] == "completed"
    assert second["status"] == "duplicate" and second["agent_id"] == first["agent_id"]
    assert {c.agent for c in offline.calls()} == {first["agent_id"]}


def test_agent_shell_sees_no_secret(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    offline.add_script("env", Script([bash("env; echo PATH-IS=$PATH"), text_turn("done")]))
    cluster.extra_env = {"MY_SERVICE_TOKEN": "tok-123456789", "ORCHESTRATOR_WEBHOOK_SECRET": "hook-987654321",
                         "DATABASE_PASSWORD": "pw-555555555"}
    cluster.worker()
    result = cluster.submit({"task_id": "env-1", "prompt": "[[script:env]] print env", "repo": str(sample_repo)})
    result = result.get(timeout=60)
    assert result["status"] == "completed", result
    with cluster.state() as r:
        checkpoint = json.loads(r.get(f"orch:checkpoint:{result['agent_id']}"))
    output = checkpoint["messages"][2]["content"][0]["content"]
    assert "PATH-IS=/" in output  # the command really ran
    for secret in ("offline-model-key", "tok-123456789", "hook-987654321", "pw-555555555", "ANTHROPIC", "ORCHESTRATOR"):
        assert secret not in output, secret


def test_spec_priority_is_honoured(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    from orchestrator.testing.offline_model import Turn

    offline.add_script("slow", Script([Turn([{"type": "text", "text": "thinking"}], delay=2.0)]))
    cluster.worker(concurrency=1)
    blocker = cluster.submit({"task_id": "block", "prompt": "[[script:slow]]", "repo": str(sample_repo)})
    cluster.wait_for(lambda: any(c.agent for c in offline.calls()), what="blocker running")
    pending = [cluster.submit({"task_id": f"p{p}", "prompt": "[[script:env-free]] go", "repo": str(sample_repo),
                               "priority": p}) for p in (1, 9, 5)]
    offline.add_script("env-free", Script([text_turn("ok")]))
    blocker.get(timeout=60)
    results = [p.get(timeout=60) for p in pending]
    order = [r["task_id"] for r in sorted(results, key=lambda r: r["started_at"])]
    assert order == ["p9", "p5", "p1"]


def test_cli_submit_wait_prints_the_result(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    cluster.worker()
    proc = cluster.cli("submit", "--repo", str(sample_repo), "--prompt", "Fix the failing test.", "--task-id",
                       "cli-1", "--gate", "python -m pytest -q", "--wait", "--json")
    result = json.loads(proc.stdout)  # --json: exactly one JSON document on stdout
    assert result["status"] == "completed" and result["task_id"] == "cli-1"
    assert [(g["name"], g["passed"]) for g in result["gates"]] == [("gate-1", True)]
    human = cluster.cli("agents", "--all")
    assert result["agent_id"] in human.stdout and "completed" in human.stdout
    shown = cluster.cli_json("show", "cli-1")  # show also takes the coordinator's task_id
    assert shown["agent_id"] == result["agent_id"] and shown["result"] == result
