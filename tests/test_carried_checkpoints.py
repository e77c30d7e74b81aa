"""The ledger carries the loop's checkpoints: one script per reservation (with the checkpoint after a turn's tools)
and one per settlement (with the checkpoint after the reply), on a real valkey-server, the real SDK and offline
model, real tools. A checkpoint that waits for the next reservation is written on its own first whenever anything
could come between (the run ends, a rate-limit wait, a token count)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
import pytest
import redis

from orchestrator.agent.loop import AgentLoop, Checkpoint, LoopConfig, StopSignal
from orchestrator.agent.model import ModelClient
from orchestrator.agent.tools import TOOL_DEFINITIONS, Toolbox
from orchestrator.budget import AgentLedger, Budget, Progress
from orchestrator.errors import StaleFence, StopRun
from orchestrator.keys import Keys
from orchestrator.lifecycle import AdmitParams, Lifecycle
from orchestrator.settings import Settings
from orchestrator.states import State
from orchestrator.testing.cluster import Valkey
from orchestrator.testing.offline_model import OfflineModel, Script, bash, text_turn

MODEL = "claude-sonnet-5-5"
K = Keys("orch:")
PARAMS = AdmitParams(lease_seconds=60, slot_lease_seconds=600, slot_limit=100, hard=True, max_recoveries=3)
TOOL_TURNS = 12


class Run:
    """One admitted agent whose loop writes through a carrying ledger, as AgentRun wires it."""

    def __init__(self, r: redis.Redis, offline: OfflineModel, repo: Path, agent_id: str) -> None:
        self.r = r
        self.settings = Settings(_env_file=None)
        self.budget = Budget(r, self.settings)
        self.life = Lifecycle(r, K, PARAMS)
        self.agent_id, _, _ = self.life.create({"task_id": agent_id, "state": "queued", "spec": {}, "recoveries": 0},
                                               agent_id)
        self.fence = self.life.admit(self.agent_id, "test", "test", priority=5, duration_seconds=3600).fence
        self.carried: list[str] = []  # "reserve"/"settle" by the last message's role: what rode along
        self.own_saves: list[dict[str, Any]] = []  # checkpoints written by a save of their own
        self.own_saves_fail = False
        self.client = anthropic.Anthropic(base_url=offline.url, api_key="offline", max_retries=0)
        self.model = ModelClient(self.client, MODEL, "system", TOOL_DEFINITIONS, user_id=self.agent_id)
        self.toolbox = Toolbox(repo, shell_timeout=30)
        self.stop = StopSignal()

    def carry(self, cp: Checkpoint | None) -> Progress:
        if cp is None:  # the fence alone
            return Progress(K.fence(self.agent_id), self.fence, K.checkpoint(self.agent_id), "",
                            K.snapshot(self.agent_id))
        self.carried.append(cp.messages[-1]["role"])
        return Progress(K.fence(self.agent_id), self.fence, K.checkpoint(self.agent_id), json.dumps(cp.to_json()),
                        K.snapshot(self.agent_id))

    def save(self, cp: Checkpoint) -> None:
        if self.own_saves_fail:
            raise redis.ConnectionError("own saves are down in this test")
        self.own_saves.append(cp.to_json())
        self.life.save(self.agent_id, self.fence, cp.to_json())

    def loop(self, max_turns: int = 100, limiter: Any = None) -> AgentLoop:
        ledger = AgentLedger(self.budget, self.agent_id, self.settings.agent_token_limit, MODEL, lambda m: None,
                             persist=self.carry)
        return AgentLoop(self.model, self.toolbox, ledger, self.stop,
                         LoopConfig(max_turns=max_turns, max_tokens_per_turn=self.settings.max_tokens_per_turn),
                         on_checkpoint=self.save, limiter=limiter)

    def saved(self) -> dict[str, Any]:
        return dict(json.loads(self.r.get(K.checkpoint(self.agent_id)) or "null"))


@pytest.fixture
def r(valkey: Valkey) -> Iterator[redis.Redis]:
    with valkey.client(2) as client:
        yield client


@pytest.fixture
def runs(r: redis.Redis, offline: OfflineModel, sample_repo: Path) -> Iterator[Callable[[str], Run]]:
    made: list[Run] = []

    def make(agent_id: str) -> Run:
        made.append(Run(r, offline, sample_repo, agent_id))
        return made[-1]

    yield make
    for run in made:
        run.client.close()


def tool_script(n: int) -> Script:
    return Script([*(bash(f"true {i}") for i in range(n)), text_turn("done")])


def commands(r: redis.Redis) -> dict[str, int]:
    stats = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) - int(v.get("failed_calls", 0))
            - int(v.get("rejected_calls", 0)) for name, v in stats.items()}  # a NOSCRIPT (then loaded) is no work


def test_a_turn_is_two_scripts_and_every_checkpoint_is_written(runs: Callable[[str], Run], r: redis.Redis,
                                                               offline: OfflineModel) -> None:
    offline.add_script("carried", tool_script(TOOL_TURNS))
    run = runs("carried-1")
    before = commands(r)
    cp = run.loop().run(Checkpoint(messages=[{"role": "user", "content": "[[script:carried]] go"}]))
    after = commands(r)
    turns = TOOL_TURNS + 1
    assert cp.turns == turns and cp.stop_reason == "end_turn"
    scripts = after.get("evalsha", 0) - before.get("evalsha", 0)
    # reserve + settle per turn, plus one save of the run's end (stop_reason): no separate checkpoint scripts
    assert scripts == 2 * turns + 1, scripts
    assert len(run.own_saves) == 1 and run.own_saves[0]["stop_reason"] == "end_turn"
    # every reply rode with its settlement, every set of tool results with the next reservation
    assert run.carried.count("assistant") == turns and run.carried.count("user") == TOOL_TURNS
    # Server-side commands, those inside the scripts too: 12 a turn (reserve: EVALSHA, MGET, SET checkpoint, SET
    # day, SET agent, ZADD; settle: EVALSHA, ZREM, MGET, SET day, SET agent, SET checkpoint), plus the run's fixed
    # cost (script loads, the end's save, the day's registration, this INFO)
    total = sum(after.values()) - sum(before.values())
    assert total <= 12 * turns + 12, f"{total / turns:.1f} server-side commands per turn"
    assert run.saved() == cp.to_json()
    served = offline.usage_for(run.agent_id)
    assert run.budget.agent_totals(run.agent_id) == (served["total_tokens"], 0)
    assert run.budget.day_totals()["reserved"] == 0


def test_the_run_end_writes_the_tool_results_still_waiting(runs: Callable[[str], Run], offline: OfflineModel) -> None:
    offline.add_script("carried", tool_script(TOOL_TURNS))
    run = runs("carried-2")
    cp = run.loop(max_turns=3).run(Checkpoint(messages=[{"role": "user", "content": "[[script:carried]] go"}]))
    assert cp.stop_reason == "max_turns"
    saved = run.saved()
    assert saved["turns"] == 3 and saved["messages"][-1]["role"] == "user"  # the third turn's tool results
    assert saved["messages"][-1]["content"][0]["type"] == "tool_result"


def test_a_stale_run_is_charged_for_its_call_but_writes_nothing(runs: Callable[[str], Run], r: redis.Redis,
                                                                offline: OfflineModel) -> None:
    offline.add_script("carried", tool_script(TOOL_TURNS))
    run = runs("carried-3")
    newer = {"messages": [{"role": "user", "content": "the newer run's transcript"}], "turns": 0}

    class Outrun:
        """A run that is fenced out while its third call is in flight (a sweeper recovered it)."""

        def __init__(self) -> None:
            self.calls = 0

        def wait_if_paused(self, before_wait: Callable[[], None] | None = None) -> None:
            pass

        def before_call(self, input_tokens: int, output_tokens: int,
                        before_wait: Callable[[], None] | None = None) -> None:
            pass

        def on_response(self, headers: Mapping[str, str]) -> None:
            self.calls += 1
            if self.calls == 3:
                r.set(K.fence(run.agent_id), "99:1")  # a newer run's token
                r.set(K.checkpoint(run.agent_id), json.dumps(newer))

        def on_failure(self, exc: BaseException) -> bool:
            return False

        def close(self) -> None:
            pass

    with pytest.raises(StaleFence):
        run.loop(limiter=Outrun()).run(Checkpoint(messages=[{"role": "user", "content": "[[script:carried]] go"}]))
    assert run.saved() == newer  # the stale run's settlement did not write its checkpoint
    served = offline.usage_for(run.agent_id)["total_tokens"]
    assert run.budget.agent_totals(run.agent_id) == (served, 0)  # ...but its third call was charged
    assert run.budget.day_totals()["reserved"] == 0


def test_a_rate_limit_wait_writes_the_waiting_checkpoint_first(runs: Callable[[str], Run],
                                                               offline: OfflineModel) -> None:
    offline.add_script("carried", tool_script(TOOL_TURNS))
    run = runs("carried-4")
    seen: list[dict[str, Any]] = []

    class PausedOnce:
        """The fleet is paused before the third call: the limiter waits (and calls before_wait first)."""

        def __init__(self) -> None:
            self.calls = 0

        def wait_if_paused(self, before_wait: Callable[[], None] | None = None) -> None:
            self.calls += 1
            if self.calls == 3 and before_wait is not None:
                before_wait()
                seen.append(run.saved())  # what a crash during the wait would resume from

        def before_call(self, input_tokens: int, output_tokens: int,
                        before_wait: Callable[[], None] | None = None) -> None:
            pass

        def on_response(self, headers: Mapping[str, str]) -> None:
            pass

        def on_failure(self, exc: BaseException) -> bool:
            return False

        def close(self) -> None:
            pass

    cp = run.loop(limiter=PausedOnce()).run(Checkpoint(messages=[{"role": "user", "content": "[[script:carried]] go"}]))
    assert cp.stop_reason == "end_turn"
    assert seen and seen[0]["turns"] == 2 and seen[0]["messages"][-1]["role"] == "user"  # turn 2's tool results
    assert len(run.own_saves) == 2  # that flush and the run's end


def test_a_refused_reservation_still_writes_the_checkpoint_it_carries(runs: Callable[[str], Run],
                                                                      offline: OfflineModel) -> None:
    offline.add_script("carried", tool_script(TOOL_TURNS))
    run = runs("carried-5")
    loop = run.loop()
    assert isinstance(loop.ledger, AgentLedger)
    loop.ledger.agent_limit = 6_000  # enough for a few turns, then a reservation is refused (hard mode)
    run.own_saves_fail = True  # so what is saved at the end can only have come with the refused reservation
    with pytest.raises(StopRun) as stopped:
        loop.run(Checkpoint(messages=[{"role": "user", "content": "[[script:carried]] go"}]))
    assert stopped.value.status == State.BUDGET_EXCEEDED
    assert run.carried[-1] == "user" and not run.own_saves
    saved = run.saved()
    assert saved["messages"][-1]["role"] == "user" and saved["messages"][-1]["content"][0]["type"] == "tool_result"
    assert run.budget.agent_totals(run.agent_id)[0] == offline.usage_for(run.agent_id)["total_tokens"] <= 6_000


def test_checkpoint_text_encodes_each_message_once_and_follows_clearing() -> None:
    from orchestrator.agent.context import clear_old_tool_results

    cp = Checkpoint(messages=[{"role": "user", "content": "go é"}])
    for i in range(6):
        cp.messages.append({"role": "assistant", "content": [{"type": "tool_use", "id": f"t{i}", "name": "bash",
                                                              "input": {"command": f"cat big{i}"}}]})
        cp.messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}",
                                                         "content": "x" * 5000}]})
        cp.turns += 1
        assert json.loads(cp.dumps()) == cp.to_json()
    cp.messages = clear_old_tool_results(cp.messages, keep=2).messages  # copies the messages it changes
    cp.stop_reason = "end_turn"
    text = cp.dumps()
    assert json.loads(text) == cp.to_json() and len(text) < 15_000
    assert Checkpoint.from_json(json.loads(text)).to_json() == cp.to_json()


def test_a_stale_reservation_writes_nothing(r: redis.Redis) -> None:
    budget = Budget(r, Settings(_env_file=None))
    r.set(K.fence("a1"), "2:200")
    r.set(K.checkpoint("a1"), '{"turns": 7}')
    stale = Progress(K.fence("a1"), "1:100", K.checkpoint("a1"), '{"turns": 1}', K.snapshot("a1"), "bundle")
    with pytest.raises(StaleFence):
        budget.reserve("a1", 10_000, 100, 100, progress=stale)
    assert r.get(K.checkpoint("a1")) == '{"turns": 7}' and not r.exists(K.snapshot("a1"))
    assert r.zcard(K.reservations) == 0 and budget.day_totals()["reserved"] == 0
    assert budget.agent_totals("a1") == (0, 0)
    current = Progress(K.fence("a1"), "2:200", K.checkpoint("a1"), '{"turns": 8}', K.snapshot("a1"), "bundle")
    res = budget.reserve("a1", 10_000, 100, 100, progress=current)
    assert res is not None and r.get(K.checkpoint("a1")) == '{"turns": 8}' and r.get(K.snapshot("a1")) == "bundle"
    assert budget.agent_totals("a1") == (0, 200) and budget.day_totals()["reserved"] == 200


def test_a_carried_snapshot_that_was_not_written_is_written_by_the_next_save(valkey: Valkey, sample_repo: Path,
                                                                             tmp_path: Path) -> None:
    """The reservation that carried a snapshot failed (Valkey away): the loop's own save must write it."""
    from orchestrator import runner
    from orchestrator.fleet import Fleet
    from orchestrator.models import AgentSpec
    from orchestrator.workspace import Workspace

    settings = Settings(broker_url=valkey.url, workspace_dir=tmp_path / "ws", _env_file=None)
    fleet = Fleet.create(settings)
    intake = runner.intake(fleet, {"task_id": "carry-snap", "repo": str(sample_repo), "prompt": "go"}, None)
    assert isinstance(intake, tuple)
    agent_id = intake[0]
    rec = fleet.store.get(agent_id)
    assert rec is not None
    spec = AgentSpec.model_validate(rec["spec"])
    adm = fleet.lifecycle.admit(agent_id, "h", "w", priority=5, duration_seconds=600)
    run = runner.AgentRun(fleet, rec, spec, "w", "h", adm)
    wt = run._prepare()
    cp = Checkpoint(messages=[{"role": "user", "content": "go"}])
    cp.messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]})
    run._save_checkpoint(cp)  # a first snapshot, as after an earlier turn's tools
    first = fleet.store.load_snapshot(agent_id)
    (wt.path / "made-by-tools.txt").write_text("the tools' work\n")
    carried = run._progress_to_carry(cp)  # the next reservation would carry it...
    assert carried.snapshot
    run._save_checkpoint(cp)  # ...but its script failed: the loop's flush saves on its own
    data = fleet.store.load_snapshot(agent_id)
    assert data is not None and data != first
    restored = Workspace(tmp_path / "other-host").prepare(agent_id, str(sample_repo), "main", rec["branch"], data)
    assert (restored.path / "made-by-tools.txt").read_text() == "the tools' work\n"
    fleet.r.close()


