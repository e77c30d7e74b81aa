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
from orchestrator.errors import StopRun
from orchestrator.keys import DAY_ARCHIVE_TTL_SECONDS, Keys
from orchestrator.pricing import cost_micro_usd
from orchestrator.replication import replicated
from orchestrator.states import State

if TYPE_CHECKING:
    from orchestrator.models import Usage
    from orchestrator.settings import Settings

MIN_CALL_OUTPUT_TOKENS = 16  # a call that cannot get this many output tokens is not worth making
DAY_KEY_TTL_SECONDS = 3 * 24 * 3600


@dataclass(frozen=True)
class TokenReservation:
    """Tokens set aside for one model call (its day and agent name the ledger keys it settles against)."""

    id: str
    max_tokens: int
    amount: int
    day: str = ""
    agent_id: str = ""


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
    def reserve(self, agent_id: str, agent_limit: int, input_bound: int, max_output: int) -> TokenReservation | None:
        """Reserve for one call; None when it cannot fit (hard mode). ``max_tokens`` may come back lowered."""
        day = self.day()
        res_id = uuid.uuid4().hex
        k = self.keys
        ok, out, _headroom = cast(list[int], self._reserve(
            keys=[k.daily_used(day), k.daily_reserved(day), k.agent_used(agent_id), k.agent_reserved(agent_id),
                  k.reservations, k.reservation_data, k.day_agents(day), k.day_exhausted(day),
                  k.agent_exhausted(agent_id), k.day_cost(day)],
            args=[res_id, input_bound, max_output, MIN_CALL_OUTPUT_TOKENS, self.s.daily_token_limit, agent_limit,
                  "1" if self.hard else "0", self.clock() + self.s.reservation_lease_seconds, agent_id, day,
                  DAY_KEY_TTL_SECONDS],
        ))
        replicated(self.r, "token reservation")
        if not ok:
            return None
        return TokenReservation(res_id, int(out), input_bound + int(out), day, agent_id)

    def settle(self, reservation: TokenReservation | str, usage: Usage, cost_micro: int) -> bool:
        """Replace a reservation by real usage; False if it was already settled or released."""
        return self.settle_totals(reservation, usage.total_tokens, cost_micro) is not None

    def settle_totals(self, reservation: TokenReservation | str, tokens: int,
                      cost_micro: int) -> tuple[int, int] | None:
        """Settle, returning the agent's and the day's used tokens after it (None if already settled)."""
        res = reservation if isinstance(reservation, TokenReservation) else self._lookup(reservation)
        if res is None:
            return None
        k = self.keys
        out = cast(list[int], self._settle(
            keys=[k.reservations, k.reservation_data, k.daily_reserved(res.day), k.agent_reserved(res.agent_id),
                  k.daily_used(res.day), k.agent_used(res.agent_id), k.day_cost(res.day)],
            args=[res.id, tokens, cost_micro],
        ))
        replicated(self.r, "token settlement")
        return (int(out[1]), int(out[2])) if out[0] else None

    def _lookup(self, reservation_id: str) -> TokenReservation | None:
        data = cast(str | None, self.r.hget(self.keys.reservation_data, reservation_id))
        if not data:
            return None
        amount, day, agent = data.split("|", 2)
        return TokenReservation(reservation_id, 0, int(amount), day, agent)

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
        return sum(1 for res_id in stale if self.release(res_id))

    def agent_used(self, agent_id: str) -> int:
        """Tokens settled by one agent."""
        return int(cast(str | None, self.r.get(self.keys.agent_used(agent_id))) or 0)

    def day_totals(self, day: str | None = None) -> dict[str, int]:
        """Used, reserved and cost (micro-dollars) of a day."""
        d = day or self.day()
        used, reserved, cost, exhausted = cast(list[str | None], self.r.mget(
            self.keys.daily_used(d), self.keys.daily_reserved(d), self.keys.day_cost(d), self.keys.day_exhausted(d)))
        return {"used": int(used or 0), "reserved": int(reserved or 0), "cost_micro": int(cost or 0),
                "exhausted": int(exhausted or 0)}

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
    """The ledger as one agent's loop sees it (``orchestrator.agent.loop.Ledger``)."""

    def __init__(self, budget: Budget, agent_id: str, agent_limit: int, model: str,
                 on_warning: Callable[[str], None], guard: Callable[[], None] | None = None) -> None:
        self.budget = budget
        self.guard = guard
        self.agent_id = agent_id
        self.agent_limit = agent_limit
        self.model = model
        self.on_warning = on_warning
        self.open: TokenReservation | None = None
        self._warned: set[str] = set()

    def reserve(self, input_bound: int, max_output: int) -> TokenReservation:
        """Reserve for the next call or stop the run with ``budget_exceeded`` (hard mode).

        If the ledger cannot be reached (after the client's retries) no call is made: the run fails closed.
        """
        if self.guard is not None:
            self.guard()
        try:
            res = self.budget.reserve(self.agent_id, self.agent_limit, input_bound, max_output)
        except redis.RedisError as exc:
            raise StopRun(State.FAILED, f"budget ledger unreachable, no model call made (fail closed): {exc}") from None
        if res is None:
            raise StopRun(State.BUDGET_EXCEEDED, "token budget exhausted: not enough left for another call "
                          f"(agent limit {self.agent_limit}, daily limit {self.budget.s.daily_token_limit})")
        self.open = res
        return res

    def settle(self, reservation: Any, usage: Usage) -> None:
        """Charge the call's real usage and warn once per threshold crossed."""
        totals = self.budget.settle_totals(reservation, usage.total_tokens, cost_micro_usd(
            self.model, usage.input_tokens, usage.output_tokens,
            usage.cache_creation_input_tokens, usage.cache_read_input_tokens))
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
