"""Model-traffic benchmarks: what prompt caching saves, and what a fleet-wide pause spares the API in a 429 storm.

* ``caching``: a 30-turn scripted coding run (tests, file views, greps, edits) through ``AgentLoop`` with the
  offline model, once with prompt caching (``cache_control`` breakpoints) and once without: the bill of each, the
  cache's share of the input, and the Valkey commands the rate limiter costs per turn in steady state (the one
  read when a run starts, then nothing).
* ``ratelimit``: 10 agents (``AgentLoop`` threads in this process, one worktree each) while the offline model
  answers every call with 429 and ``retry-after`` for a window (12 s with ``retry-after: 3``; the issue's 30 s
  window with ``retry-after: 5`` has the same shape, only longer). The fleet's policy (``RateLimiter`` on Valkey:
  one pause for all, one probe, pause/resume messages forwarded as the Supervisor does) against the naive policy
  measured the same way: every agent waits out its own ``retry-after`` and tries again (``RateLimiter`` without
  Valkey). The 429s the API sends back, and how soon after the window every agent is working again.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import redis

from benchmarks.bench_foundation import NoopLedger
from benchmarks.harness import Benchmark, CountingRedis, Harness, Row
from orchestrator.agent.loop import AgentLoop, Checkpoint, LoopConfig, StopSignal
from orchestrator.agent.model import ModelClient
from orchestrator.agent.tools import TOOL_DEFINITIONS, Toolbox
from orchestrator.keys import Keys
from orchestrator.ratelimit import Headroom, RateLimiter
from orchestrator.runner import SYSTEM_PROMPT
from orchestrator.settings import DEFAULT_MODEL
from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, edit, text_turn

NAME = "model traffic"
CODING = "bench-coding-30"
STORM = "bench-storm"
MAX_TOKENS = 8192
PROMPT = ("[[script:{script}]] The test suite of this repository fails: `add` in calc.py subtracts. Find the bug, "
          "fix it, keep `mul` as it is, run the tests after every change and make sure nothing else breaks. "
          "Describe what you changed in a short summary at the end.")


def coding_script(turns: int = 30) -> Script:
    """``turns`` turns of a plausible coding session: tests, views, greps, listings, an edit; then a summary."""
    cycle: list[Callable[[int], Turn]] = [
        lambda i: bash(f"python -m pytest -q  # run {i}"),
        lambda i: edit(command="view", path="calc.py"),
        lambda i: bash(f"grep -n 'def ' calc.py test_calc.py  # {i}"),
        lambda i: bash(f"seq 1 {200 + 10 * i}"),
        lambda i: bash(f"git status --short; git log --oneline -3  # {i}"),
        lambda i: edit(command="view", path="test_calc.py"),
    ]
    steps = [cycle[i % len(cycle)](i) for i in range(turns - 2)]
    steps.insert(turns // 2, edit(command="str_replace", path="calc.py", old_str="return a - b",
                                  new_str="return a + b"))
    return Script([*steps, text_turn("Fixed: add() now adds; the tests pass.")])


def _loop(url: str, repo: Path, agent_id: str, script: str, *, caching: bool = True,
          limiter: Callable[[StopSignal], RateLimiter] | None = None, max_turns: int = 100) -> Checkpoint:
    client = anthropic.Anthropic(base_url=url, api_key="offline-model-key", max_retries=0)
    try:
        model = ModelClient(client, DEFAULT_MODEL, SYSTEM_PROMPT.format(path=repo), TOOL_DEFINITIONS,
                            user_id=agent_id, caching=caching)
        stop = StopSignal()
        loop = AgentLoop(model, Toolbox(repo), NoopLedger(), stop,
                         LoopConfig(max_turns=max_turns, max_tokens_per_turn=MAX_TOKENS),
                         on_checkpoint=lambda cp: None, limiter=limiter(stop) if limiter else None)
        cp = loop.run(Checkpoint(messages=[{"role": "user", "content": PROMPT.format(script=script)}]))
    finally:
        client.close()
    if cp.stop_reason != "end_turn":
        raise RuntimeError(f"loop ended with {cp.stop_reason!r}")
    return cp


# ------------------------------------------------------------------------------------------------- caching


def bench_caching(h: Harness) -> list[Row]:
    """Cost of a 30-turn run with prompt caching against the same run without it."""
    repeats = 1 if h.quick else 3
    costs: dict[bool, list[float]] = {True: [], False: []}
    read_share: list[float] = []
    per_turn_commands: list[float] = []
    keys = Keys(f"bench:traffic:{h.run_id}:")
    with h.offline_model({CODING: coding_script(30)}) as model:
        for n in range(repeats):
            for caching in (True, False):  # interleaved
                model.clear_cache()
                counting = CountingRedis(host="127.0.0.1", port=h.valkey.port, decode_responses=True)

                def limiter(stop: StopSignal, client: redis.Redis = counting) -> RateLimiter:
                    return RateLimiter(client, keys, DEFAULT_MODEL, stop, max_wait=900, headroom=Headroom())

                try:
                    cp = _loop(model.url, h.sample_repo(f"caching-{n}-{caching}"), h.unique("caching"), CODING,
                               caching=caching, limiter=limiter)
                finally:
                    counting.close()
                if cp.turns != 30:
                    raise RuntimeError(f"expected 30 turns, got {cp.turns}")
                costs[caching].append(cp.usage.cost_usd)
                if caching:
                    u = cp.usage
                    read_share.append(u.cache_read_input_tokens / (u.input_tokens + u.cache_creation_input_tokens
                                                                   + u.cache_read_input_tokens))
                    per_turn_commands.append((counting.commands - 1) / cp.turns)
    cached, plain = statistics.median(costs[True]), statistics.median(costs[False])
    h.log(f"caching: with {costs[True]}, without {costs[False]}")
    return [
        Row(NAME, "30-turn run: cost with prompt caching", cached, "USD", "the same run without caching", plain,
            f"median of {repeats}; offline model, {DEFAULT_MODEL} prices (write 1.25x, read 0.1x input)"),
        Row(NAME, "  share of input read from the cache", 100 * statistics.median(read_share), "%",
            note="cache_read / (input + cache writes + cache reads)"),
        Row(NAME, "  rate limiter: Valkey commands per turn", max(per_turn_commands), "",
            note="steady state, no pause: only the one read when the run starts (not counted)"),
    ]


# ----------------------------------------------------------------------------------------------- 429 storm


class Pump:
    """Forwards the fleet's pause/resume messages to every limiter, as each run's Supervisor does."""

    def __init__(self, r: redis.Redis, channel: str) -> None:
        self.limiters: list[RateLimiter] = []
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(channel)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            msg = self.pubsub.get_message(timeout=0.1)
            if msg and msg.get("type") == "message":
                body = json.loads(msg["data"])
                for limiter in list(self.limiters):
                    limiter.on_message(body)

    def close(self) -> None:
        self.done.set()
        self.thread.join(2)
        self.pubsub.close()


def _storm(h: Harness, model: OfflineModel, fleet: bool, agents: int, window: float, retry: float) -> dict[str, Any]:
    """Run ``agents`` loops; open the 429 window once all are working; the refusals and recovery times."""
    model.reset()
    model.clear_rate_limits()
    keys = Keys(f"bench:traffic:{h.run_id}:{'fleet' if fleet else 'naive'}:")
    r = redis.Redis(host="127.0.0.1", port=h.valkey.port, decode_responses=True, max_connections=64)
    pump = Pump(r, keys.stop_channel) if fleet else None
    ids = [h.unique("storm") for _ in range(agents)]
    errors: list[BaseException] = []

    def make(stop: StopSignal) -> RateLimiter:
        limiter = RateLimiter(r if fleet else None, keys, DEFAULT_MODEL, stop, max_wait=600, headroom=Headroom())
        if pump is not None:
            pump.limiters.append(limiter)
        return limiter

    def work(i: int) -> None:
        try:
            _loop(model.url, h.sample_repo(f"storm-{'f' if fleet else 'n'}-{i}"), ids[i], STORM, limiter=make)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(agents)]
    quiet = logging.getLogger("orchestrator.ratelimit")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # one warning per refusal: hundreds in the naive run
    try:
        for t in threads:
            t.start()
        h.wait_for(lambda: {c.agent for c in model.calls() if c.status == "completed"} >= set(ids), 60,
                   "every agent working")
        opened = time.time()
        model.rate_limit_window(window, retry_after=retry)
        for t in threads:
            t.join(300)
        if errors:
            raise errors[0]
    finally:
        quiet.setLevel(level)
        if pump is not None:
            pump.close()
        r.close()
    closed = opened + window
    calls = model.calls()
    back = [min(c.started_at for c in calls if c.agent == a and c.status == "completed" and c.started_at >= closed)
            for a in ids]
    return {"refused": model.rejection_counts().get(429, 0), "all_back": max(back) - closed,
            "first_back": min(back) - closed}


def bench_ratelimit(h: Harness) -> list[Row]:
    """429s the fleet collects in a rate-limit window: one fleet-wide pause against per-agent retries."""
    agents = 10
    window, retry = (6.0, 2.0) if h.quick else (12.0, 3.0)
    turns = 40 if h.quick else 70
    with h.offline_model({STORM: Script([bash(f"sleep 0.2; echo {i}") for i in range(turns)]
                                        + [text_turn("done")])}) as model:
        ours = _storm(h, model, True, agents, window, retry)
        naive = _storm(h, model, False, agents, window, retry)
        model.clear_rate_limits()
    h.log(f"storm: fleet {ours}, naive {naive}")
    load = f"{agents} agents, a {window:g} s window of 429 with retry-after {retry:g} s"
    return [
        Row(NAME, "429 storm: refusals, fleet-wide pause + one probe", ours["refused"], "",
            "each agent retrying on its own retry-after", naive["refused"], load),
        Row(NAME, "  every agent calling again, after the window", ours["all_back"], "s",
            "each agent retrying on its own", naive["all_back"],
            f"first agent back {ours['first_back']:.1f} s (naive {naive['first_back']:.1f} s)"),
    ]


BENCHMARKS = [
    Benchmark("caching", "30-turn run: cost with prompt caching vs without; limiter commands per turn",
              bench_caching),
    Benchmark("ratelimit", "10 agents in a 429 window: fleet-wide pause vs per-agent retries", bench_ratelimit),
]
