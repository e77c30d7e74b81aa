"""Rate limits and overload as a fleet concern: pauses shared through Valkey, one prober, header headroom.

* A 429 (rate limit) or 529 (overload) pauses every agent of the fleet calling that model until its ``retry-after``
  (else exponential backoff), plus jitter: ``until`` goes to the ``Keys.rate_limit(model)`` hash and a
  ``{"pause": model, "until": ts}`` message on the fleet's stop channel tells running agents at once (their
  Supervisor hands it to ``RateLimiter.on_message``); a run that starts reads the hash once. When the pause ends,
  exactly one agent probes (``SET NX PX`` on ``Keys.rate_limit_probe(model)``); the others wait for its outcome: a
  ``{"resume": model}`` message, or a longer pause. A prober that dies leaves a claim that expires; another probes.
* A 5xx or a connection error pauses only the agent that saw it.
* A 429 saying a spend limit was reached never clears by waiting: the run fails at once.
* The ``anthropic-ratelimit-*`` headers of each response are kept per process (``Headroom``): a call that the
  headers say cannot fit (input or output tokens, requests) waits for the refill instead of being refused. They
  are written to the hash (for runs that start later) only when little remains.
* An agent's waits add up; past ``max_wait`` seconds the run fails, saying so. A stop cuts any wait at once.

Steady state costs no Valkey command: only a refusal, a pause, a probe and low headroom do.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

import anthropic
import httpx2
import redis

from orchestrator import scripts
from orchestrator.errors import StopRun
from orchestrator.keys import Keys
from orchestrator.states import State

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 60.0
PROBE_TTL_SECONDS = 15.0  # a prober that says nothing for this long is presumed dead: another agent probes
PROBE_POLL_SECONDS = 1.0  # while another agent probes: how often to look at Valkey if no message came
HEADROOM_LOW = 0.1  # headers are written to Valkey when less than this share of a limit remains
HEADROOM_WRITE_EVERY = 5.0  # seconds between two such writes from one process
SLICE_SECONDS = 0.1  # waits are cut in slices: a stop or a pause message is noticed within one
SPEND_LIMIT_ERRORS: tuple[type[Exception], ...] = (
    anthropic.EnforcedSpendLimitReachedError, anthropic.ContractSpendLimitReachedError,
    anthropic.LinkedOrganizationSpendLimitReachedError,
)
LIMIT_KINDS = ("requests", "input-tokens", "output-tokens", "tokens")


class Stop(Protocol):
    """The run's stop signal (``orchestrator.agent.loop.StopSignal``)."""

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True at once when a stop is requested."""
        ...

    def check(self) -> None:
        """Raise StopRun if a stop was requested."""
        ...


@dataclass(frozen=True)
class Refusal:
    """A call the API turned away: ``scope`` ``fleet`` (pause every agent), ``agent`` (this one) or ``fatal``."""

    scope: str
    status: int | None
    retry_after: float | None
    reason: str


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date); None when absent or bad."""
    raw_ms = headers.get("retry-after-ms")
    with contextlib.suppress(TypeError, ValueError):
        if raw_ms is not None and math.isfinite(float(raw_ms)):
            return max(0.0, float(raw_ms) / 1000)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        seconds = float(raw)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(raw)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


def classify(exc: BaseException) -> Refusal | None:
    """What a failed call means for traffic; None for an error that waiting does not help (the call fails)."""
    if isinstance(exc, anthropic.APIStatusError):
        code = exc.error_code or ""
        kind = exc.type or ""
        status = exc.status_code
        if isinstance(exc, SPEND_LIMIT_ERRORS) or "spend_limit" in code:
            return Refusal("fatal", status, None, f"spend limit reached ({code or kind or status}): waiting does not "
                                                  "clear it; raise the organisation's limit, then resume the agent")
        after = retry_after(exc.response.headers)
        if status == 429 or kind == "rate_limit_error":
            return Refusal("fleet", 429, after, "rate limited")
        if status == 529 or kind == "overloaded_error":
            return Refusal("fleet", 529, after, "overloaded")
        if status >= 500 or status == 408 or kind in ("api_error", "timeout_error"):
            return Refusal("agent", status if status >= 400 else None, after, "server error")
        return None
    if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
        return Refusal("agent", None, None, "connection error")
    return None