def test_a_fenced_out_run_cannot_reserve_even_without_a_checkpoint(runs: Callable[[str], Run], r: redis.Redis,
                                                                   offline: OfflineModel) -> None:
    offline.add_script("carried", tool_script(TOOL_TURNS))
    run = runs("carried-6")
    r.set(K.fence(run.agent_id), "99:1")  # a newer run took the agent before this one's first call
    with pytest.raises(StaleFence):
        run.loop().run(Checkpoint(messages=[{"role": "user", "content": "[[script:carried]] go"}]))
    assert offline.usage_for(run.agent_id)["total_tokens"] == 0  # no call was made
    assert r.zcard(K.reservations) == 0 and run.budget.agent_totals(run.agent_id) == (0, 0)


def test_a_result_given_without_a_run_reports_the_checkpoints_turns_and_usage(valkey: Valkey, sample_repo: Path,
                                                                              tmp_path: Path) -> None:
    """The record's turns and usage are only as fresh as the last heartbeat; the checkpoint has the real ones."""
    from orchestrator import runner
    from orchestrator.fleet import Fleet
    from orchestrator.results import finish_unstarted

    fleet = Fleet.create(Settings(broker_url=valkey.url, workspace_dir=tmp_path / "ws", _env_file=None))
    intake = runner.intake(fleet, {"task_id": "given-up", "repo": str(sample_repo), "prompt": "go"}, None)
    assert isinstance(intake, tuple)
    agent_id = intake[0]
    fleet.lifecycle.save(agent_id, None, {"messages": [], "turns": 7, "usage": {"input_tokens": 90,
                                                                                  "total_tokens": 120}},
                         turns=3, usage={"total_tokens": 40})  # a heartbeat that saw turn 3
    rec = fleet.store.get(agent_id)
    assert rec is not None
    result = finish_unstarted(fleet, rec, State.FAILED, "gave up")
    assert result is not None and result.turns == 7 and result.usage.total_tokens == 120
    fleet.r.close()
