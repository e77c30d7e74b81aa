"""Budget benchmarks: the ledger's throughput, its cost per agent turn, and what it guarantees under a race.

Each compares the fleet with a baseline measured in the same run:

* ``budget``, three parts:

  1. ``Budget.reserve`` then ``Budget.settle`` round trips per second against the run's Valkey, from one thread
     and from 4 threads, against plain ``PING`` round trips with the same threads.
  2. ``AgentLoop`` in this process with the real ``AgentLedger`` on Valkey against the same loop with a no-op
     ledger (no checkpoints in either): what the ledger adds to every turn.
  3. A naive check-then-charge ledger (``GET used``; if it fits, make the call, then ``INCRBY used``) side by side
     with ours (``Budget.reserve`` in hard mode, the call, ``Budget.settle``) under the same load: 8 threads, a
     daily limit of 50,000 tokens, calls of 1,000 to 3,000 tokens, each run until it refuses. Ours must end at
     or under the limit (asserted); the naive one overshoots.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from benchmarks.bench_foundation import Books, NoopLedger, loop_run, reps, tool_turns, turns_script
from benchmarks.harness import Benchmark, Harness, Row, median, spread
from orchestrator.budget import AgentLedger, Budget
from orchestrator.models import Usage
from orchestrator.pricing import cost_micro_usd
from orchestrator.settings import DEFAULT_MODEL, Settings

NAME = "budget ledger"
WARM = "bench-budget-warm"

# Part 3: the race.
RACE_THREADS = 8
RACE_DAILY_LIMIT = 50_000
CALL_SECONDS = 0.002  # the simulated model call between the check (or reservation) and the charge
INPUT_RANGE = (500, 1500)  # input tokens of a call (the reservation's input bound is exact here)
OUTPUT_RANGE = (500, 1500)  # output tokens the model would write, capped by the call's max_tokens
MAX_OUTPUT = OUTPUT_RANGE[1]  # max_tokens asked for: a call is 1,000 to 3,000 tokens


def _settings(h: Harness, prefix: str, daily_limit: int = 10**15) -> Settings:
    """Hard-mode settings on the run's Valkey with their own key prefix (no flush needed between parts)."""
    return Settings(broker_url=h.valkey.url, workspace_dir=h.tmp / "budget-ws", _env_file=None,
                    key_prefix=prefix, daily_token_limit=daily_limit, budget_enforcement="hard")


def _client(h: Harness) -> redis.Redis:
    # A pool of up to 32 connections: every thread gets its own connection, as every worker process has.
    return redis.Redis(host="127.0.0.1", port=h.valkey.port, decode_responses=True, max_connections=32)


# ---------------------------------------------------------------------------------- 1. round trips/s


def _rate(threads: int, seconds: float, op: Callable[[int], object]) -> float:
    """Operations per second of ``op(thread_index)`` run back to back by ``threads`` threads for ``seconds``."""
    counts = [0] * threads
    start_line = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(i: int) -> None:
        start_line.wait()
        n = 0
        while not stop.is_set():
            op(i)
            n += 1
        counts[i] = n

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _round_trips(h: Harness) -> list[Row]:
    seconds = 0.5 if h.quick else 1.5
    repeats = 1 if h.quick else 3
    r = _client(h)
    budget = Budget(r, _settings(h, f"bench:budget:{h.run_id}:rt:"))
    usage = Usage(input_tokens=1000, output_tokens=500, total_tokens=1500)
    cost = cost_micro_usd(DEFAULT_MODEL, 1000, 500, 0, 0)

    def pair(i: int) -> None:
        res = budget.reserve(f"rt-agent-{i}", 10**12, 1000, 1000)
        if res is None:
            raise RuntimeError("the throughput ledger refused a call")
        budget.settle(res.id, usage, cost)

    def ping(i: int) -> None:
        r.ping()

    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for threads in (1, 4):  # warm connections and the Lua script cache
            _rate(threads, 0.2, pair)
            _rate(threads, 0.2, ping)
        for _ in range(repeats):
            for threads in (1, 4):  # interleaved, so drift affects both alike
                rates.setdefault(("pair", threads), []).append(_rate(threads, seconds, pair))
                rates.setdefault(("ping", threads), []).append(_rate(threads, seconds, ping))
    finally:
        r.close()
    rows = []
    for threads in (1, 4):
        pairs = rates[("pair", threads)]
        label = "1 thread" if threads == 1 else f"{threads} threads, one client pool"
        rows.append(Row(NAME, f"reserve+settle pairs/s, {label}", median(pairs), "/s",
                        f"PING round trips/s, {label}", median(rates[("ping", threads)]),
                        f"2 EVALSHA per pair; {spread(pairs, '{:.0f}')}"))
    return rows


