"""The agent loop in-process: real SDK over HTTP to the offline model, real tools, fakeredis ledger."""

from __future__ import annotations

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
