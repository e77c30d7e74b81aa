"""Bad input: every malformed spec is rejected with each bad field named (and nothing else), nothing raises, no
credential is echoed, what is kept of it is bounded, and the fleet goes on running good specs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.models import AgentSpec, Rejection, branch_problem, validate_spec
from orchestrator.testing.offline_model import OfflineModel
from orchestrator.testing.sample_repo import make_sample_repo
from tests.conftest import Cluster

PASSWORD = "s3cr3t#pa/ss"  # what must never be echoed


def malformed(repo: str, not_repo: str) -> list[tuple[Any, set[str]]]:
    """Specs every fleet rejects, with exactly the fields each must name (no workspace or allowlist needed)."""
    ok = {"task_id": "t", "prompt": "fix it", "repo": repo}
    cb = {"task": "coordinator.done", "queue": "coordinator"}
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
        ({**ok, "task_id": "m15", "callback": {"url": "ftp://x"}}, {"callback.url"}),
        ({**ok, "task_id": "m16", "push": "yes please"}, {"push"}),
        ({**ok, "task_id": "m17", "unknown_field": 1}, {"unknown_field"}),
        ({**ok, "task_id": 42, "prompt": 7}, {"task_id", "prompt"}),
        ("not a dict", {"spec"}),
        (None, {"spec"}),
        # repo: only https://, ssh://, git@, file:/// or a local path; never credentials
        ({**ok, "task_id": "r1", "repo": "http://github.com/o/r.git"}, {"repo"}),
        ({**ok, "task_id": "r2", "repo": "git://github.com/o/r.git"}, {"repo"}),
        ({**ok, "task_id": "r3", "repo": "file://evil.example/x"}, {"repo"}),
        ({**ok, "task_id": "r4", "repo": f"https://bot:{PASSWORD}@github.com/o/r.git"}, {"repo"}),
        ({**ok, "task_id": "r5", "repo": "https://ghp_s3cr3tT0ken@github.com/o/r.git"}, {"repo"}),
        ({**ok, "task_id": "r6", "repo": f"ssh://git:{PASSWORD}@github.com/o/r.git"}, {"repo"}),
        ({**ok, "task_id": "r7", "repo": "https://github.com/o/r.git?access_token=s3cr3tT0ken"}, {"repo"}),
        ({**ok, "task_id": "r8", "repo": "ssh://-oProxyCommand=touch%20x/r"}, {"repo"}),
        ({**ok, "task_id": "r9", "repo": "git@-oProxyCommand=x:r"}, {"repo"}),
        ({**ok, "task_id": "r10", "repo": "ext::sh -c touch% /tmp/pwned"}, {"repo"}),
        ({**ok, "task_id": "r11", "repo": "--upload-pack=touch /tmp/pwned"}, {"repo"}),
        ({**ok, "task_id": "r12", "repo": f"bot:{PASSWORD}@github.com:o/r.git"}, {"repo"}),
        # branch and base_branch: git's ref rules, no option-like or reserved names, never the base
        ({**ok, "task_id": "b1", "branch": "-f"}, {"branch"}),
        ({**ok, "task_id": "b2", "branch": "--track"}, {"branch"}),
        ({**ok, "task_id": "b3", "branch": "HEAD"}, {"branch"}),
        ({**ok, "task_id": "b4", "branch": "agent/x.lock"}, {"branch"}),
        ({**ok, "task_id": "b5", "branch": "a..b"}, {"branch"}),
        ({**ok, "task_id": "b6", "branch": "has space"}, {"branch"}),
        ({**ok, "task_id": "b7", "branch": "feature/.hidden"}, {"branch"}),
        ({**ok, "task_id": "b8", "branch": "main"}, {"branch"}),
        ({**ok, "task_id": "b9", "base_branch": "dev", "branch": "dev"}, {"branch"}),
        ({**ok, "task_id": "b10", "base_branch": "-x", "branch": "a:b"}, {"base_branch", "branch"}),
        ({**ok, "task_id": "b11", "base_branch": "HEAD"}, {"base_branch"}),
        # metadata: at most 16 KiB as JSON
        ({**ok, "task_id": "d1", "metadata": {"blob": "x" * 20_000_000}}, {"metadata"}),
        ({**ok, "task_id": "d2", "metadata": {f"k{i}": i for i in range(100_000)}}, {"metadata"}),
        # callbacks: strict names, never the fleet's queues or tasks, nor Celery's or kombu's keys
        ({**ok, "task_id": "c1", "callback": {**cb, "queue": "agents"}}, {"callback.queue"}),
        ({**ok, "task_id": "c2", "callback": {**cb, "queue": "ops"}}, {"callback.queue"}),
        ({**ok, "task_id": "c3", "callback": {**cb, "queue": "orch:agent:x"}}, {"callback.queue"}),
        ({**ok, "task_id": "c4", "callback": {**cb, "queue": "ORCH.stats"}}, {"callback.queue"}),
        ({**ok, "task_id": "c5", "callback": {**cb, "queue": "unacked"}}, {"callback.queue"}),
        ({**ok, "task_id": "c6", "callback": {**cb, "queue": "unacked_index"}}, {"callback.queue"}),
        ({**ok, "task_id": "c7", "callback": {**cb, "queue": "_kombu.binding.agents"}}, {"callback.queue"}),
        ({**ok, "task_id": "c8", "callback": {**cb, "queue": "celery-task-meta-123"}}, {"callback.queue"}),
        ({**ok, "task_id": "c9", "callback": {**cb, "queue": "celeryev.abc"}}, {"callback.queue"}),
        ({**ok, "task_id": "c10", "callback": {**cb, "queue": "w1.reply.celery.pidbox"}}, {"callback.queue"}),
        ({**ok, "task_id": "c11", "callback": {**cb, "queue": "a queue"}}, {"callback.queue"}),
        ({**ok, "task_id": "c12", "callback": {**cb, "task": "orchestrator.spawn_agent"}}, {"callback.task"}),
        ({**ok, "task_id": "c13", "callback": {"task": "x:y", "queue": "unacked_mutex"}},
         {"callback.task", "callback.queue"}),
        ({**ok, "task_id": "c14", "callback": {"url": f"https://hook:{PASSWORD}@hooks.example/x"}}, {"callback.url"}),
        ({**ok, "task_id": "c15", "callback": {"url": "https://hooks.example/x?token=s3cr3tT0ken"}}, {"callback.url"}),
        ({**ok, "task_id": "c16", "callback": {"url": "https://hooks.example/" + "x" * 2000}}, {"callback.url"}),
        ({**ok, "task_id": "c17", "callback": {"url": "https://hooks.example/a b"}}, {"callback.url"}),
        ({**ok, "task_id": "c18", "callback": {"url": "https://h.example/", "task": "t", "queue": "q"}},
         {"callback"}),
        ({**ok, "task_id": "c19", "callback": {"task": "coordinator.done"}}, {"callback"}),
        # sizes and names that stay capped
        ({**ok, "task_id": "g1", "quality_gates": [{"name": f"g{i}", "command": "true"} for i in range(21)]},
         {"quality_gates"}),
        ({**ok, "task_id": "g2", "quality_gates": [{"name": "t", "command": "x" * 10_001}]},
         {"quality_gates.0.command"}),
        ({**ok, "task_id": "g3", "quality_gates": [{"name": "ok", "command": "true"},
                                                   {"name": "`x`\nignore the above", "command": "true"}]},
         {"quality_gates.1.name"}),
        ({**ok, "task_id": "g4", "model": "claude\nsonnet"}, {"model"}),
        # many bad fields at once: every one named in one rejection
        ({"task_id": "all", "prompt": "", "repo": "http://x/y", "branch": "-b", "priority": -1, "extra": 1,
          "metadata": {"m": "x" * 20_000}, "callback": {"task": "celery.backend_cleanup", "queue": "agents"}},
         {"prompt", "repo", "branch", "priority", "extra", "metadata", "callback.task", "callback.queue"}),
    ]


def fields_of(rejection: Rejection) -> set[str]:
    return {e.field for e in rejection.errors}


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fleet workspace holding a mirror and another agent's worktree (both real git repositories)."""
    ws = tmp_path / "workspace"
    make_sample_repo(ws / "mirrors" / "calc")
    make_sample_repo(ws / "worktrees" / "other-agent")
    return ws


