"""Model traffic through real workers: fleet-wide rate-limit pauses, a kill during a wait, prompt caching, the
context window (with a kill and resume after clearing), and stop reasons.

Windows are shortened to keep the suite fast: a 429 (or 529) window of 8 s with ``retry-after: 2`` (the issue's
example is 20 s with ``retry-after: 5``: the same four pause rounds).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent.context import PLACEHOLDER_PREFIX
from orchestrator.budget import ledger_fields
from orchestrator.pricing import cost_micro_usd
from orchestrator.testing import offline_model
from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, text_turn
from tests.conftest import Cluster, git, mirror_of

MODEL = "claude-sonnet-5-5"
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
              "total_tokens")
WINDOW_SECONDS, RETRY_AFTER = 8.0, 2.0
AGENTS = 6


def ledger_used(cluster: Cluster, agent_id: str) -> int:
    with cluster.state() as r:
        return ledger_fields(r.get(f"orch:budget:agent:{agent_id}:ledger"), 1)[0]


def calls_of(offline: OfflineModel, agent_id: str) -> list[offline_model.ServedCall]:
    return [c for c in offline.calls() if c.agent == agent_id]


def assert_usage_as_served(cluster: Cluster, offline: OfflineModel, result: dict[str, Any]) -> None:
    served = offline.usage_for(result["agent_id"])
    for key in USAGE_KEYS:
        assert result["usage"][key] == served[key], key
    assert ledger_used(cluster, result["agent_id"]) == served["total_tokens"]


@pytest.fixture
def bodies(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every /v1/messages request body the offline model receives, in order."""
    seen: list[dict[str, Any]] = []
    original = offline_model._Handler._messages

    def recording(self: Any, raw: bytes) -> None:
        with contextlib.suppress(ValueError):
            seen.append(json.loads(raw))
        original(self, raw)

    monkeypatch.setattr(offline_model._Handler, "_messages", recording)
    return seen


@pytest.fixture
def windowed(offline: OfflineModel) -> Iterator[OfflineModel]:
    yield offline
    offline.clear_rate_limits()
    offline.context_window = None


def two_workers(cluster: Cluster, **settings: Any) -> None:
    workers = [cluster.worker(name, concurrency=3, wait=False, **settings) for name in ("w1", "w2")]
    for w in workers:
        w.wait_ready()


