"""The agent loop in-process: real SDK over HTTP to the offline model, real tools, fakeredis ledger."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import fakeredis
import pytest

from orchestrator.agent.loop import AgentLoop, Checkpoint, LoopConfig, StopRun, StopSignal
from orchestrator.agent.model import ModelClient
from orchestrator.agent.tools import TOOL_DEFINITIONS, Toolbox
from orchestrator.budget import AgentLedger, Budget
from orchestrator.keys import Keys
from orchestrator.models import State
from orchestrator.settings import Settings
from orchestrator.store import AgentStore
from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, text_turn


class Harness:
    def __init__(self, offline: OfflineModel, repo: Path, agent: str = "agent-1", **settings: Any) -> None:
        self.settings = Settings(_env_file=None, **settings)  # type: ignore[call-arg, arg-type]
        self.r = fakeredis.FakeRedis(decode_responses=True)
        self.budget = Budget(self.r, self.settings)
        self.store = AgentStore(self.r, Keys())
        self.agent = agent
        self.warnings: list[str] = []
        self.client = anthropic.Anthropic(base_url=offline.url, api_key="offline", max_retries=0)
        self.model = ModelClient(self.client, "claude-sonnet-5-5", "system", TOOL_DEFINITIONS, user_id=agent)
        self.toolbox = Toolbox(repo, shell_timeout=30)
        self.stop = StopSignal()
        self.checkpoints: list[dict[str, Any]] = []

    def loop(self, max_turns: int = 50, agent_limit: int | None = None) -> AgentLoop:
        limit = agent_limit or self.settings.agent_token_limit
        ledger = AgentLedger(self.budget, self.agent, limit, "claude-sonnet-5-5", self.warnings.append)
        return AgentLoop(self.model, self.toolbox, ledger, self.stop,
                         LoopConfig(max_turns=max_turns, max_tokens_per_turn=self.settings.max_tokens_per_turn),
                         on_checkpoint=lambda cp: self.checkpoints.append(cp.to_json()))

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def harness(offline: OfflineModel, sample_repo: Path) -> Any:
    h = Harness(offline, sample_repo)
    yield h
    h.close()


def stop_after(harness: Harness, seconds: float) -> None:
    """Request a kill from another thread, as the supervisor does: flag it, then cut the call."""
    threading.Timer(seconds, lambda: (harness.stop.request(State.KILLED, "test"), harness.model.cancel())).start()


def fresh(prompt: str = "Fix the failing test") -> Checkpoint:
    return Checkpoint(messages=[{"role": "user", "content": prompt}])


def test_loop_fixes_the_repo_and_counts_usage(harness: Harness, offline: OfflineModel, sample_repo: Path) -> None:
    cp = harness.loop().run(fresh())
    assert cp.turns == 5 and cp.stop_reason == "end_turn"
    assert "return a + b" in (sample_repo / "calc.py").read_text()
    served = offline.usage_for("agent-1")
    assert cp.usage.total_tokens == served["total_tokens"] == harness.budget.agent_used("agent-1")
    assert harness.budget.day_totals()["reserved"] == 0
    assert cp.usage.cost_usd > 0


def test_resume_from_checkpoint_does_not_ask_for_done_turns(harness: Harness, offline: OfflineModel) -> None:
    first = harness.loop(max_turns=2).run(fresh())
    assert first.turns == 2 and first.stop_reason == "max_turns"
    saved = Checkpoint.from_json(harness.checkpoints[-1])
    final = harness.loop().run(saved)
    assert final.turns == 5
    turns_served = [c.turn for c in offline.calls()]
    assert sorted(turns_served) == [0, 1, 2, 3, 4]  # every turn asked exactly once
    assert final.usage.total_tokens == offline.usage_for("agent-1")["total_tokens"]


def test_pending_tool_uses_run_on_resume_without_asking_again(harness: Harness, offline: OfflineModel,
                                                              sample_repo: Path) -> None:
    harness.loop(max_turns=3).run(fresh())
    # Simulate a crash after the model's 3rd reply but before its tool ran: drop the last tool results.
    cp = Checkpoint.from_json(harness.checkpoints[-1])
    assert cp.messages[-1]["role"] == "user"
    cp.messages.pop()
    (sample_repo / "calc.py").write_text("def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n")
    final = harness.loop().run(cp)
    assert final.turns == 5 and "return a + b" in (sample_repo / "calc.py").read_text()
    assert sorted(c.turn for c in offline.calls()) == [0, 1, 2, 3, 4]


def test_hard_budget_stops_with_tokens_at_most_the_limit(harness: Harness, offline: OfflineModel) -> None:
    offline.add_script("forever", Script([bash("echo working")], repeat_last=True))
    with pytest.raises(StopRun) as stop:
        harness.loop(agent_limit=6_000).run(fresh("[[script:forever]] go"))
    assert stop.value.status == State.BUDGET_EXCEEDED
    served = offline.usage_for("agent-1")["total_tokens"]
    assert 0 < served <= 6_000
    assert harness.budget.agent_used("agent-1") == served
    assert any(c.max_tokens < harness.settings.max_tokens_per_turn for c in offline.calls())  # lowered


def test_stop_cuts_a_slow_stream_at_once(harness: Harness, offline: OfflineModel) -> None:
    offline.add_script("slow", Script([Turn([{"type": "text", "text": "x" * 400}], chunk_delay=1.0)]))
    loop = harness.loop()
    stop_after(harness, 0.5)
    started = time.monotonic()
    with pytest.raises(StopRun) as stop:
        loop.run(fresh("[[script:slow]] go"))
    assert stop.value.status == State.KILLED
    assert time.monotonic() - started < 2.5
    deadline = time.monotonic() + 2
    while offline.open_streams() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert offline.open_streams() == 0
    assert harness.budget.day_totals()["reserved"] == 0  # the cut call's reservation was settled


def test_stop_kills_a_running_shell_command(harness: Harness, offline: OfflineModel) -> None:
    offline.add_script("sleepy", Script([bash("sleep 600"), text_turn("never")]))
    loop = harness.loop()

    def stop_later() -> None:
        while harness.toolbox.running_pgid is None:
            time.sleep(0.01)
        harness.stop.request(State.KILLED, "test")
        harness.toolbox.kill_running()

    threading.Thread(target=stop_later, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(StopRun):
        loop.run(fresh("[[script:sleepy]] go"))
    assert time.monotonic() - started < 3
    assert len(offline.calls()) == 1  # the model was not asked again after the stop


def test_stop_cuts_a_call_before_any_response_header(harness: Harness, offline: OfflineModel) -> None:
    offline.latency = 30.0  # the server says nothing at all for 30 s
    loop = harness.loop()
    stop_after(harness, 0.5)
    started = time.monotonic()
    with pytest.raises(StopRun) as stop:
        loop.run(fresh("go"))
    assert stop.value.status == State.KILLED
    assert time.monotonic() - started < 3
    assert harness.budget.day_totals()["reserved"] == 0


def test_unreachable_ledger_fails_closed_without_a_model_call(offline: OfflineModel, sample_repo: Path) -> None:
    import redis

    from orchestrator.testing.cluster import free_port

    h = Harness(offline, sample_repo)
    try:
        dead = redis.Redis(port=free_port(), decode_responses=True, socket_connect_timeout=0.2)
        h.budget = Budget(dead, h.settings)
        with pytest.raises(StopRun) as stop:
            h.loop().run(fresh())
        assert stop.value.status == State.FAILED and "fail closed" in stop.value.reason
        assert offline.calls() == []  # no reservation, no call
    finally:
        h.close()


# -- model traffic: stop reasons, rate limits, prompt caching, the context window -------------------------------
LONG_PROMPT = "Fix the failing test. " + "Background on the project: it adds numbers. " * 120  # > 1,024 tokens


def served_cost(calls: list[Any], cached: bool) -> float:
    """The cost of the served calls, with cache prices (as billed) or as if every input token were uncached."""
    from orchestrator.pricing import cost_micro_usd

    total = 0
    for c in calls:
        u = c.usage
        if cached:
            total += cost_micro_usd("claude-sonnet-5-5", u["input_tokens"], u["output_tokens"],
                                    u["cache_creation_input_tokens"], u["cache_read_input_tokens"])
        else:
            total += cost_micro_usd("claude-sonnet-5-5", u["input_tokens"] + u["cache_creation_input_tokens"]
                                    + u["cache_read_input_tokens"], u["output_tokens"], 0, 0)
    return total / 1_000_000


def test_prompt_caching_reads_from_turn_two_and_costs_less(harness: Harness, offline: OfflineModel,
                                                           sample_repo: Path) -> None:
    offline.add_script("steps", Script([bash(f"echo step {i}; seq 1 100") for i in range(6)] + [text_turn("done")]))
    offline.clear_cache()
    cp = harness.loop().run(fresh(f"[[script:steps]] {LONG_PROMPT}"))
    calls = [c for c in offline.calls() if c.agent == "agent-1"]
    assert cp.turns == 7 and [c.turn for c in calls] == list(range(7))
    assert calls[0].usage["cache_read_input_tokens"] == 0 and calls[0].usage["cache_creation_input_tokens"] > 0
    assert all(c.usage["cache_read_input_tokens"] > 0 for c in calls[1:])  # from turn 2 on
    served = offline.usage_for("agent-1")
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                "total_tokens"):
        assert getattr(cp.usage, key) == served[key], key
    assert harness.budget.agent_used("agent-1") == served["total_tokens"]
    assert cp.usage.cost_usd == pytest.approx(served_cost(calls, cached=True), abs=2e-6)
    assert cp.usage.cost_usd < 0.6 * served_cost(calls, cached=False)
    assert "cache_control" not in json.dumps(harness.checkpoints)  # marks are in requests only

    # The same run without caching: no cache tokens, and a higher bill.
    plain = Harness(offline, sample_repo, agent="agent-2")
    try:
        plain.model.caching = False
        uncached = plain.loop().run(fresh(f"[[script:steps]] {LONG_PROMPT}"))
    finally:
        plain.close()
    assert uncached.usage.cache_read_input_tokens == 0 == uncached.usage.cache_creation_input_tokens
    assert uncached.usage.total_tokens == offline.usage_for("agent-2")["total_tokens"]
    assert cp.usage.cost_usd < 0.6 * uncached.usage.cost_usd


def test_every_stop_reason_is_handled(harness: Harness, offline: OfflineModel, sample_repo: Path) -> None:
    offline.add_script("stops", Script([
        Turn([{"type": "text", "text": "Searching..."}], stop_reason="pause_turn"),
        Turn([{"type": "text", "text": "Let me run"},
              {"type": "tool_use", "name": "bash", "input": {"command": "touch cut-off-ran.txt"}}],
             stop_reason="max_tokens"),
        bash("touch ran.txt"),
        Turn([], stop_reason="refusal"),
    ]))
    with pytest.raises(StopRun) as stop:
        harness.loop().run(fresh("[[script:stops]] go"))
    assert stop.value.status == State.FAILED and "refused" in stop.value.reason
    assert [c.turn for c in offline.calls()] == [0, 1, 2, 3]  # pause_turn and max_tokens went on
    assert (sample_repo / "ran.txt").exists() and not (sample_repo / "cut-off-ran.txt").exists()
    saved = harness.checkpoints[-1]
    assert saved["stop_reason"] == "refusal"
    answer = saved["messages"][3]["content"]  # the cut-off call is answered, not run: the transcript stays valid
    assert answer[0]["type"] == "tool_result" and answer[0]["is_error"] and "cut off" in answer[0]["content"]
    assert answer[0]["tool_use_id"] == saved["messages"][2]["content"][1]["id"]


def test_context_window_exceeded_goes_on_after_clearing(harness: Harness, offline: OfflineModel) -> None:
    offline.add_script("overflow", Script([*big_outputs(3, 2000).turns[:3],
                                           Turn([{"type": "text", "text": "Running out of"}],
                                                stop_reason="model_context_window_exceeded"),
                                           text_turn("done")]))
    loop = AgentLoop(harness.model, harness.toolbox, AgentLedger(harness.budget, "agent-1", 10**9, "claude-sonnet-5-5",
                                                                 harness.warnings.append), harness.stop,
                     LoopConfig(max_turns=20, max_tokens_per_turn=512, context_window=50_000, keep_tool_results=1),
                     on_checkpoint=lambda cp: None)
    cp = loop.run(fresh("[[script:overflow]] go"))
    assert cp.turns == 5 and cp.stop_reason == "end_turn"
    assert loop.cleared == 2  # the window is far from full, yet the model said it ran out: old results went
    assert cp.messages[-2] == {"role": "user", "content": "Your reply was cut off by the token limit. Continue where "
                                                          "you stopped."}


def test_rate_limited_calls_wait_and_cost_nothing(harness: Harness, offline: OfflineModel) -> None:
    offline.rate_limit_window(1.5, retry_after=0.5)
    started = time.monotonic()
    cp = harness.loop().run(fresh())
    assert cp.turns == 5 and cp.stop_reason == "end_turn" and time.monotonic() - started >= 1.4
    assert 1 <= offline.rejection_counts().get(429, 0) <= 5
    served = offline.usage_for("agent-1")["total_tokens"]
    assert cp.usage.total_tokens == served == harness.budget.agent_used("agent-1")  # refusals were not billed
    assert harness.budget.day_totals()["reserved"] == 0


def test_spend_limit_fails_at_once(harness: Harness, offline: OfflineModel) -> None:
    offline.rate_limit_window(30, retry_after=5, error_code="enforced_spend_limit_reached",
                              message="You have reached your specified API usage limits.")
    started = time.monotonic()
    try:
        with pytest.raises(StopRun) as stop:
            harness.loop().run(fresh())
    finally:
        offline.clear_rate_limits()
    assert stop.value.status == State.FAILED and "spend limit" in stop.value.reason
    assert time.monotonic() - started < 2 and offline.rejection_counts() == {429: 1}
    assert harness.budget.day_totals()["reserved"] == 0 and harness.budget.agent_used("agent-1") == 0


def big_outputs(turns: int, chars: int) -> Script:
    return Script([bash(f"python3 -c \"print('{i}' * {chars})\"") for i in range(turns)] + [text_turn("done")])


@pytest.fixture
def small_window(offline: OfflineModel) -> Any:
    yield offline
    offline.context_window = None


def test_a_long_run_clears_old_tool_results_to_fit(harness: Harness, small_window: OfflineModel) -> None:
    offline = small_window
    offline.add_script("big", big_outputs(8, 2000))  # each result ~500 tokens; the whole run ~5,000
    offline.context_window = 3000
    loop = AgentLoop(harness.model, harness.toolbox, AgentLedger(harness.budget, "agent-1", 10**9, "claude-sonnet-5-5",
                                                                 harness.warnings.append), harness.stop,
                     LoopConfig(max_turns=20, max_tokens_per_turn=512, context_window=3000, keep_tool_results=2),
                     on_checkpoint=lambda cp: harness.checkpoints.append(cp.to_json()))
    cp = loop.run(fresh("[[script:big]] go"))
    assert cp.turns == 9 and cp.stop_reason == "end_turn"
    assert all(c.status == "completed" for c in offline.calls())  # never refused as too long
    blocks = [b for m in cp.messages if m["role"] == "user" and isinstance(m["content"], list) for b in m["content"]]
    cleared = [b["content"].startswith("[cleared") for b in blocks]
    assert cleared[-2:] == [False, False] and 3 <= sum(cleared) <= 6  # the most recent kept; old ones cleared
    assert loop.cleared == sum(cleared)


def test_a_prompt_too_long_400_is_cleared_and_retried(harness: Harness, small_window: OfflineModel) -> None:
    offline = small_window
    offline.add_script("big", big_outputs(8, 2000))
    offline.context_window = 3000  # the loop does not know it: it learns it from the API's 400
    loop = AgentLoop(harness.model, harness.toolbox, AgentLedger(harness.budget, "agent-1", 10**9, "claude-sonnet-5-5",
                                                                 harness.warnings.append), harness.stop,
                     LoopConfig(max_turns=20, max_tokens_per_turn=512, keep_tool_results=2),
                     on_checkpoint=lambda cp: None)
    cp = loop.run(fresh("[[script:big]] go"))
    assert cp.turns == 9 and loop.cleared >= 3
    assert [c.http_status for c in offline.calls()].count(400) == 1  # learnt once
    assert cp.usage.total_tokens == offline.usage_for("agent-1")["total_tokens"]


def test_a_conversation_that_cannot_fit_fails(harness: Harness, small_window: OfflineModel) -> None:
    offline = small_window
    offline.add_script("big", big_outputs(8, 4000))
    offline.context_window = 3000
    loop = AgentLoop(harness.model, harness.toolbox, AgentLedger(harness.budget, "agent-1", 10**9, "claude-sonnet-5-5",
                                                                 harness.warnings.append), harness.stop,
                     LoopConfig(max_turns=20, max_tokens_per_turn=512, context_window=3000, keep_tool_results=3),
                     on_checkpoint=lambda cp: None)
    with pytest.raises(StopRun) as stop:
        loop.run(fresh("[[script:big]] go"))  # the three results kept are ~3,000 tokens on their own
    assert stop.value.status == State.FAILED and "context window exhausted" in stop.value.reason
    assert all(c.status == "completed" for c in offline.calls())