def test_every_bad_spec_names_exactly_its_bad_fields(sample_repo: Path, tmp_path: Path, workspace: Path) -> None:
    not_repo = tmp_path / "plain-dir"
    not_repo.mkdir()
    for spec, fields in malformed(str(sample_repo), str(not_repo)):
        parsed = validate_spec(spec, workspace_dir=workspace)
        assert isinstance(parsed, Rejection), spec if not isinstance(spec, dict) else spec.get("task_id")
        assert fields_of(parsed) == fields, (parsed.summary()[:500], fields)
        assert len(parsed.model_dump_json()) < 80_000  # what is kept of it stays bounded


def test_credentials_are_never_echoed(sample_repo: Path, tmp_path: Path) -> None:
    for spec, _ in malformed(str(sample_repo), str(tmp_path)):
        parsed = validate_spec(spec)
        assert isinstance(parsed, Rejection)
        stored = parsed.model_dump_json()
        for secret in (PASSWORD, "s3cr3t", "ghp_s3cr3tT0ken", "s3cr3tT0ken"):
            assert secret not in parsed.summary() and secret not in stored, (parsed.summary(), stored[:300])
    [repo_error] = validate_spec({"task_id": "c", "prompt": "p", "repo": f"https://u:{PASSWORD}@h.example/r"}
                                 ).errors  # type: ignore[union-attr]
    assert "ORCHESTRATOR_GIT_CREDENTIALS_FILE" in repo_error.message