@pytest.mark.parametrize("status", [429, 529])
def test_a_refusal_window_pauses_the_fleet_and_every_agent_completes(cluster: Cluster, sample_repo: Path,
                                                                     windowed: OfflineModel, status: int) -> None:
    offline = windowed
    offline.add_script("steady", Script([bash(f"sleep 0.3; echo {i} >> steps.txt") for i in range(10)]
                                        + [text_turn("done")]))
    two_workers(cluster)
    pending = [cluster.submit({"task_id": f"rl-{status}-{i}", "prompt": "[[script:steady]] go",
                               "repo": str(sample_repo)}) for i in range(AGENTS)]
    agents = [cluster.agent_for(f"rl-{status}-{i}") for i in range(AGENTS)]
    cluster.wait_for(lambda: all(any(c.status == "completed" for c in calls_of(offline, a)) for a in agents),
                     timeout=60, what="every agent running")
    offline.rate_limit_window(WINDOW_SECONDS, status=status, retry_after=RETRY_AFTER)
    opened = time.monotonic()
    waiting: dict[str, dict[str, Any]] = {}
    with cluster.state() as r:  # sample the records' waiting field while the window is open
        while time.monotonic() - opened < WINDOW_SECONDS:
            for agent_id in agents:
                raw = r.hget(f"orch:agent:{agent_id}", "waiting")
                if raw and json.loads(raw):
                    waiting[agent_id] = json.loads(raw)
            time.sleep(0.2)
    results = [p.get(timeout=90) for p in pending]

    assert [r["status"] for r in results] == ["completed"] * AGENTS, results
    assert all(r["turns"] == 11 for r in results)
    refusals = offline.rejection_counts()
    rounds = int(WINDOW_SECONDS // RETRY_AFTER) + 1  # the first refusal, then one probe per pause
    # A fleet-wide pause: one refusal per round (the first, then each probe), plus one for each agent whose call
    # was already on its way when the pause began (a few at most; typically none). Each agent retrying on its own
    # would collect about AGENTS x rounds (30).
    assert set(refusals) == {status} and refusals[status] <= rounds + AGENTS // 2, refusals
    assert len(waiting) >= AGENTS - 1, waiting  # (nearly) every agent waited, not only those refused
    reason = "rate limited" if status == 429 else "overloaded"
    assert all(w["reason"] == reason and w["status"] == status for w in waiting.values()), waiting
    for result in results:
        assert_usage_as_served(cluster, offline, result)  # refused calls cost nothing
    with cluster.state() as r:
        assert r.hget(f"orch:ratelimit:{MODEL}", "until") is None  # the prober's success ended the pause
        assert all(json.loads(r.hget(f"orch:agent:{a}", "waiting") or "null") is None for a in agents)


def test_kill_cuts_a_rate_limit_wait_at_once(cluster: Cluster, sample_repo: Path, windowed: OfflineModel) -> None:
    offline = windowed
    cluster.worker()
    offline.rate_limit_window(120, retry_after=60)
    pending = cluster.submit({"task_id": "rl-kill", "prompt": "go", "repo": str(sample_repo)})
    agent_id = cluster.agent_for("rl-kill")
    with cluster.state() as r:
        raw = cluster.wait_for(lambda: json.loads(r.hget(f"orch:agent:{agent_id}", "waiting") or "null"),
                               timeout=30, what="the agent waiting")
    assert raw["reason"] == "rate limited" and raw["status"] == 429 and 55 <= raw["until"] - time.time() <= 67
    assert "waiting: rate limited" in cluster.cli("agents").stdout
    started = time.monotonic()
    cluster.cli("kill", agent_id, "--reason", "operator test")
    killed = pending.get(timeout=20)
    assert killed["status"] == "killed", killed
    assert time.monotonic() - started < 4  # the CLI's own start included; the wait had a minute to go
    assert offline.rejection_counts() == {429: 1}  # it waited: no retry hammering the API
    assert killed["usage"]["total_tokens"] == 0 == ledger_used(cluster, agent_id)


def test_prompt_caching_reads_from_turn_two_and_lowers_the_cost(cluster: Cluster, sample_repo: Path,
                                                               offline: OfflineModel) -> None:
    offline.add_script("cached", Script([bash(f"echo {i}; seq 1 200") for i in range(6)] + [text_turn("done")]))
    offline.clear_cache()
    cluster.worker()
    prompt = "[[script:cached]] Fix it. " + "Background on the project: a calculator module with tests. " * 100
    result = cluster.submit({"task_id": "cache-1", "prompt": prompt, "repo": str(sample_repo)}).get(timeout=90)
    assert result["status"] == "completed", result
    calls = calls_of(offline, result["agent_id"])
    assert [c.turn for c in calls] == list(range(7))
    assert calls[0].usage["cache_read_input_tokens"] == 0 < calls[0].usage["cache_creation_input_tokens"]
    assert all(c.usage["cache_read_input_tokens"] > 0 for c in calls[1:]), [c.usage for c in calls]
    assert_usage_as_served(cluster, offline, result)
    # The bill uses cache prices; the same tokens without a cache (every input token at the input price) cost more.
    u = result["usage"]
    billed = cost_micro_usd(MODEL, u["input_tokens"], u["output_tokens"], u["cache_creation_input_tokens"],
                            u["cache_read_input_tokens"]) / 1e6
    uncached = cost_micro_usd(MODEL, u["input_tokens"] + u["cache_creation_input_tokens"]
                              + u["cache_read_input_tokens"], u["output_tokens"], 0, 0) / 1e6
    assert u["cost_usd"] == pytest.approx(billed, abs=1e-5)
    assert u["cost_usd"] < 0.6 * uncached


def test_a_long_run_clears_old_tool_results_and_resumes_with_the_same_prefix(
        cluster: Cluster, sample_repo: Path, windowed: OfflineModel, bodies: list[dict[str, Any]]) -> None:
    offline = windowed
    slow = Turn([{"type": "text", "text": "thinking " * 60},
                 {"type": "tool_use", "name": "bash", "input": {"command": "echo slow > slow.txt"}}], chunk_delay=0.5)
    turns = [bash(f"python3 -c \"print('{i}' * 3000)\"") for i in range(8)]
    offline.add_script("long", Script([*turns, slow, bash("echo after > after.txt"), text_turn("done")]))
    offline.context_window = 6000
    cluster.worker(context_window_tokens=6000, max_tokens_per_turn=1024, context_keep_tool_results=2)
    pending = cluster.submit({"task_id": "ctx-1", "prompt": "[[script:long]] go", "repo": str(sample_repo)})
    agent_id = cluster.agent_for("ctx-1")
    cluster.wait_for(lambda: any(c.turn == 8 and c.status == "open" for c in calls_of(offline, agent_id)),
                     timeout=60, what="the slow turn streaming")
    with cluster.state() as r:
        saved = json.loads(r.get(f"orch:checkpoint:{agent_id}"))
    assert PLACEHOLDER_PREFIX in json.dumps(saved["messages"])  # cleared before the slow turn
    cluster.cli("kill", agent_id)
    assert pending.get(timeout=20)["status"] == "killed"
    with cluster.state() as r:
        checkpoint = json.loads(r.get(f"orch:checkpoint:{agent_id}"))["messages"]
    before_resume = len(bodies)
    cluster.cli("resume", agent_id)
    final = cluster.wait_for(lambda: (rec := cluster.record(agent_id))["state"] == "completed" and rec, timeout=60,
                             what="the resumed agent to complete")
    assert final["result"]["turns"] == 11 and final["error"] is None
    cut = [b for b in bodies[:before_resume] if b["metadata"]["user_id"] == agent_id][-1]
    resumed = next(b for b in bodies[before_resume:] if b["metadata"]["user_id"] == agent_id)
    # The resumed run's first request is exactly the request the kill cut: same system, tools, messages, marks...
    assert {k: resumed[k] for k in ("system", "tools", "messages")} == {k: cut[k] for k in ("system", "tools",
                                                                                            "messages")}
    # ... and it carries exactly the checkpoint's (cleared) transcript.
    assert strip_marks(resumed["messages"]) == as_blocks(checkpoint)
    calls = calls_of(offline, agent_id)
    assert [c.turn for c in calls].count(8) == 2 and all(c.http_status == 200 for c in calls)
    cut_call = next(c for c in calls if c.turn == 8)
    resumed_call = [c for c in calls if c.turn == 8][1]
    assert resumed_call.usage["cache_read_input_tokens"] == (cut_call.usage["cache_read_input_tokens"]
                                                             + cut_call.usage["cache_creation_input_tokens"])
    files = git(mirror_of(cluster.workspace), "ls-tree", "--name-only", final["commit"]).split()
    assert {"slow.txt", "after.txt"} <= set(files)


def strip_marks(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(m, content=[{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]])
            for m in messages]


def as_blocks(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(m, content=[{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                 else m["content"]) for m in messages]


def test_refusal_fails_with_the_reason_and_max_tokens_goes_on(cluster: Cluster, sample_repo: Path,
                                                             offline: OfflineModel) -> None:
    offline.add_script("cutoff", Script([
        Turn([{"type": "text", "text": "Let me run"},
              {"type": "tool_use", "name": "bash", "input": {"command": "touch cut-off-ran.txt"}}],
             stop_reason="max_tokens"),
        bash("touch after.txt"), text_turn("done")]))
    offline.add_script("refuse", Script([bash("echo hi > hi.txt"),
                                         Turn([{"type": "text", "text": "I can't help with that."}],
                                              stop_reason="refusal")]))
    cluster.worker(concurrency=2)
    cut = cluster.submit({"task_id": "cut-1", "prompt": "[[script:cutoff]] go", "repo": str(sample_repo)})
    refused = cluster.submit({"task_id": "ref-1", "prompt": "[[script:refuse]] go", "repo": str(sample_repo)})
    cut_result, refused_result = cut.get(timeout=90), refused.get(timeout=90)

    assert cut_result["status"] == "completed" and cut_result["turns"] == 3, cut_result
    files = git(mirror_of(cluster.workspace), "ls-tree", "--name-only", cut_result["commit"]).split()
    assert "after.txt" in files and "cut-off-ran.txt" not in files  # the cut-off call was never run
    assert refused_result["status"] == "failed" and refused_result["stop_reason"] == "refusal"
    assert "refused" in refused_result["error"] and "I can't help with that." in refused_result["error"]
    assert "hi.txt" in git(mirror_of(cluster.workspace), "ls-tree", "--name-only", refused_result["commit"])
    for result in (cut_result, refused_result):
        assert_usage_as_served(cluster, offline, result)
