"""The rate limiter on a real valkey-server: fleet pauses, one prober, headroom, max wait, spend limits, stops."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import anthropic
import httpx2
import pytest
import redis

from orchestrator.agent.loop import StopSignal
from orchestrator.errors import StopRun
from orchestrator.keys import Keys
from orchestrator.ratelimit import Headroom, RateLimiter, classify, retry_after
from orchestrator.states import State
from orchestrator.testing.cluster import Valkey

MODEL = "claude-sonnet-5-5"
KEYS = Keys()
REQUEST = httpx2.Request("POST", "https://api.anthropic.com/v1/messages")


def api_error(status: int, kind: str, retry: float | None = None, code: str | None = None,
              cls: type[anthropic.APIStatusError] | None = None) -> anthropic.APIStatusError:
    """An error as the SDK raises it for a response of ``status`` with an error body of ``kind``."""
    error: dict[str, Any] = {"type": kind, "message": f"{kind} (test)"}
    if code:
        error["details"] = {"error_code": code}
    headers = {"retry-after": str(retry)} if retry is not None else {}
    response = httpx2.Response(status, headers=headers, request=REQUEST)
    classes = {429: anthropic.RateLimitError, 529: anthropic.OverloadedError, 400: anthropic.BadRequestError}
    return (cls or classes.get(status, anthropic.InternalServerError))(
        f"Error code: {status}", response=response, body={"type": "error", "error": error})


class Counting(redis.Redis):
    """Counts the commands it sends (EVALSHA of a script counts one)."""

    commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest.fixture
def r(valkey: Valkey) -> Iterator[Counting]:
    client = Counting(host="127.0.0.1", port=valkey.port, db=2, decode_responses=True)
    yield client
    client.close()


class Fleet:
    """Limiters of several agents on one Valkey, with a listener handing pause messages to each (the Supervisor's
    job in a run)."""

    def __init__(self, r: redis.Redis, **options: Any) -> None:
        self.r = r
        self.options = options
        self.limiters: list[RateLimiter] = []
        self.messages: list[dict[str, Any]] = []
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(KEYS.stop_channel)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def agent(self, **options: Any) -> RateLimiter:
        limiter = RateLimiter(self.r, KEYS, MODEL, StopSignal(), headroom=Headroom(),
                              **{"max_wait": 60.0, **self.options, **options})
        self.limiters.append(limiter)
        return limiter

    def _listen(self) -> None:
        while not self.done.is_set():
            msg = self.pubsub.get_message(timeout=0.05)
            if msg and msg["type"] == "message":
                body = json.loads(msg["data"])
                self.messages.append(body)
                for limiter in list(self.limiters):
                    limiter.on_message(body)

    def close(self) -> None:
        self.done.set()
        self.thread.join(2)
        self.pubsub.close()


@pytest.fixture
def fleet(r: Counting) -> Iterator[Fleet]:
    f = Fleet(r, probe_poll=5.0)
    yield f
    f.close()


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            out["error"] = exc
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- classification ----------------------------------------------------------------------------------------------
def test_classify_errors() -> None:
    assert classify(api_error(429, "rate_limit_error", 2)).scope == "fleet"  # type: ignore[union-attr]
    assert classify(api_error(529, "overloaded_error")).scope == "fleet"  # type: ignore[union-attr]
    for status in (500, 503):
        refusal = classify(api_error(status, "api_error"))
        assert refusal is not None and refusal.scope == "agent" and refusal.status == status
    assert classify(anthropic.APIConnectionError(request=REQUEST)).scope == "agent"  # type: ignore[union-attr]
    assert classify(httpx2.RemoteProtocolError("peer closed")).scope == "agent"  # type: ignore[union-attr]
    assert classify(api_error(400, "invalid_request_error")) is None
    assert classify(ValueError("bug")) is None
    # A spend limit never clears by waiting: by the SDK's class, and by error code on a plain 429.
    spend = api_error(429, "rate_limit_error", 5, "enforced_spend_limit_reached",
                      cls=anthropic.EnforcedSpendLimitReachedError)
    assert classify(spend).scope == "fatal"  # type: ignore[union-attr]
    assert classify(api_error(429, "rate_limit_error", 5, "contract_spend_limit_reached")).scope == "fatal"  # type: ignore[union-attr]
    # A mid-stream error event comes with the stream's 200: its type decides.
    assert classify(api_error(200, "overloaded_error", cls=anthropic.APIStatusError)).status == 529  # type: ignore[union-attr]


def test_retry_after_forms() -> None:
    assert retry_after({"retry-after": "7"}) == 7.0
    assert retry_after({"retry-after": "1.5"}) == 1.5
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = time.time()
    assert 9 <= retry_after({"retry-after": formatdate(now + 10, usegmt=True)}, now) <= 11  # type: ignore[operator]
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


# -- fleet pause and probe -----------------------------------------------------------------------------------------
def test_429_pauses_every_agent_and_exactly_one_probes(fleet: Fleet, r: Counting) -> None:
    first, others = fleet.agent(), [fleet.agent() for _ in range(3)]
    for limiter in others:
        limiter.wait_if_paused()  # each run reads the fleet's state once when it starts: no pause yet
    started = time.time()
    t, _ = in_thread(lambda: first.on_failure(api_error(429, "rate_limit_error", 0.6)))
    wait_for(lambda: fleet.messages)
    until = float(r.hget(KEYS.rate_limit(MODEL), "until") or 0)
    assert fleet.messages[0] == {"pause": MODEL, "until": pytest.approx(until), "status": 429}
    assert 0.6 <= until - started <= 0.6 + 0.07 + 0.1  # retry-after plus at most 10% jitter
    waiters = [in_thread(limiter.wait_if_paused) for limiter in others]
    t.join(5)
    time.sleep(0.3)  # the pause is over: one agent probes, the others wait for its outcome
    probers = [lim for lim in [first, *others] if lim.probing]
    assert len(probers) == 1
    assert r.get(KEYS.rate_limit_probe(MODEL)) is not None
    waiting = [w for w in waiters if w[0].is_alive()]
    assert len(waiting) == (3 if probers[0] is first else 2)
    resumed_at = time.monotonic()
    probers[0].on_response({})  # the probe got through
    for thread, result in waiters:
        thread.join(3)
        assert not thread.is_alive() and "error" not in result
    assert max(w[1]["at"] for w in waiters) - resumed_at < 0.5  # woken by the resume message, not a poll (5 s)
    assert {"resume": MODEL} in fleet.messages
    assert r.hget(KEYS.rate_limit(MODEL), "until") is None and r.get(KEYS.rate_limit_probe(MODEL)) is None
    assert sum(lim.probes for lim in [first, *others]) == 1


def test_a_refused_probe_extends_the_pause(fleet: Fleet, r: Counting) -> None:
    a, b = fleet.agent(), fleet.agent()
    b.wait_if_paused()
    a.on_failure(api_error(429, "rate_limit_error", 0.3))
    a.wait_if_paused()
    assert a.probing  # a's own wait ended first
    tb, out_b = in_thread(b.wait_if_paused)  # b waits for a's probe
    time.sleep(0.1)
    first_until = float(r.hget(KEYS.rate_limit(MODEL), "until") or 0)
    ta, out_a = in_thread(lambda: a.on_failure(api_error(429, "rate_limit_error", 0.5)))  # the probe is refused
    wait_for(lambda: float(r.hget(KEYS.rate_limit(MODEL), "until") or 0) > first_until + 0.3)
    time.sleep(0.3)
    assert not a.probing and not b.probing and r.get(KEYS.rate_limit_probe(MODEL)) is None  # nobody probes early
    wait_for(lambda: a.probing or b.probing)
    time.sleep(0.3)
    assert [lim.probing for lim in (a, b)].count(True) == 1  # after the longer pause, again exactly one probe
    prober = a if a.probing else b
    prober.on_response({})
    for t, out in ((ta, out_a), (tb, out_b)):
        t.join(3)
        assert not t.is_alive() and "error" not in out
    assert sum(lim.probes for lim in (a, b)) == 2


def test_a_dead_probers_claim_expires_and_another_agent_probes(r: Counting) -> None:
    fleet = Fleet(r, probe_poll=0.1, probe_ttl=0.5)
    try:
        a, b = fleet.agent(), fleet.agent()
        b.wait_if_paused()
        a.on_failure(api_error(429, "rate_limit_error", 0.2))
        a.wait_if_paused()
        assert a.probing  # ... and a dies here: no response, no failure
        started = time.monotonic()
        b.wait_if_paused()
        assert b.probing and 0.3 <= time.monotonic() - started <= 2.0
    finally:
        fleet.close()


def test_a_run_that_starts_during_a_pause_reads_it_once(fleet: Fleet, r: Counting) -> None:
    a = fleet.agent()
    ta, out_a = in_thread(lambda: a.on_failure(api_error(429, "rate_limit_error", 0.5)))
    wait_for(lambda: r.exists(KEYS.rate_limit(MODEL)))
    late = fleet.agent()
    before = r.commands
    started = time.monotonic()
    tl, out_l = in_thread(late.wait_if_paused)
    wait_for(lambda: a.probing or late.probing)
    assert time.monotonic() - started >= 0.3  # it waited for the pause it read
    (a if a.probing else late).on_response({})
    for t, out in ((ta, out_a), (tl, out_l)):
        t.join(3)
        assert not t.is_alive() and "error" not in out
    # late: HGETALL, a claim (won or lost), and if it probed, the resume; a's claim attempt is one more.
    assert r.commands - before <= 4


def test_5xx_and_connection_errors_pause_only_this_agent(fleet: Fleet, r: Counting) -> None:
    a, b = fleet.agent(), fleet.agent()
    seen: list[dict[str, Any] | None] = []
    a.on_wait = seen.append
    started = time.monotonic()
    assert a.on_failure(api_error(503, "api_error", 0.3))
    assert a.on_failure(anthropic.APIConnectionError(request=REQUEST))  # second refusal in a row: about 2 s
    assert 1.8 <= time.monotonic() - started <= 3.5
    assert not fleet.messages and r.exists(KEYS.rate_limit(MODEL)) == 0
    assert seen[0] is not None and seen[0]["reason"] == "server error" and seen[0]["status"] == 503
    assert any(s is not None and s["reason"] == "connection error" for s in seen)
    started = time.monotonic()
    b.before_call(1000, 1000)
    assert time.monotonic() - started < 0.1


# -- limits of waiting -------------------------------------------------------------------------------------------
def test_max_wait_fails_the_run_and_says_so(fleet: Fleet) -> None:
    a = fleet.agent(max_wait=1.0)
    started = time.monotonic()
    with pytest.raises(StopRun) as stop:
        a.on_failure(api_error(429, "rate_limit_error", 30))
    assert time.monotonic() - started < 0.5  # a wait known to be too long fails at once
    assert stop.value.status == State.FAILED and "ORCHESTRATOR_RATE_LIMIT_MAX_WAIT_SECONDS" in stop.value.reason
    b = fleet.agent(max_wait=1.0)
    b.on_failure(api_error(503, "api_error", 0.6))
    with pytest.raises(StopRun, match="in total"):  # the waits of one run add up
        b.on_failure(api_error(503, "api_error", 0.6))


def test_spend_limit_fails_at_once_and_pauses_nobody(fleet: Fleet, r: Counting) -> None:
    a = fleet.agent()
    spend = api_error(429, "rate_limit_error", 5, "enforced_spend_limit_reached",
                      cls=anthropic.EnforcedSpendLimitReachedError)
    started = time.monotonic()
    with pytest.raises(StopRun) as stop:
        a.on_failure(spend)
    assert time.monotonic() - started < 0.2
    assert stop.value.status == State.FAILED and "spend limit" in stop.value.reason
    assert r.exists(KEYS.rate_limit(MODEL)) == 0 and not fleet.messages


def test_a_stop_cuts_a_wait_at_once(fleet: Fleet) -> None:
    a = fleet.agent()
    stop = a.stop
    assert isinstance(stop, StopSignal)
    threading.Timer(0.3, lambda: stop.request(State.KILLED, "kill")).start()
    started = time.monotonic()
    with pytest.raises(StopRun) as raised:
        a.on_failure(api_error(429, "rate_limit_error", 30))
    assert raised.value.status == State.KILLED and time.monotonic() - started < 0.8


def test_waiting_field_is_set_then_cleared(fleet: Fleet) -> None:
    a = fleet.agent()
    seen: list[dict[str, Any] | None] = []
    a.on_wait = seen.append
    a.before_call(10, 10)
    assert seen == []  # nothing to say in steady state
    before = time.time()
    a.on_failure(api_error(429, "rate_limit_error", 0.3))
    a.before_call(10, 10)
    assert seen[0] == {"reason": "rate limited", "until": pytest.approx(before + 0.3, abs=0.2), "status": 429}
    assert seen[-1] is None


# -- headers -----------------------------------------------------------------------------------------------------
def headers(kind: str, limit: int, remaining: int, reset_in: float) -> dict[str, str]:
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + reset_in))
    return {f"anthropic-ratelimit-{kind}-limit": str(limit), f"anthropic-ratelimit-{kind}-remaining": str(remaining),
            f"anthropic-ratelimit-{kind}-reset": reset}


def test_a_call_the_headers_say_cannot_fit_waits_for_the_refill(fleet: Fleet, r: Counting) -> None:
    a = fleet.agent()
    seen: list[dict[str, Any] | None] = []
    a.on_wait = seen.append
    a.wait_if_paused()
    a.on_response(headers("input-tokens", 10_000, 9_000, 60))
    started = time.monotonic()
    a.before_call(5_000, 100)  # fits: goes at once, and counts against what remains
    assert time.monotonic() - started < 0.05
    a.on_response(headers("requests", 50, 0, 1.5))  # no request left until the reset (whole seconds)
    a.before_call(100, 100)
    assert 0.4 <= time.monotonic() - started <= 2.6
    assert seen[0] is not None and seen[0]["reason"] == "rate limited" and seen[-1] is None
    assert r.hget(KEYS.rate_limit(MODEL), "hdr:requests:remaining") == "0"  # low headroom is shared


def test_steady_state_costs_no_valkey_command(fleet: Fleet, r: Counting) -> None:
    a = fleet.agent()
    a.wait_if_paused()  # the one read when a run starts
    before = r.commands
    for _ in range(50):
        a.wait_if_paused()
        a.before_call(20_000, 8_192)
        a.on_response(headers("input-tokens", 2_000_000, 1_900_000, 60))
    a.close()
    assert r.commands == before