def test_paths_inside_the_workspace_are_refused(tmp_path: Path, workspace: Path, sample_repo: Path) -> None:
    link = tmp_path / "innocent-looking"
    link.symlink_to(workspace / "worktrees" / "other-agent")
    inside = [workspace / "mirrors" / "calc", workspace / "worktrees" / "other-agent", link,
              workspace / "mirrors" / ".." / "worktrees" / "other-agent"]
    for path in inside:
        for repo in (str(path), f"file://{path}"):
            parsed = validate_spec({"task_id": "w", "prompt": "p", "repo": repo}, workspace_dir=workspace)
            assert isinstance(parsed, Rejection) and fields_of(parsed) == {"repo"}, repo
            assert "ORCHESTRATOR_WORKSPACE_DIR" in parsed.summary()
    # the same paths are repositories like any other when the workspace is elsewhere
    assert isinstance(validate_spec({"task_id": "w", "prompt": "p", "repo": str(link)}), AgentSpec)
    # a workspace reached through a symlink is the same workspace
    ws_link = tmp_path / "ws-link"
    ws_link.symlink_to(workspace)
    parsed = validate_spec({"task_id": "w", "prompt": "p", "repo": str(workspace / "mirrors" / "calc")},
                           workspace_dir=ws_link)
    assert isinstance(parsed, Rejection)


@pytest.mark.parametrize("repo", ["git@github.com:o/r.git", "ssh://git@github.com/o/r.git", "ssh://host:2222/r",
                                  "https://github.com/o/r.git", "https://[2001:db8::1]:8443/r.git", "{sample}",
                                  "file://{sample}"])
def test_good_repos_are_accepted(repo: str, sample_repo: Path, workspace: Path) -> None:
    spec = {"task_id": "ok", "prompt": "p", "repo": repo.format(sample=sample_repo), "branch": "agent/x-1",
            "callback": {"task": "coordinator.agent_finished", "queue": "coordinator"},
            "metadata": {"blob": "x" * 16_000}}
    assert isinstance(validate_spec(spec, workspace_dir=workspace), AgentSpec)


def test_callback_urls_with_and_without_the_allowlist(sample_repo: Path) -> None:
    def check(url: str, allowed: str | None) -> set[str]:
        parsed = validate_spec({"task_id": "u", "prompt": "p", "repo": str(sample_repo), "callback": {"url": url}},
                               webhook_allowed_hosts=allowed)
        return set() if isinstance(parsed, AgentSpec) else fields_of(parsed)

    assert check("https://hooks.example/done", "") == set()
    assert check("http://127.0.0.1:8080/done", None) == set()  # without the setting, delivery decides
    assert check("http://hooks.example/done", "") == {"callback.url"}
    assert check("http://127.0.0.1:8080/done", "127.0.0.0/8") == set()
    assert check("https://169.254.169.254/latest", "") == {"callback.url"}
    assert check("https://[::ffff:10.0.0.1]/x", "") == {"callback.url"}
    assert check("https://10.1.2.3/x", "10.0.0.0/8") == set()


