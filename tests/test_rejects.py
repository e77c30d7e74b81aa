"""Bad input: every malformed spec is rejected with each bad field named, nothing raises, and it is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.testing.offline_model import OfflineModel
from tests.conftest import Cluster


def malformed(repo: str, not_repo: str) -> list[tuple[Any, set[str]]]:
    ok = {"task_id": "t", "prompt": "fix it", "repo": repo}
    return [
        ({"prompt": "fix it", "repo": repo}, {"task_id"}),
        ({"task_id": "m2", "repo": repo}, {"prompt"}),
        ({"task_id": "m3", "prompt": "fix it"}, {"repo"}),
        ({**ok, "task_id": "a/b"}, {"task_id"}),
        ({**ok, "task_id": "x" * 129}, {"task_id"}),
        ({**ok, "task_id": "m6", "prompt": "   "}, {"prompt"}),
        ({**ok, "task_id": "m7", "prompt": "x" * 300_000}, {"prompt"}),
        ({**ok, "task_id": "m8", "repo": not_repo}, {"repo"}),
        ({**ok, "task_id": "m9", "repo": "relative/path"}, {"repo"}),
        ({**ok, "task_id": "m10", "token_limit": -5}, {"token_limit"}),
        ({**ok, "task_id": "m11", "max_turns": 0, "max_duration_minutes": -1}, {"max_turns", "max_duration_minutes"}),
        ({**ok, "task_id": "m12", "priority": 12}, {"priority"}),
        ({**ok, "task_id": "m13", "max_turns": "many"}, {"max_turns"}),
        ({**ok, "task_id": "m14", "quality_gates": [{"name": "t"}]}, {"quality_gates.0.command"}),
        ({**ok, "task_id": "m15", "callback": {"url": "ftp://x"}}, {"callback"}),
        ({**ok, "task_id": "m16", "push": "yes please"}, {"push"}),
        ({**ok, "task_id": "m17", "unknown_field": 1}, {"unknown_field"}),
        ({**ok, "task_id": 42, "prompt": 7}, {"task_id", "prompt"}),
        ("not a dict", {"spec"}),
        (None, {"spec"}),
    ]


def test_malformed_specs_are_rejected_and_listed(cluster: Cluster, sample_repo: Path, tmp_path: Path,
                                                  offline: OfflineModel) -> None:
    not_repo = tmp_path / "plain-dir"
    not_repo.mkdir()
    cases = malformed(str(sample_repo), str(not_repo))
    cluster.worker()
    pending = [cluster.coordinator.send_task("orchestrator.spawn_agent", kwargs={"spec": spec}, queue="agents")
               for spec, _ in cases]
    for (spec, fields), async_result in zip(cases, pending, strict=True):
        result = async_result.get(timeout=30)
        assert result["status"] == "rejected", (spec, result)
        for field in fields:
            assert f"{field}:" in result["error"], (field, result["error"])
        assert result["agent_id"] is None
    assert offline.calls() == []  # no model call for any of them
    listed = cluster.cli_json("rejected")
    assert len(listed) == len(cases)
    named = [{e["field"].split(".")[0] for e in item["errors"]} for item in listed]
    for _, fields in cases:
        assert {f.split(".")[0] for f in fields} in named
    huge = next(item for item in listed if item["task_id"] == "m7")
    assert len(huge["spec"]["prompt"]) < 20_000  # kept, but bounded
    assert cluster.cli_json("agents", "--all") == []
