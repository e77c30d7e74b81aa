"""Foundation benchmarks: dispatch latency, turns per second through the fleet, and the loop's per-turn overhead.

Each compares the fleet with a baseline measured in the same run:

* ``dispatch``: ``send_task`` -> the agent's first model request (as the offline model saw it), against the fleet's
  plain Celery round trip (a spec rejected at validation: ``send_task`` -> ``result.get``).
* ``turns``: turns per second of a long scripted agent run end to end by a real worker, against a bare loop (the
  same SDK, offline model and script; tools run with ``subprocess.run``; no Valkey, budget or checkpoints).
* ``loop``: ``AgentLoop`` in this process with the real ledger and checkpoints on Valkey, against the same loop
  with a no-op ledger and no-op checkpoints.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anthropic

from benchmarks.harness import Benchmark, Harness, ModelServer, Row, median, percentile, spread
from orchestrator.agent.loop import AgentLoop, Checkpoint, LoopConfig, StopSignal
from orchestrator.agent.model import ModelClient
from orchestrator.agent.tools import TOOL_DEFINITIONS, Toolbox
from orchestrator.budget import AgentLedger, Budget, Progress
from orchestrator.keys import Keys
from orchestrator.lifecycle import AdmitParams, Lifecycle
from orchestrator.models import Usage
from orchestrator.runner import SYSTEM_PROMPT
from orchestrator.settings import DEFAULT_MODEL, Settings
from orchestrator.testing.offline_model import OfflineModel, Script, bash, text_turn
from orchestrator.workspace import Workspace

MAX_TOKENS_PER_TURN = 8192  # the fleet's default (Settings.max_tokens_per_turn)
ONE_TURN = "bench-one"  # one text turn: the agent answers and ends
WARM = "bench-warm"  # a few tool turns, to warm pool processes, connections and the repository mirror


def turns_script(tool_turns: int) -> Script:
    """``tool_turns`` turns of ``bash("true N")``, then a text turn that ends the run.

    ``true`` ignores its arguments; the turn number only keeps the calls distinct, so the loop's stuck detection
    (the same call with the same result several times in a row) does not flag the agent.
    """
    return Script([*(bash(f"true {i}") for i in range(1, tool_turns + 1)), text_turn("done")])


def tool_turns(h: Harness) -> int:
    """How many ``bash`` turns the turn-rate benchmarks script."""
    return 20 if h.quick else 60


def reps(h: Harness) -> int:
    """Repetitions of each turn-rate measurement (the median is reported)."""
    return 1 if h.quick else 5


def _timestamp(iso_text: str) -> float:
    return datetime.fromisoformat(iso_text).timestamp()


# ------------------------------------------------------------------------------------------ 1. dispatch


def _round_trip(h: Harness) -> float:
    """The fleet's plain Celery round trip: a spec rejected at validation, send_task -> result.get (seconds)."""
    start = time.perf_counter()
    out = h.submit(None, timeout=30)
    elapsed = time.perf_counter() - start
    if out.get("status") != "rejected":
        raise RuntimeError(f"expected a rejected spec, got {out!r}")
    return elapsed


def _dispatch_once(h: Harness, offline: OfflineModel, repo: Path) -> tuple[float, float]:
    """One one-turn agent: (send_task -> first model request, send_task -> run start) in seconds."""
    spec = {"task_id": h.unique("dispatch"), "prompt": f"[[script:{ONE_TURN}]] Reply ok.", "repo": str(repo)}
    sent = time.time()  # the offline model stamps calls with time.time() too (same host clock)
    out = h.submit(spec, timeout=60)
    if out.get("status") != "completed":
        raise RuntimeError(f"dispatch agent did not complete: {out!r}")
    agent_id = out["agent_id"]
    firsts = [c.started_at for c in offline.calls() if c.agent == agent_id]
    if not firsts:
        raise RuntimeError(f"the offline model saw no request from agent {agent_id}")
    return min(firsts) - sent, _timestamp(out["started_at"]) - sent