# ---------------------------------------------------------------------------------- 2. loop overhead


def _loop_overhead(h: Harness) -> list[Row]:
    n = tool_turns(h)
    script = f"bench-budget-turns-{n}"
    prompt = f"[[script:{script}]] Run the commands."
    repo = h.sample_repo("budget-loop")
    r = _client(h)
    settings = _settings(h, f"bench:budget:{h.run_id}:loop:")
    budget = Budget(r, settings)

    def real(agent_id: str) -> Books:
        return Books(AgentLedger(budget, agent_id, settings.agent_token_limit, DEFAULT_MODEL, lambda message: None))

    def noop(agent_id: str) -> Books:
        return Books(NoopLedger())

    variants: dict[str, Callable[[str], Books]] = {"no-op": noop, "ledger": real}
    rates: dict[str, list[float]] = {label: [] for label in variants}
    books_ms: dict[str, list[float]] = {label: [] for label in variants}
    try:
        with h.model_server({script: turns_script(n), WARM: turns_script(3)}) as model:
            for make in variants.values():
                loop_run(model.url, repo, f"[[script:{WARM}]] go", 10, h.unique("warm"), make(h.unique("warm")))
            for _ in range(3 if h.quick else 2 * reps(h)):
                for label, make in variants.items():  # interleaved
                    agent_id = h.unique("budget-loop")
                    run = loop_run(model.url, repo, prompt, n + 10, agent_id, make(agent_id))
                    rates[label].append(run.turns / run.seconds)
                    books_ms[label].append(run.books_seconds * 1000 / run.turns)
    finally:
        r.close()
    noop_rate, ledger_rate = median(rates["no-op"]), median(rates["ledger"])
    return [
        Row(NAME, "AgentLoop turns/s with AgentLedger (Valkey)", ledger_rate, "turns/s",
            "AgentLoop, no-op ledger", noop_rate,
            f"{n + 1} turns/run, no checkpoints; {1000 / ledger_rate - 1000 / noop_rate:+.2f} ms/turn; "
            f"ledger {spread(rates['ledger'])}"),
        Row(NAME, "  time in the ledger per turn", median(books_ms["ledger"]), "ms", "a no-op loop turn",
            1000 / noop_rate, "timed inside reserve/settle (2 round trips: one script each); "
                              "ratio = share of a turn"),
    ]


# ---------------------------------------------------------------------------------------- 3. the race


@dataclass(frozen=True)
class Call:
    """One simulated model call: its input and the output the model would write if max_tokens allows."""

    input_tokens: int
    output_tokens: int


def _calls(seed: int, count: int = 200) -> list[Call]:
    """The calls one thread makes, the same for both ledgers."""
    rng = random.Random(seed)
    return [Call(rng.randint(*INPUT_RANGE), rng.randint(*OUTPUT_RANGE)) for _ in range(count)]


@dataclass
class RaceResult:
    """How one ledger ended a race."""

    used: int
    calls: int
    seconds: float

    @property
    def overshoot(self) -> int:
        """Tokens charged past the limit (0 if none)."""
        return max(0, self.used - RACE_DAILY_LIMIT)


def _race(work: Callable[[int, list[Call]], int], plans: list[list[Call]]) -> tuple[int, float]:
    """Run ``work(thread, calls)`` in RACE_THREADS threads at once; (calls made, seconds)."""
    made = [0] * len(plans)
    errors: list[BaseException] = []
    start_line = threading.Barrier(len(plans) + 1)

    def run(i: int) -> None:
        start_line.wait()
        try:
            made[i] = work(i, plans[i])
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(plans))]
    for t in pool:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return sum(made), time.perf_counter() - start


def _naive_race(r: redis.Redis, key: str, plans: list[list[Call]]) -> RaceResult:
    """Check then charge: ``GET used``; if ``used + input + max_tokens <= limit``: call, then ``INCRBY``."""

    def work(i: int, calls: list[Call]) -> int:
        for made, call in enumerate(calls):
            used = int(r.get(key) or 0)
            if used + call.input_tokens + MAX_OUTPUT > RACE_DAILY_LIMIT:
                return made  # refused: used only grows, so every later check refuses too
            time.sleep(CALL_SECONDS)
            r.incrby(key, call.input_tokens + call.output_tokens)
        raise RuntimeError("the naive ledger never refused: make the plans longer")

    made, seconds = _race(work, plans)
    return RaceResult(int(r.get(key) or 0), made, seconds)