def backoff(attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter: about 1, 2, 4 ... seconds, capped at 60."""
    base = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** max(0, attempt - 1))
    return float(min(BACKOFF_CAP_SECONDS, base * rng.uniform(0.8, 1.2)))


def jitter(seconds: float, rng: random.Random) -> float:
    """Up to 10% (at most 1 s) more, so the fleet does not wake at one instant."""
    return rng.uniform(0.0, min(1.0, 0.1 * seconds))


def _reset_time(value: str | None, now: float) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    with contextlib.suppress(ValueError):
        return now + float(value)
    return None


@dataclass
class Limit:
    """One ``anthropic-ratelimit-<kind>-*`` triple as last seen."""

    limit: int | None
    remaining: int
    reset: float

    def wait_for(self, need: int, now: float) -> float:
        """Seconds until ``need`` fits, assuming a steady refill up to the reset; 0 if it fits now."""
        if need <= self.remaining or self.reset <= now or (self.limit is not None and need > self.limit):
            return 0.0  # fits, stale, or can never fit (the API says so; waiting does not help)
        full = self.reset - now
        if self.limit is None or self.limit <= self.remaining:
            return full
        return min(full, (need - self.remaining) * full / (self.limit - self.remaining))


class Headroom:
    """What the rate-limit headers said last, per model, in this process (shared by its runs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, Limit]] = {}

    def record(self, model: str, headers: Mapping[str, str], now: float) -> dict[str, Limit]:
        """Keep the limits a response reported; returns those under ``HEADROOM_LOW`` of their limit."""
        low: dict[str, Limit] = {}
        with self._lock:
            seen = self._seen.setdefault(model, {})
            for kind in LIMIT_KINDS:
                remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining")
                reset = _reset_time(headers.get(f"anthropic-ratelimit-{kind}-reset"), now)
                if remaining is None or reset is None:
                    continue
                try:
                    raw_limit = headers.get(f"anthropic-ratelimit-{kind}-limit")
                    entry = Limit(int(raw_limit) if raw_limit else None, int(remaining), reset)
                except ValueError:
                    continue
                seen[kind] = entry
                if entry.limit and entry.remaining < HEADROOM_LOW * entry.limit:
                    low[kind] = entry
        return low

    def seed(self, model: str, fields: Mapping[str, str], now: float) -> None:
        """Take limits written to Valkey by other processes (``hdr:<kind>:<field>``) unless newer ones are known."""
        with self._lock:
            known = set(self._seen.get(model, {}))
        headers = {f"anthropic-ratelimit-{kind}-{part}": fields[f"hdr:{kind}:{part}"]
                   for kind in LIMIT_KINDS if kind not in known
                   for part in ("limit", "remaining", "reset") if f"hdr:{kind}:{part}" in fields}
        self.record(model, headers, now)

    def delay(self, model: str, input_tokens: int, output_tokens: int, now: float) -> tuple[float, str | None]:
        """(seconds to wait, which limit) before a call of this size; the call's cost is taken off at once."""
        need = {"requests": 1, "input-tokens": input_tokens, "output-tokens": output_tokens}
        with self._lock:
            seen = self._seen.get(model, {})
            worst, which = 0.0, None
            for kind, amount in need.items():
                entry = seen.get(kind)
                wait = entry.wait_for(amount, now) if entry is not None else 0.0
                if wait > worst:
                    worst, which = wait, kind
            if worst == 0.0:
                for kind, amount in need.items():
                    entry = seen.get(kind)
                    if entry is not None:
                        entry.remaining = max(0, entry.remaining - amount)
            return worst, which

    def clear(self) -> None:
        """Forget everything (tests)."""
        with self._lock:
            self._seen.clear()


HEADROOM = Headroom()