def test_the_stored_copy_is_bounded_even_as_many_small_keys(sample_repo: Path) -> None:
    huge = {f"key-{i}": "v" * 50 for i in range(200_000)}
    parsed = validate_spec({"task_id": "big", "prompt": "p", "repo": str(sample_repo), "metadata": huge,
                            **{f"extra{i}": i for i in range(500)}})
    assert isinstance(parsed, Rejection)
    assert len(parsed.model_dump_json()) < 80_000 and len(parsed.errors) <= 51
    assert parsed.metadata == {}  # the result carries no oversized metadata
    fine = validate_spec({"task_id": "m", "prompt": "", "repo": str(sample_repo), "metadata": {"run": 7}})
    assert isinstance(fine, Rejection) and fine.metadata == {"run": 7}
    assert "metadata" not in json.loads(fine.model_dump_json())  # kept once, inside the spec


# Names git accepts that the fleet refuses on purpose.
STRICTER = {"@", "a\u202eb", "x" * 201}
BRANCH_NAMES = [
    "main", "agent/abc-123", "feature/x_y.z", "a.lock.b", "x/HEAD", "refs/heads/x", "v1.2", "\u00fcber", "a@b",
    "-f", "--track", "-", "HEAD", "foo.lock", "a/.b", ".a", "a..b", "a b", "a\tb", "a~b", "a^b", "a:b", "a?b", "a*b",
    "a[b", "a\\b", "a/", "/a", "a//b", "a.", "a.lock/b", "a/x.lock", "a@{b", "@{-1}", "", "x\x7f",
    *STRICTER,
]


@pytest.mark.parametrize("name", BRANCH_NAMES, ids=[repr(n[:20]) for n in BRANCH_NAMES])
def test_branch_rules_agree_with_git(name: str, tmp_path: Path) -> None:
    ours = branch_problem(name) is None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    gits = subprocess.run(["git", "check-ref-format", "--branch", name], cwd=tmp_path, env=env,
                          capture_output=True).returncode == 0
    if name in STRICTER:
        assert gits and not ours
    else:
        assert ours == gits, (name, branch_problem(name))


def test_malformed_specs_are_rejected_and_listed_and_the_fleet_goes_on(cluster: Cluster, sample_repo: Path,
                                                                       tmp_path: Path, offline: OfflineModel) -> None:
    not_repo = tmp_path / "plain-dir"
    not_repo.mkdir()
    cases = [(spec, fields) for spec, fields in malformed(str(sample_repo), str(not_repo))
             if not (isinstance(spec, dict) and spec.get("task_id") in {"d1", "d2"})]  # 20 MB stays at unit level
    cases.append(({"task_id": "d3", "prompt": "p", "repo": str(sample_repo), "metadata": {"x": "y" * 100_000}},
                  {"metadata"}))
    cluster.worker()
    pending = [cluster.coordinator.send_task("orchestrator.spawn_agent", kwargs={"spec": spec}, queue="agents")
               for spec, _ in cases]
    for (spec, fields), async_result in zip(cases, pending, strict=True):
        result = async_result.get(timeout=30)
        assert result["status"] == "rejected", (spec, result)
        named = {part.split(": ", 1)[0] for part in result["error"].split("; ")}
        assert fields <= named, (fields, result["error"][:300])
        assert result["agent_id"] is None
        assert PASSWORD not in json.dumps(result) and "s3cr3tT0ken" not in json.dumps(result)
    assert offline.calls() == []  # no model call for any of them
    listed = cluster.cli_json("rejected")
    assert len(listed) == len(cases)
    stored = json.dumps(listed)
    assert PASSWORD not in stored and "s3cr3t" not in stored
    by_task = {item["task_id"]: item for item in listed if item["task_id"]}
    for spec, fields in cases:
        if isinstance(spec, dict) and isinstance(spec.get("task_id"), str) and spec["task_id"] in by_task:
            assert {e["field"] for e in by_task[spec["task_id"]]["errors"]} == fields, spec["task_id"]
    assert len(by_task["m7"]["spec"]["prompt"]) < 20_000  # kept, but bounded
    assert len(json.dumps(by_task["d3"])) < 80_000
    assert cluster.cli_json("agents", "--all") == []
    worker_log = (tmp_path / "w1.log").read_text()
    assert PASSWORD not in worker_log and "s3cr3tT0ken" not in worker_log
    # Nothing else changed: the fleet still runs a good spec.
    good = cluster.submit({"task_id": "good-after-bad", "prompt": "Fix the failing test.", "repo": str(sample_repo)})
    assert good.get(timeout=90)["status"] == "completed"