def _our_race(budget: Budget, plans: list[list[Call]]) -> RaceResult:
    """``Budget.reserve`` (hard mode: it may lower max_tokens, or refuse), call, ``Budget.settle``."""

    def work(i: int, calls: list[Call]) -> int:
        for made, call in enumerate(calls):
            res = budget.reserve(f"race-agent-{i}", 10**12, call.input_tokens, MAX_OUTPUT)
            if res is None:
                return made
            time.sleep(CALL_SECONDS)
            output = min(call.output_tokens, res.max_tokens)  # the API never writes past max_tokens
            total = call.input_tokens + output
            budget.settle(res.id, Usage(input_tokens=call.input_tokens, output_tokens=output, total_tokens=total),
                          cost_micro_usd(DEFAULT_MODEL, call.input_tokens, output, 0, 0))
        raise RuntimeError("our ledger never refused: make the plans longer")

    made, seconds = _race(work, plans)
    totals = budget.day_totals()
    if totals["reserved"] != 0:
        raise AssertionError(f"reservations left open after the race: {totals}")
    return RaceResult(totals["used"], made, seconds)


def _races(h: Harness) -> list[Row]:
    rounds = 2 if h.quick else 5
    r = _client(h)
    naive: list[RaceResult] = []
    ours: list[RaceResult] = []
    try:
        for n in range(rounds):
            plans = [_calls(seed=1000 * n + i) for i in range(RACE_THREADS)]
            prefix = f"bench:budget:{h.run_id}:race{n}:"
            ours.append(_our_race(Budget(r, _settings(h, prefix, RACE_DAILY_LIMIT)), plans))
            naive.append(_naive_race(r, f"{prefix}naive:used", plans))
    finally:
        r.close()
    worst = max(x.overshoot for x in ours)
    h.log(f"budget race: ours used {[x.used for x in ours]} (limit {RACE_DAILY_LIMIT}), worst overshoot {worst}; "
          f"naive used {[x.used for x in naive]}")
    if worst != 0:
        raise AssertionError(f"our ledger overshot the daily limit by {worst} tokens: {ours}")

    def pct(tokens: float) -> str:
        return f"{tokens * 100 / RACE_DAILY_LIMIT:.1f}%"

    naive_over = [float(x.overshoot) for x in naive]
    ours_used = [float(x.used) for x in ours]
    naive_used = [float(x.used) for x in naive]
    load = (f"{RACE_THREADS} threads, limit {RACE_DAILY_LIMIT:,}, calls 1,000-3,000 tokens, {CALL_SECONDS * 1000:g} ms "
            f"each, {rounds} races")
    return [
        Row(NAME, "race: ours (reserve/settle), final used", median(ours_used), "tokens",
            "the daily limit", RACE_DAILY_LIMIT,
            f"median; {min(ours_used):,.0f}-{max(ours_used):,.0f}; {load}"),
        Row(NAME, "race: ours, overshoot (asserted 0)", float(worst), "tokens", note="worst of the races: 0.0%"),
        Row(NAME, "race: naive check-then-charge, final used", median(naive_used), "tokens",
            "the daily limit", RACE_DAILY_LIMIT, f"median; {min(naive_used):,.0f}-{max(naive_used):,.0f}"),
        Row(NAME, "race: naive, overshoot", median(naive_over), "tokens", note=(
            f"median {pct(median(naive_over))} of the limit; worst {max(naive_over):,.0f} "
            f"({pct(max(naive_over))}); {median([float(x.calls) for x in naive]):.0f} calls vs "
            f"{median([float(x.calls) for x in ours]):.0f} for ours")),
    ]


def bench_budget(h: Harness) -> list[Row]:
    """Ledger throughput vs PING, its per-turn cost vs a no-op ledger, and a race against a naive ledger."""
    return [*_round_trips(h), *_loop_overhead(h), *_races(h)]


BENCHMARKS = [
    Benchmark("budget", "reserve+settle vs PING; AgentLedger vs no-op per turn; race vs check-then-charge",
              bench_budget),
]