def bench_dispatch(h: Harness) -> list[Row]:
    """Dispatch latency on an idle fleet (one prefork worker, concurrency 2) vs the plain Celery round trip."""
    agents = 6 if h.quick else 20
    warmup = 2 if h.quick else 4
    h.fresh_state()
    repo = h.sample_repo("dispatch")
    latencies: list[float] = []
    to_start: list[float] = []
    trips: list[float] = []
    with h.offline_model({ONE_TURN: Script([text_turn("ok")])}) as offline, \
            h.worker(offline.url, name="dispatch", concurrency=2, heartbeat_interval_seconds=1):
        for _ in range(warmup):  # both pool processes: imports, connections, the repository mirror
            _dispatch_once(h, offline, repo)
            _round_trip(h)
        for _ in range(agents):  # interleaved, so drift affects both series alike
            time.sleep(0.1)  # let the worker go idle (ack, heartbeat threads) before the next send
            trips.append(_round_trip(h))
            time.sleep(0.1)
            latency, started = _dispatch_once(h, offline, repo)
            latencies.append(latency)
            to_start.append(started)
    prepare_ms, client_ms = _run_start_parts(h, repo, 5 if h.quick else 10)
    ms = [x * 1000 for x in latencies]
    trip_ms = [x * 1000 for x in trips]
    start_ms = [x * 1000 for x in to_start]
    rest_ms = [a - b for a, b in zip(ms, start_ms, strict=True)]
    name = "dispatch latency"
    baseline = "Celery round trip (rejected spec)"
    n = f"{agents} agents, sequential"
    return [
        Row(name, "median: send_task -> first model request", median(ms), "ms", f"{baseline}, median",
            median(trip_ms), n),
        Row(name, "p99: send_task -> first model request", percentile(ms, 99), "ms", f"{baseline}, p99",
            percentile(trip_ms, 99), "nearest rank (the max below 100 samples)"),
        Row(name, "  of which send_task -> run start", median(start_ms), "ms", note="median; intake + re-enqueue"),
        Row(name, "  of which run start -> first request", median(rest_ms), "ms",
            note="median; lease, slot, worktree, count_tokens, reserve"),
        Row(name, "    part: Workspace.prepare (warm mirror)", median(prepare_ms), "ms",
            note="median, measured alone in this process: fetch + git worktree add"),
        Row(name, "    part: anthropic.Anthropic() construction", median(client_ms), "ms",
            note="median, measured alone: paid once per worker process (the client is cached)"),
    ]


def _run_start_parts(h: Harness, repo: Path, samples: int) -> tuple[list[float], list[float]]:
    """Milliseconds of two steps between run start and the first model request, each measured on its own."""
    workspace = Workspace(h.tmp / "probe-workspace")
    workspace.prepare("probe-warm", str(repo), "main", "agent/probe-warm")  # the mirror exists, as in the fleet
    prepare_ms: list[float] = []
    client_ms: list[float] = []
    for i in range(samples):
        start = time.perf_counter()
        workspace.prepare(f"probe-{i}", str(repo), "main", f"agent/probe-{i}")
        prepare_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        anthropic.Anthropic(base_url="http://127.0.0.1:9", api_key="offline-model-key", max_retries=0).close()
        client_ms.append((time.perf_counter() - start) * 1000)
    return prepare_ms, client_ms


# ----------------------------------------------------------------------------------- 2. turns per second