class RateLimiter:
    """One run's side of the fleet's traffic rules for one model (see the module docstring).

    ``r`` None keeps everything in this process (no fleet pause, no probe): each agent waits on its own. The loop
    calls ``before_call``, then ``on_response`` when a call was accepted or ``on_failure`` when it failed, and
    ``close`` at the end. ``on_wait`` gets the record's ``waiting`` field (``None`` when a wait ends).
    """

    def __init__(self, r: redis.Redis | None, keys: Keys | None, model: str, stop: Stop, *, max_wait: float,
                 on_wait: Callable[[dict[str, Any] | None], None] | None = None, headroom: Headroom | None = None,
                 probe_ttl: float = PROBE_TTL_SECONDS, probe_poll: float = PROBE_POLL_SECONDS,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.r = r
        self.keys = keys or Keys()
        self.model = model
        self.stop = stop
        self.max_wait = max_wait
        self.on_wait = on_wait or (lambda info: None)
        self.headroom = headroom if headroom is not None else HEADROOM
        self.probe_ttl = probe_ttl
        self.probe_poll = probe_poll
        self.clock = clock
        self.rng = rng or random.Random()
        self.waited = 0.0  # seconds this run has spent waiting
        self.probes = 0  # probes this run made
        self._lock = threading.Lock()
        self._news = threading.Event()  # a pause or resume message came
        self._until = 0.0  # the fleet's pause of this model as this run knows it (epoch seconds; 0 = none)
        self._status: int | None = None
        self._loaded = r is None
        self._probe_token: str | None = None
        self._strikes = 0  # refusals in a row (backoff without retry-after)
        self._shown: dict[str, Any] | None = None  # what the record's ``waiting`` field says now
        self._before_wait: Callable[[], None] | None = None  # the caller's hook before this call's first wait
        self._last_write = 0.0
        if r is not None:
            self._pause = scripts.load(r, "ratelimit_pause")
            self._resume = scripts.load(r, "ratelimit_resume")
            self._claim = scripts.load(r, "ratelimit_claim")
            self._release = scripts.load(r, "ratelimit_release")

    @property
    def hash_key(self) -> str:
        """The fleet's pause of this model: until, status, reason, and low headroom seen."""
        return self.keys.rate_limit(self.model)

    @property
    def probe_key(self) -> str:
        """The one agent probing a paused model."""
        return self.keys.rate_limit_probe(self.model)

    @property
    def probing(self) -> bool:
        """Whether this run holds the probe claim."""
        return self._probe_token is not None

    # -- messages (the Supervisor's listener thread) ----------------------------------------------------------
    def on_message(self, body: Mapping[str, Any]) -> None:
        """A pause or resume message from the fleet's stop channel."""
        if body.get("pause") == self.model:
            try:
                until = float(body.get("until") or 0)
            except (TypeError, ValueError):
                return
            with self._lock:
                if until > self._until:
                    self._until = until
                    status = body.get("status")
                    self._status = int(status) if isinstance(status, int | float) else self._status
            self._news.set()
        elif body.get("resume") == self.model:
            with self._lock:
                self._until = 0.0
            self._news.set()

    # -- the loop's hooks --------------------------------------------------------------------------------------
    def wait_if_paused(self, before_wait: Callable[[], None] | None = None) -> None:
        """Wait while the fleet is paused on this model (reading its state once per run); this run may be the
        one to probe when the pause ends. ``before_wait`` runs once before the first wait, if there is one."""
        self._before_wait = before_wait
        try:
            self._load()
            self._await_pause()
        finally:
            self._before_wait = None

    def before_call(self, input_tokens: int, output_tokens: int,
                    before_wait: Callable[[], None] | None = None) -> None:
        """Wait while the fleet is paused or the headers say the call cannot fit; StopRun when waiting is over.
        ``before_wait`` runs once before the first wait, if there is one."""
        self.wait_if_paused(before_wait)
        self._before_wait = before_wait
        try:
            self._wait_for_headroom(input_tokens, output_tokens)
        finally:
            self._before_wait = None

    def _wait_for_headroom(self, input_tokens: int, output_tokens: int) -> None:
        while True:
            wait, which = self.headroom.delay(self.model, input_tokens, output_tokens, self.clock())
            if wait <= 0:
                break
            log.info("model %s: waiting %.1f s for %s headroom (rate-limit headers)", self.model, wait, which)
            self._sleep(wait, {"reason": "rate limited", "until": self.clock() + wait, "status": None,
                               "detail": f"{which} remaining too low"})
        self._show(None)

    def on_response(self, headers: Mapping[str, str]) -> None:
        """A call was accepted: keep its headers; a probe that got through resumes the fleet."""
        self._strikes = 0
        self._note_headers(headers)
        if self._probe_token is not None:
            token, self._probe_token = self._probe_token, None
            try:
                resumed = self._resume(keys=[self.hash_key, self.probe_key],
                                       args=[token, self.clock(), self.keys.stop_channel, self.model])
            except redis.RedisError as exc:
                log.warning("model %s: could not announce the end of the pause: %s", self.model, exc)
                return
            if int(cast(int, resumed)):
                with self._lock:
                    self._until = 0.0
                log.info("model %s: probe got through; the fleet resumes", self.model)

    def on_failure(self, exc: BaseException) -> bool:
        """A call failed: wait as its refusal asks and return True (retry), or False when waiting cannot help.

        Raises StopRun for a spend limit, for a total wait past ``max_wait`` and for a stop.
        """
        refusal = classify(exc)
        if isinstance(exc, anthropic.APIStatusError):
            self._note_headers(exc.response.headers)
        if refusal is None or refusal.scope == "fatal":
            self.close()
            if refusal is not None:
                raise StopRun(State.FAILED, refusal.reason)
            return False
        self._strikes += 1
        delay = refusal.retry_after if refusal.retry_after is not None else backoff(self._strikes, self.rng)
        delay += jitter(delay, self.rng)
        until = self.clock() + delay
        log.warning("model %s: %s (%s): %s for %.1f s", self.model, refusal.reason, refusal.status or "no status",
                    "the fleet pauses" if refusal.scope == "fleet" and self.r is not None else "waiting", delay)
        self._check_budget(delay, refusal)
        if refusal.scope == "fleet":
            self._pause_fleet(until, refusal)
            self._await_pause()
        else:
            self._release_probe()
            self._sleep(delay, {"reason": refusal.reason, "until": until, "status": refusal.status})
        return True

    def close(self) -> None:
        """Give up a probe claim still held (the run ends or its probe failed for another reason)."""
        self._release_probe()
        self._show(None)

    # -- internals ---------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Read the fleet's pause once per run (later changes come as messages)."""
        if self._loaded or self.r is None:
            return
        self._loaded = True
        try:
            fields = cast(dict[str, str], self.r.hgetall(self.hash_key))
        except redis.RedisError as exc:
            log.warning("model %s: could not read the fleet's rate-limit state: %s", self.model, exc)
            return
        now = self.clock()
        with self._lock:
            with contextlib.suppress(TypeError, ValueError):
                self._until = max(self._until, float(fields.get("until") or 0))
            with contextlib.suppress(TypeError, ValueError):
                self._status = int(fields["status"]) if fields.get("status") else self._status
        self.headroom.seed(self.model, fields, now)

    def _note_headers(self, headers: Mapping[str, str]) -> None:
        now = self.clock()
        low = self.headroom.record(self.model, headers, now)
        if not low or self.r is None or now - self._last_write < HEADROOM_WRITE_EVERY:
            return
        self._last_write = now
        items: list[str] = []
        for kind, entry in low.items():
            items += [f"hdr:{kind}:remaining", str(entry.remaining),
                      f"hdr:{kind}:reset", datetime.fromtimestamp(entry.reset).astimezone().isoformat()]
            if entry.limit is not None:
                items += [f"hdr:{kind}:limit", str(entry.limit)]
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(self.hash_key, items=items)
            pipe.expire(self.hash_key, 3600)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("model %s: could not share low rate-limit headroom: %s", self.model, exc)

    def _pause_fleet(self, until: float, refusal: Refusal) -> None:
        token, self._probe_token = self._probe_token or "", None
        with self._lock:
            self._until = max(self._until, until)
            self._status = refusal.status
        if self.r is None:
            return
        try:
            shared = self._pause(keys=[self.hash_key, self.probe_key], args=[
                repr(until), refusal.status or 0, refusal.reason, token, self.keys.stop_channel, self.model,
                int(until - self.clock()) + 3600])
            with self._lock:
                self._until = max(self._until, float(shared))
        except (redis.RedisError, TypeError, ValueError) as exc:
            log.warning("model %s: could not share the pause with the fleet (pausing alone): %s", self.model, exc)

    def _await_pause(self) -> None:
        """Wait out the fleet's pause; return when it is over or when this run is the one to probe."""
        while True:
            self.stop.check()
            with self._lock:
                until, status = self._until, self._status
            if until <= 0 or self._probe_token is not None:
                return
            now = self.clock()
            info = {"reason": "overloaded" if status == 529 else "rate limited", "until": until, "status": status}
            if now < until:
                self._sleep(until - now + jitter(until - now, self.rng), info, wake_on_news=True)
                continue
            if self.r is None:  # alone: the pause simply ends
                with self._lock:
                    if self._until == until:
                        self._until = 0.0
                continue
            if self._claim_probe():
                return
            with self._lock:
                extended = self._until > until
            if not extended and not self._sleep(self.probe_poll, dict(info, until=now + self.probe_poll),
                                                wake_on_news=True):
                self._refresh()

    def _claim_probe(self) -> bool:
        """Become the one prober (SET NX PX), unless the pause in Valkey is not over (then learn its end)."""
        assert self.r is not None
        token = uuid.uuid4().hex
        try:
            answer = str(self._claim(keys=[self.hash_key, self.probe_key],
                                     args=[token, self.clock(), max(1, int(self.probe_ttl * 1000))]))
        except redis.RedisError as exc:
            log.warning("model %s: could not claim the probe (probing anyway): %s", self.model, exc)
            answer = "probe"
        if answer == "probe":
            self._probe_token = token
            self.probes += 1
            log.info("model %s: the pause is over; this agent probes", self.model)
            return True
        if answer != "busy":  # the pause was extended and the message has not reached us yet
            with self._lock, contextlib.suppress(ValueError):
                self._until = max(self._until, float(answer))
        return False

    def _release_probe(self) -> None:
        token, self._probe_token = self._probe_token, None
        if token is None or self.r is None:
            return
        try:
            self._release(keys=[self.probe_key], args=[token])
        except redis.RedisError as exc:
            log.warning("model %s: could not release the probe claim (it expires): %s", self.model, exc)

    def _refresh(self) -> None:
        """No message while another agent probes: look at the hash (a lost message, a dead prober)."""
        assert self.r is not None
        try:
            raw = cast(str | None, self.r.hget(self.hash_key, "until"))
        except redis.RedisError as exc:
            log.warning("model %s: could not read the pause: %s", self.model, exc)
            return
        with self._lock:
            if raw is None:
                self._until = 0.0
            else:
                with contextlib.suppress(ValueError):
                    self._until = max(self._until, float(raw))

    def _check_budget(self, seconds: float, refusal: Refusal | None = None) -> None:
        if self.waited + seconds <= self.max_wait:
            return
        what = refusal.reason if refusal is not None else "rate limited"
        if refusal is not None and refusal.status:
            what += f" ({refusal.status})"
        raise StopRun(State.FAILED, f"{what}: waiting {seconds:.0f} s more would make {self.waited + seconds:.0f} s in "
                                    f"total, past ORCHESTRATOR_RATE_LIMIT_MAX_WAIT_SECONDS ({self.max_wait:g} s)")

    def _sleep(self, seconds: float, info: dict[str, Any], wake_on_news: bool = False) -> bool:
        """Wait ``seconds`` (counted against ``max_wait``); True when a pause/resume message cut it short."""
        self._check_budget(seconds)
        hook, self._before_wait = self._before_wait, None
        if hook is not None:
            hook()
        self._show(info)
        if wake_on_news:
            self._news.clear()
        start = time.monotonic()
        try:
            while True:
                left = seconds - (time.monotonic() - start)
                if left <= 0:
                    return False
                if self.stop.wait(min(SLICE_SECONDS, left)):
                    self.stop.check()
                if wake_on_news and self._news.is_set():
                    return True
        finally:
            self.waited += time.monotonic() - start

    def _show(self, info: dict[str, Any] | None) -> None:
        """Write the record's ``waiting`` field when it changes (not for every slice of one wait)."""
        if info is not None:
            info = {k: v for k, v in info.items() if v is not None or k == "status"}
            info["until"] = round(float(info["until"]), 1)
        shown = self._shown
        if info is None and shown is None:
            return
        if info is not None and shown is not None and info.get("reason") == shown.get("reason") \
                and abs(float(info["until"]) - float(shown["until"])) < 2.0:
            return
        self._shown = info
        try:
            self.on_wait(info)
        except redis.RedisError as exc:
            log.warning("could not write the waiting state: %s", exc)


def pause_message(model: str, until: float, status: int) -> str:
    """The message that pauses a model fleet-wide (what the pause script publishes), for tests and tools."""
    return json.dumps({"pause": model, "until": until, "status": status})
