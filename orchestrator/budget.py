"""The token ledger: atomic reserve-before-call and settle-after, daily and per agent, plus concurrency slots.

Every model call first reserves ``input bound + max_tokens`` in one Lua script that checks both the day's and
the agent's headroom; in hard mode a call that cannot fit is not made (``max_tokens`` is first lowered to what
is left). After the call the real usage replaces the reservation. Reservations are leases: a crashed worker's
reservation is released when its lease runs out, so it cannot pin budget. All counters are integers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from zoneinfo import ZoneInfo

import redis

from orchestrator import scripts
from orchestrator.errors import StaleFence, StopRun
from orchestrator.keys import DAY_ARCHIVE_TTL_SECONDS, Keys
from orchestrator.pricing import cost_micro_usd
from orchestrator.replication import replicated
from orchestrator.states import State

if TYPE_CHECKING:
    from orchestrator.models import Usage
    from orchestrator.settings import Settings

MIN_CALL_OUTPUT_TOKENS = 16  # a call that cannot get this many output tokens is not worth making
DAY_KEY_TTL_SECONDS = 3 * 24 * 3600


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class TokenReservation:
    """Tokens set aside for one model call. ``id`` is its member in the reservations zset, "uuid|amount|day|agent":
    it names the day and agent it settles against."""

    id: str
    max_tokens: int
    amount: int
    day: str = ""
    agent_id: str = ""

    @classmethod
    def parse(cls, member: str) -> TokenReservation | None:
        """A reservation from its zset member (None for a member of another shape)."""
        parts = member.split("|", 3)
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        return cls(member, 0, int(parts[1]), parts[2], parts[3])


@dataclass(frozen=True)
class Progress:
    """A run's fenced progress, written in the same step as a reservation or a settlement (no round trip of its
    own): the checkpoint JSON and, when the worktree changed, its snapshot. An empty checkpoint checks the fence
    and writes nothing."""

    fence_key: str
    fence: str
    checkpoint_key: str
    checkpoint: str
    snapshot_key: str
    snapshot: str = ""
    on_saved: Callable[[], None] | None = None

    def keys(self) -> list[str]:
        """fence, checkpoint and snapshot keys, as the scripts take them."""
        return [self.fence_key, self.checkpoint_key, self.snapshot_key]

    def args(self) -> list[str]:
        """token, checkpoint and snapshot, as the scripts take them."""
        return [self.fence, self.checkpoint, self.snapshot]


_NO_PROGRESS_ARGS = ["", "", ""]


def ledger_fields(raw: str | None, n: int) -> list[int]:
    """The integers of a ledger string ("used|reserved[|cost]"), padded with zeros to ``n``."""
    out = [int(part) for part in (raw or "").split("|") if part]
    return out + [0] * (n - len(out))


def status_for(used: int, limit: int, warning_percent: int, min_left: int = 0, exhausted: bool = False) -> str:
    """``within_budget`` / ``approaching_limit`` / ``at_limit`` / ``exceeded`` for a usage against a limit.

    ``exhausted`` means a call was refused because too little was left for it: that is ``at_limit`` too.
    """
    if used > limit:
        return "exceeded"
    if used >= limit or limit - used < min_left or exhausted:
        return "at_limit"
    if used * 100 >= warning_percent * limit:
        return "approaching_limit"
    return "within_budget"


def percent(used: int, limit: int) -> float:
    """Usage as 0-100 (can pass 100 in soft mode), two decimals."""
    return round(used * 100 / limit, 2) if limit else 0.0


class Budget:
    """The fleet's ledger on Valkey."""

    def __init__(self, r: redis.Redis, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.r = r
        self.s = settings
        self.keys = Keys(settings.key_prefix)
        self.clock = clock or time.time
        self._reserve = scripts.load(r, "reserve")
        self._settle = scripts.load(r, "settle")

    @property
    def hard(self) -> bool:
        """Whether limits stop agents (``hard``) or only warn (``soft``)."""
        return self.s.budget_enforcement == "hard"

    def day(self, at: float | None = None) -> str:
        """The calendar day (in the configured timezone) of a moment, as YYYY-MM-DD."""
        moment = self.clock() if at is None else at
        return datetime.fromtimestamp(moment, ZoneInfo(self.s.timezone)).date().isoformat()

    # -- tokens ---------------------------------------------------------------------------------------
    def reserve(self, agent_id: str, agent_limit: int, input_bound: int, max_output: int, *,
                progress: Progress | None = None, registered: str | None = None) -> TokenReservation | None:
        """Reserve for one call; None when it cannot fit (hard mode). ``max_tokens`` may come back lowered.

        ``progress`` is written first, in the same step, whether or not the call fits (StaleFence, and nothing
        written, when its token is stale). ``registered``: the day the caller last added the agent to the day's agents
        (a reservation on any other day adds it).
        """
        day = self.day()
        k = self.keys
        out = cast(list[Any], self._reserve(
            keys=[k.day_ledger(day), k.agent_ledger(agent_id), k.reservations, k.day_agents(day), k.day_exhausted(day),
                  k.agent_exhausted(agent_id), *(progress.keys() if progress else self._no_progress_keys(agent_id))],
            args=[uuid.uuid4().hex, input_bound, max_output, MIN_CALL_OUTPUT_TOKENS, self.s.daily_token_limit,
                  agent_limit, "1" if self.hard else "0", self.clock() + self.s.reservation_lease_seconds, agent_id,
                  day, DAY_KEY_TTL_SECONDS, "0" if registered == day else "1",
                  *(progress.args() if progress else _NO_PROGRESS_ARGS)],
        ))
        ok = int(out[0])
        if ok < 0:
            raise StaleFence(f"agent {agent_id}: fencing token {progress.fence if progress else ''} is stale")
        if progress is not None and progress.on_saved is not None:
            progress.on_saved()
        replicated(self.r, "token reservation")
        if not ok:
            return None
        granted = int(out[1])
        return TokenReservation(_str(out[3]), granted, input_bound + granted, day, agent_id)

    def _no_progress_keys(self, agent_id: str) -> list[str]:
        k = self.keys
        return [k.fence(agent_id), k.checkpoint(agent_id), k.snapshot(agent_id)]

    def settle(self, reservation: TokenReservation | str, usage: Usage, cost_micro: int) -> bool:
        """Replace a reservation by real usage; False if it was already settled or released."""
        return self.settle_totals(reservation, usage.total_tokens, cost_micro) is not None

    def settle_totals(self, reservation: TokenReservation | str, tokens: int, cost_micro: int, *,
                      progress: Progress | None = None) -> tuple[int, int] | None:
        """Settle, returning the agent's and the day's used tokens after it (None if already settled).

        ``progress`` is written in the same step when its token is still the newest; the tokens are charged either
        way (they were spent), then StaleFence is raised for a stale token.
        """
        res = reservation if isinstance(reservation, TokenReservation) else TokenReservation.parse(reservation)
        if res is None:
            return None
        k = self.keys
        out = cast(list[int], self._settle(
            keys=[k.reservations, k.day_ledger(res.day), k.agent_ledger(res.agent_id),
                  *(progress.keys() if progress else self._no_progress_keys(res.agent_id))],
            args=[res.id, tokens, cost_micro, *(progress.args() if progress else _NO_PROGRESS_ARGS),
                  DAY_KEY_TTL_SECONDS],
        ))
        replicated(self.r, "token settlement")
        if progress is not None:
            if not int(out[3]):
                raise StaleFence(f"agent {res.agent_id}: fencing token {progress.fence} is stale")
            if progress.on_saved is not None:
                progress.on_saved()
        return (int(out[1]), int(out[2])) if out[0] else None

    def release(self, reservation: TokenReservation | str) -> bool:
        """Drop a reservation without charging it."""
        return self.settle_totals(reservation, 0, 0) is not None

    def renew(self, reservation_id: str) -> None:
        """Extend a reservation's lease (a long call is still running)."""
        self.r.zadd(self.keys.reservations, {reservation_id: self.clock() + self.s.reservation_lease_seconds},
                    xx=True)

    def expire_reservations(self, limit: int = 1000) -> int:
        """Release reservations whose lease ran out (their worker died); returns how many."""
        stale = cast(list[str], self.r.zrangebyscore(self.keys.reservations, "-inf", self.clock(), 0, limit))
        released = 0
        for member in stale:
            if TokenReservation.parse(member) is None:  # not ours to parse: drop it, it can never settle
                self.r.zrem(self.keys.reservations, member)
            elif self.release(member):
                released += 1
        return released

    def agent_totals(self, agent_id: str) -> tuple[int, int]:
        """(used, reserved) tokens of one agent."""
        used, reserved = ledger_fields(cast(str | None, self.r.get(self.keys.agent_ledger(agent_id))), 2)[:2]
        return used, reserved

    def agent_used(self, agent_id: str) -> int:
        """Tokens settled by one agent."""
        return self.agent_totals(agent_id)[0]

    def day_totals(self, day: str | None = None) -> dict[str, int]:
        """Used, reserved and cost (micro-dollars) of a day."""
        d = day or self.day()
        ledger, exhausted = cast(list[str | None], self.r.mget(self.keys.day_ledger(d), self.keys.day_exhausted(d)))
        used, reserved, cost = ledger_fields(ledger, 3)[:3]
        return {"used": used, "reserved": reserved, "cost_micro": cost, "exhausted": int(exhausted or 0)}

    # -- concurrency slots (taken and given back by orchestrator.lifecycle) -------------------------------
    def running(self) -> int:
        """Slots held by live leases."""
        return int(self.r.zcount(self.keys.slots, self.clock(), "+inf"))

    # -- summaries ------------------------------------------------------------------------------------
    def summary(self, agents: list[dict[str, Any]] | None = None, day: str | None = None) -> dict[str, Any]:
        """The ``budget --json`` document (CONTRACT section 4)."""
        d = day or self.day()
        totals = self.day_totals(d)
        warn = self.s.budget_warning_percent
        daily_limit = self.s.daily_token_limit
        running = self.running()
        conc_limit = self.s.max_concurrent_agents
        rows = []
        for rec in agents or []:
            agent_id = rec["agent_id"]
            spec = rec.get("spec") or {}
            limit = min(self.s.agent_token_limit, spec.get("token_limit") or self.s.agent_token_limit)
            used = self.agent_used(agent_id)
            exhausted = bool(self.r.exists(self.keys.agent_exhausted(agent_id)))
            rows.append({
                "agent_id": agent_id, "task_id": rec.get("task_id"), "used": used, "limit": limit,
                "percent": percent(used, limit),
                "status": status_for(used, limit, warn, MIN_CALL_OUTPUT_TOKENS, exhausted),
            })
        return {
            "date": d, "timezone": self.s.timezone, "enforcement": self.s.budget_enforcement,
            "cost_usd": totals["cost_micro"] / 1_000_000,
            "daily": {"limit": daily_limit, "used": totals["used"], "reserved": totals["reserved"],
                      "percent": percent(totals["used"], daily_limit),
                      "status": status_for(totals["used"], daily_limit, warn, MIN_CALL_OUTPUT_TOKENS,
                                           bool(totals["exhausted"]))},
            "concurrency": {"limit": conc_limit, "running": running, "percent": percent(running, conc_limit),
                            "status": status_for(running, conc_limit, warn)},
            "agents": rows,
        }

    def day_agent_ids(self, day: str | None = None) -> list[str]:
        """Agents that reserved tokens on a day."""
        return sorted(cast(set[str], self.r.smembers(self.keys.day_agents(day or self.day()))))

    def archive_day(self, day: str, summary: dict[str, Any]) -> bool:
        """Keep a finished day's summary (40 days); idempotent: the first archive of a day wins."""
        return bool(self.r.set(self.keys.day_archive(day), json.dumps(summary), nx=True, ex=DAY_ARCHIVE_TTL_SECONDS))


class AgentLedger:
    """The ledger as one agent's loop sees it (``orchestrator.agent.loop.Ledger``).

    With ``persist`` (checkpoint or None -> fenced ``Progress``) it carries the loop's checkpoints: a checkpoint
    handed to ``reserve`` or ``settle`` is written in the same script as the reservation or settlement, and every
    reservation and settlement checks the run's fencing token.
    """

    def __init__(self, budget: Budget, agent_id: str, agent_limit: int, model: str,
                 on_warning: Callable[[str], None], guard: Callable[[], None] | None = None,
                 persist: Callable[[Any], Progress] | None = None) -> None:
        self.budget = budget
        self.guard = guard
        self.agent_id = agent_id
        self.agent_limit = agent_limit
        self.model = model
        self.on_warning = on_warning
        self.persist = persist
        self.open: TokenReservation | None = None
        self._warned: set[str] = set()
        self._registered: str | None = None  # the day this run last added the agent to the day's agents

    @property
    def carries_checkpoints(self) -> bool:
        """Whether ``reserve`` and ``settle`` write the checkpoint they are given."""
        return self.persist is not None

    def _progress(self, checkpoint: Any) -> Progress | None:
        """The fenced progress to write with a reservation or settlement; with no checkpoint, the fence alone (a
        run that was fenced out can reserve nothing, and learns it at its settlement)."""
        return self.persist(checkpoint) if self.persist is not None else None

    def reserve(self, input_bound: int, max_output: int, checkpoint: Any = None) -> TokenReservation:
        """Reserve for the next call (writing ``checkpoint`` first, in the same step) or stop the run with
        ``budget_exceeded`` (hard mode).

        If the ledger cannot be reached (after the client's retries) no call is made: the run fails closed.
        """
        if self.guard is not None:
            self.guard()
        try:
            res = self.budget.reserve(self.agent_id, self.agent_limit, input_bound, max_output,
                                      progress=self._progress(checkpoint), registered=self._registered)
        except redis.RedisError as exc:
            raise StopRun(State.FAILED, f"budget ledger unreachable, no model call made (fail closed): {exc}") from None
        if res is None:
            raise StopRun(State.BUDGET_EXCEEDED, "token budget exhausted: not enough left for another call "
                          f"(agent limit {self.agent_limit}, daily limit {self.budget.s.daily_token_limit})")
        self._registered = res.day
        self.open = res
        return res

    def settle(self, reservation: Any, usage: Usage, checkpoint: Any = None) -> None:
        """Charge the call's real usage (writing ``checkpoint`` in the same step) and warn once per threshold
        crossed."""
        totals = self.budget.settle_totals(reservation, usage.total_tokens, cost_micro_usd(
            self.model, usage.input_tokens, usage.output_tokens,
            usage.cache_creation_input_tokens, usage.cache_read_input_tokens), progress=self._progress(checkpoint))
        self.open = None
        if totals is not None:
            self._check_thresholds(*totals)

    def release_open(self) -> None:
        """Release a reservation left open by a failure path (idempotent)."""
        if self.open is not None:
            self.budget.release(self.open)
            self.open = None

    def _check_thresholds(self, used: int, day: int) -> None:
        s = self.budget.s
        for scope, value, limit in (("agent", used, self.agent_limit), ("daily", day, s.daily_token_limit)):
            status = status_for(value, limit, s.budget_warning_percent)
            key = f"{scope}:{status}"
            if status != "within_budget" and key not in self._warned:
                self._warned.add(key)
                self.on_warning(f"{scope} token budget {status}: {value} of {limit} ({percent(value, limit)}%)")