def _blocks(content: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for block in content:
        if block.type == "text":
            out.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            out.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
    return out


def bare_loop(url: str, repo: Path, prompt: str, max_turns: int) -> tuple[int, float]:
    """The loop without the fleet: SDK stream, then each ``bash`` tool via ``subprocess.run``; (turns, seconds)."""
    client = anthropic.Anthropic(base_url=url, api_key="offline-model-key", max_retries=0)
    system = SYSTEM_PROMPT.format(path=repo)
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    turns = 0
    try:
        start = time.perf_counter()
        while turns < max_turns:
            with client.messages.stream(
                model=DEFAULT_MODEL, max_tokens=MAX_TOKENS_PER_TURN, system=system,
                messages=messages, tools=TOOL_DEFINITIONS,  # type: ignore[arg-type]
                metadata={"user_id": "bare-loop"},
            ) as stream:
                for _event in stream:
                    pass
                final = stream.get_final_message()
            turns += 1
            content = _blocks(list(final.content))
            messages.append({"role": "assistant", "content": content})
            uses = [b for b in content if b["type"] == "tool_use"]
            if final.stop_reason != "tool_use" or not uses:
                break
            results = []
            for use in uses:
                proc = subprocess.run(["bash", "-c", str(use["input"].get("command", ""))], cwd=repo,
                                      capture_output=True, text=True, timeout=60, check=False)
                results.append({"type": "tool_result", "tool_use_id": use["id"],
                                "content": (proc.stdout + proc.stderr) or "(no output)"})
            messages.append({"role": "user", "content": results})
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    return turns, elapsed


@dataclass
class FleetRun:
    """One agent run through a worker."""

    turns: int
    seconds: float  # finished_at - started_at of its result: worktree setup and commit included
    span: float  # first model request start -> last model request end, as the model server saw them
    commands: int  # Valkey commands processed meanwhile, by every client (server-side count)


def _commands_processed(h: Harness) -> int:
    with h.valkey.client() as c:
        return int(c.info("stats")["total_commands_processed"])


def _fleet_run(h: Harness, model: ModelServer, repo: Path, script: str, max_turns: int) -> FleetRun:
    """One agent through the worker, from ``send_task`` to its result."""
    spec = {"task_id": h.unique("turns"), "prompt": f"[[script:{script}]] Run the commands.", "repo": str(repo),
            "max_turns": max_turns}
    commands = _commands_processed(h)
    out = h.submit(spec, timeout=120)
    commands = _commands_processed(h) - commands - 1  # not the INFO itself
    if out.get("status") != "completed":
        raise RuntimeError(f"turns agent did not complete: {out!r}")
    calls = model.calls(out["agent_id"])
    span = max(float(c["finished_at"]) for c in calls) - min(float(c["started_at"]) for c in calls)
    return FleetRun(int(out["turns"]), _timestamp(out["finished_at"]) - _timestamp(out["started_at"]), span, commands)


def bench_turns(h: Harness) -> list[Row]:
    """Turns per second of a long agent through a real worker vs the bare loop (same SDK, model, script)."""
    n = tool_turns(h)
    script = f"bench-turns-{n}"
    prompt = f"[[script:{script}]] Run the commands."
    h.fresh_state()
    repo = h.sample_repo("turns")
    bare_repo = h.sample_repo("turns-bare")
    run_rates: list[float] = []
    span_rates: list[float] = []
    commands: list[float] = []
    bare_rates: list[float] = []
    # Unconfined, like the bare loop it is compared with: the sandbox's own cost is benchmark "sandbox".
    with h.model_server({script: turns_script(n), WARM: turns_script(3)}) as model, \
            h.worker(model.url, name="turns", concurrency=2, heartbeat_interval_seconds=1, sandbox="off"):
        for _ in range(2):  # both pool processes
            _fleet_run(h, model, repo, WARM, 10)
        bare_loop(model.url, bare_repo, f"[[script:{WARM}]] go", 10)
        for _ in range(reps(h)):  # interleaved, so drift affects both alike
            time.sleep(0.1)
            run = _fleet_run(h, model, repo, script, n + 10)
            run_rates.append(run.turns / run.seconds)
            span_rates.append(run.turns / run.span)
            commands.append(run.commands / run.turns)
            turns, seconds = bare_loop(model.url, bare_repo, prompt, n + 10)
            bare_rates.append(turns / seconds)
    bare = median(bare_rates)

    def per_turn(rate: float) -> str:
        return f"{1000 / rate - 1000 / bare:+.1f} ms/turn"

    baseline = "bare loop: SDK + subprocess.run"
    return [
        Row("turns/s, whole loop", "agent via worker: started -> finished", median(run_rates), "turns/s", baseline,
            bare, f"{n + 1} turns/run, worktree + commit incl., sandbox off; {per_turn(median(run_rates))}"),
        Row("turns/s, whole loop", "agent via worker: model-call span", median(span_rates), "turns/s", baseline,
            bare, f"first request -> last reply; {per_turn(median(span_rates))}; {spread(span_rates)}"),
        Row("turns/s, whole loop", "  Valkey commands per turn, whole fleet", median(commands), "",
            note="server-side count (commands inside Lua scripts included), send_task -> result"),
    ]


def _tool_calls_ms(repo: Path, calls: int) -> tuple[list[float], list[float]]:
    """Milliseconds of ``bash true`` calls: through ``Toolbox.run`` and through plain ``subprocess.run``."""
    toolbox = Toolbox(repo)
    timings: dict[str, list[float]] = {"toolbox": [], "subprocess": []}
    runners: dict[str, Callable[[], object]] = {
        "toolbox": lambda: toolbox.run("bash", {"command": "true"}),
        "subprocess": lambda: subprocess.run(["bash", "-c", "true"], cwd=repo, capture_output=True, text=True,
                                             check=False),
    }
    for call in runners.values():
        call()  # warm
    for _ in range(calls):
        for name, call in runners.items():  # interleaved
            start = time.perf_counter()
            call()
            timings[name].append((time.perf_counter() - start) * 1000)
    return timings["toolbox"], timings["subprocess"]


# --------------------------------------------------------------------------------- 3. loop overhead


@dataclass(frozen=True)
class _NoReservation:
    max_tokens: int


class NoopLedger:
    """A ledger that reserves and settles nothing (``orchestrator.agent.loop.Ledger``)."""

    carries_checkpoints = False

    def reserve(self, input_bound: int, max_output: int, checkpoint: Checkpoint | None = None) -> _NoReservation:
        """Grant the whole output limit."""
        return _NoReservation(max_output)

    def settle(self, reservation: Any, usage: Usage, checkpoint: Checkpoint | None = None) -> None:
        """Nothing to settle."""


Hook = Callable[[Checkpoint], None]


class Books:
    """A loop's bookkeeping (ledger, checkpoint and progress hooks), timing every call into it.

    ``seconds`` is the time spent inside the ledger and the hooks: the bookkeeping cost measured directly,
    free of the noise of the model call and the shell command around it.
    """

    def __init__(self, ledger: Any, checkpoint: Hook | None = None, progress: Hook | None = None) -> None:
        self._ledger = ledger
        self._checkpoint = checkpoint
        self._progress = progress
        self.seconds = 0.0

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - start

    @property
    def carries_checkpoints(self) -> bool:
        """Whether the wrapped ledger writes checkpoints with its reservations and settlements."""
        return bool(self._ledger.carries_checkpoints)

    def reserve(self, input_bound: int, max_output: int, checkpoint: Checkpoint | None = None) -> Any:
        """The wrapped ledger's reserve."""
        return self._timed(self._ledger.reserve, input_bound, max_output, checkpoint)

    def settle(self, reservation: Any, usage: Usage, checkpoint: Checkpoint | None = None) -> None:
        """The wrapped ledger's settle."""
        self._timed(self._ledger.settle, reservation, usage, checkpoint)

    def on_checkpoint(self, cp: Checkpoint) -> None:
        """The checkpoint hook."""
        if self._checkpoint is not None:
            self._timed(self._checkpoint, cp)

    def on_progress(self, cp: Checkpoint) -> None:
        """The progress hook."""
        if self._progress is not None:
            self._timed(self._progress, cp)


@dataclass
class LoopRun:
    """One in-process loop run."""

    turns: int
    seconds: float
    books_seconds: float


def loop_run(url: str, repo: Path, prompt: str, max_turns: int, agent_id: str, books: Books) -> LoopRun:
    """``AgentLoop`` with the real ModelClient and Toolbox and the given bookkeeping."""
    client = anthropic.Anthropic(base_url=url, api_key="offline-model-key", max_retries=0)
    try:
        model = ModelClient(client, DEFAULT_MODEL, SYSTEM_PROMPT.format(path=repo), TOOL_DEFINITIONS, user_id=agent_id)
        loop = AgentLoop(model, Toolbox(repo), books, StopSignal(),
                         LoopConfig(max_turns=max_turns, max_tokens_per_turn=MAX_TOKENS_PER_TURN),
                         on_checkpoint=books.on_checkpoint, on_progress=books.on_progress)
        start = time.perf_counter()
        cp = loop.run(Checkpoint(messages=[{"role": "user", "content": prompt}]))
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    if cp.stop_reason != "end_turn":
        raise RuntimeError(f"loop ended with {cp.stop_reason!r}")
    return LoopRun(cp.turns, elapsed, books.seconds)


def bench_loop(h: Harness) -> list[Row]:
    """``AgentLoop`` in-process: the real ledger and Valkey checkpoints vs no-op ones (same model, tools, script)."""
    n = tool_turns(h)
    script = f"bench-turns-{n}"
    h.fresh_state()
    repo = h.sample_repo("loop")
    settings = Settings(broker_url=h.valkey.url, workspace_dir=h.tmp / "loop-ws", _env_file=None)
    r = h.counting_client()
    keys = Keys(settings.key_prefix)
    budget = Budget(r, settings)
    life = Lifecycle(r, keys, AdmitParams(lease_seconds=60, slot_lease_seconds=600, slot_limit=10**6, hard=True,
                                          max_recoveries=3))

    def running(agent_id: str) -> str:
        """A running agent as the runner has it after admission: its fencing token."""
        life.create({"task_id": agent_id, "state": "queued", "spec": {}, "recoveries": 0}, agent_id)
        adm = life.admit(agent_id, "bench", "bench", priority=5, duration_seconds=3600)
        return adm.fence

    def noop(agent_id: str) -> Books:
        return Books(NoopLedger())

    def separate_writes(agent_id: str) -> Books:
        """The first generation's way: each reservation, settlement and checkpoint a script of its own, and every
        checkpoint also writing the record's progress fields."""
        fence = running(agent_id)  # the runner holds a lease; its checkpoint writes are fenced
        ledger = AgentLedger(budget, agent_id, settings.agent_token_limit, DEFAULT_MODEL, lambda message: None)

        def checkpoint(cp: Checkpoint) -> None:
            life.save(agent_id, fence, cp.to_json(), turns=cp.turns, usage=cp.usage.model_dump(),
                      last_tool=cp.last_tool)

        return Books(ledger, checkpoint)

    def as_runner(agent_id: str) -> Books:
        """AgentRun's way: the ledger carries the checkpoints (one script per reservation + checkpoint after tools,
        one per settlement + checkpoint after the reply)."""
        fence = running(agent_id)

        def carry(cp: Checkpoint | None) -> Progress:  # AgentRun._progress_to_carry, without a worktree snapshot
            return Progress(keys.fence(agent_id), fence, keys.checkpoint(agent_id), cp.dumps() if cp else "",
                            keys.snapshot(agent_id))

        ledger = AgentLedger(budget, agent_id, settings.agent_token_limit, DEFAULT_MODEL, lambda message: None,
                             persist=carry)

        def checkpoint(cp: Checkpoint) -> None:  # AgentRun._save_checkpoint, for the saves nothing carries
            life.save(agent_id, fence, cp.to_json(), turns=cp.turns, usage=cp.usage.model_dump(),
                      last_tool=cp.last_tool)

        return Books(ledger, checkpoint)

    variants: dict[str, Callable[[str], Books]] = {
        "no-op": noop, "separate writes": separate_writes, "as runner": as_runner}
    runs: dict[str, list[LoopRun]] = {label: [] for label in variants}
    trips: dict[str, list[tuple[int, float]]] = {label: [] for label in variants}  # per run: (commands, seconds)
    prompt = f"[[script:{script}]] Run the commands."
    try:
        with h.model_server({script: turns_script(n), WARM: turns_script(3)}) as model:
            for make in variants.values():  # warm connections, Lua script caches, imports
                loop_run(model.url, repo, f"[[script:{WARM}]] go", 10, h.unique("warm"), make(h.unique("warm")))
            for _ in range(reps(h)):
                for label, make in variants.items():  # interleaved, so drift affects every variant alike
                    agent_id = h.unique("loop")
                    books = make(agent_id)
                    commands, seconds = r.commands, r.seconds
                    runs[label].append(loop_run(model.url, repo, prompt, n + 10, agent_id, books))
                    trips[label].append((r.commands - commands, r.seconds - seconds))
        start = time.perf_counter()
        for _ in range(200):
            r.get("bench:idle")
        idle_us = (time.perf_counter() - start) / 200 * 1e6
    finally:
        r.close()
    toolbox_ms, subprocess_ms = _tool_calls_ms(repo, 20 if h.quick else 50)
    slow = sum(1 for x in toolbox_ms if x > 2 * median(subprocess_ms)) / len(toolbox_ms)

    def rate(label: str) -> float:
        return median([x.turns / x.seconds for x in runs[label]])

    def books_ms(label: str) -> float:
        return median([x.books_seconds * 1000 / x.turns for x in runs[label]])

    def per_turn_trips(label: str) -> float:
        return median([c / run.turns for (c, _), run in zip(trips[label], runs[label], strict=True)])

    def trip_us(label: str) -> float:
        return median([sec / c * 1e6 for c, sec in trips[label] if c])

    name = "loop overhead, in-process"
    baseline = "AgentLoop, no-op ledger + checkpoint"
    noop_rates = [x.turns / x.seconds for x in runs["no-op"]]
    turn_ms = 1000 / rate("no-op")
    return [
        Row(name, "AgentLedger carrying checkpoints, as AgentRun", rate("as runner"), "turns/s", baseline,
            rate("no-op"), f"{n + 1} turns/run; no-op {spread(noop_rates)}"),
        Row(name, "  separate ledger + checkpoint scripts (before)", rate("separate writes"), "turns/s", baseline,
            rate("no-op")),
        Row(name, "  time in ledger + checkpoints, per turn", books_ms("as runner"), "ms",
            "a no-op loop turn", turn_ms, "timed inside the calls; ratio = share of a turn"),
        Row(name, "  the same, separate scripts (before)", books_ms("separate writes"), "ms", "a no-op loop turn",
            turn_ms, "timed inside the calls; ratio = share of a turn"),
        Row(name, "  Valkey round trip inside the loop", trip_us("as runner"), "us",
            "the same GET in a tight loop", idle_us,
            f"{per_turn_trips('as runner'):.1f} round trips/turn "
            f"({per_turn_trips('separate writes'):.1f} with separate scripts)"),
        Row(name, "bash tool call: Toolbox.run('true')", median(toolbox_ms), "ms",
            "subprocess.run(['bash','-c','true'])", median(subprocess_ms),
            f"median of {len(toolbox_ms)}; {slow:.0%} of Toolbox calls took over 2x the baseline"),
    ]


BENCHMARKS = [
    Benchmark("dispatch", "send_task -> first model request vs a plain Celery round trip", bench_dispatch),
    Benchmark("turns", "turns/s of an agent through a worker vs a bare SDK loop", bench_turns),
    Benchmark("loop", "AgentLoop with ledger + checkpoints on Valkey vs no-op ones", bench_loop),
]
