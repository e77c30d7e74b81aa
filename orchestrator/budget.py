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
from typing import Any, cast
from zoneinfo import ZoneInfo

import redis

from orchestrator.agent.loop import StopRun
from orchestrator.keys import DAY_ARCHIVE_TTL_SECONDS, Keys
from orchestrator.models import State, Usage
from orchestrator.pricing import cost_micro_usd
from orchestrator.settings import Settings

MIN_CALL_OUTPUT_TOKENS = 16  # a call that cannot get this many output tokens is not worth making
DAY_KEY_TTL_SECONDS = 3 * 24 * 3600

# KEYS: day_used, day_reserved, agent_used, agent_reserved, reservations, reservation, day_agents,
#       day_exhausted, agent_exhausted (set when a call is refused: "too little left for another call")
# ARGV: res_id, input_bound, max_output, min_output, day_limit, agent_limit, hard, lease_until, agent, day, ttl
_RESERVE = """
local day_used = tonumber(redis.call('GET', KEYS[1]) or '0')
local day_res = tonumber(redis.call('GET', KEYS[2]) or '0')
local ag_used = tonumber(redis.call('GET', KEYS[3]) or '0')
local ag_res = tonumber(redis.call('GET', KEYS[4]) or '0')
local input_bound = tonumber(ARGV[2])
local max_out = tonumber(ARGV[3])
local day_room = tonumber(ARGV[5]) - day_used - day_res
local agent_room = tonumber(ARGV[6]) - ag_used - ag_res
local headroom = math.min(day_room, agent_room)
local out = max_out
if ARGV[7] == '1' then
  if headroom < input_bound + tonumber(ARGV[4]) then
    if day_used + input_bound + tonumber(ARGV[4]) > tonumber(ARGV[5]) then
      redis.call('SET', KEYS[8], '1', 'EX', tonumber(ARGV[11]))
    end
    if ag_used + input_bound + tonumber(ARGV[4]) > tonumber(ARGV[6]) then
      redis.call('SET', KEYS[9], '1')
    end
    return {0, 0, headroom}
  end
  out = math.min(max_out, headroom - input_bound)
end
local amount = input_bound + out
redis.call('INCRBY', KEYS[2], amount)
redis.call('INCRBY', KEYS[4], amount)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[11]))
redis.call('HSET', KEYS[6], 'amount', amount, 'day', ARGV[10], 'agent', ARGV[9])
redis.call('EXPIRE', KEYS[6], tonumber(ARGV[11]))
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[1])
redis.call('SADD', KEYS[7], ARGV[9])
redis.call('EXPIRE', KEYS[7], tonumber(ARGV[11]))
return {1, out, headroom}
"""

# KEYS: reservations, reservation ; ARGV: res_id, used_tokens, cost_micro, prefix, ttl
# Idempotent: a reservation settles or is released once; later calls find nothing and return {0}.
# Returns {1, agent used, day used} so the caller can check thresholds without another round trip.
_SETTLE = """
local amount = tonumber(redis.call('HGET', KEYS[2], 'amount') or '-1')
if amount < 0 then return {0} end
local day = redis.call('HGET', KEYS[2], 'day')
local agent = redis.call('HGET', KEYS[2], 'agent')
local p = ARGV[4]
redis.call('DECRBY', p .. 'budget:day:' .. day .. ':reserved', amount)
redis.call('DECRBY', p .. 'budget:agent:' .. agent .. ':reserved', amount)
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
local used = tonumber(ARGV[2])
if used > 0 then
  local dk = p .. 'budget:day:' .. day .. ':used'
  redis.call('INCRBY', dk, used)
  redis.call('EXPIRE', dk, tonumber(ARGV[5]))
  redis.call('INCRBY', p .. 'budget:agent:' .. agent .. ':used', used)
  local ck = p .. 'budget:day:' .. day .. ':cost_micro'
  redis.call('INCRBY', ck, tonumber(ARGV[3]))
  redis.call('EXPIRE', ck, tonumber(ARGV[5]))
end
local agent_used = tonumber(redis.call('GET', p .. 'budget:agent:' .. agent .. ':used') or '0')
local day_used = tonumber(redis.call('GET', p .. 'budget:day:' .. day .. ':used') or '0')
return {1, agent_used, day_used}
"""

# KEYS: slots ; ARGV: agent, limit, now, lease_until, force
_ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1]); return 1
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) or ARGV[5] == '1' then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1]); return 1
end
return 0
"""


@dataclass(frozen=True)
class TokenReservation:
    """Tokens set aside for one model call."""

    id: str
    max_tokens: int
    amount: int


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
        self._reserve = r.register_script(_RESERVE)
        self._settle = r.register_script(_SETTLE)
        self._acquire_slot = r.register_script(_ACQUIRE_SLOT)

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
                  k.reservations, k.reservation(res_id), k.day_agents(day), k.day_exhausted(day),
                  k.agent_exhausted(agent_id)],
            args=[res_id, input_bound, max_output, MIN_CALL_OUTPUT_TOKENS, self.s.daily_token_limit, agent_limit,
                  "1" if self.hard else "0", self.clock() + self.s.reservation_lease_seconds, agent_id, day,
                  DAY_KEY_TTL_SECONDS],
        ))
        if not ok:
            return None
        return TokenReservation(res_id, int(out), input_bound + int(out))

    def settle(self, reservation_id: str, usage: Usage, cost_micro: int) -> bool:
        """Replace a reservation by real usage; False if it was already settled or released."""
        return self.settle_totals(reservation_id, usage, cost_micro) is not None

    def settle_totals(self, reservation_id: str, usage: Usage, cost_micro: int) -> tuple[int, int] | None:
        """Settle, returning the agent's and the day's used tokens after it (None if already settled)."""
        out = cast(list[int], self._settle(
            keys=[self.keys.reservations, self.keys.reservation(reservation_id)],
            args=[reservation_id, usage.total_tokens, cost_micro, self.keys.prefix, DAY_KEY_TTL_SECONDS],
        ))
        return (int(out[1]), int(out[2])) if out[0] else None

    def release(self, reservation_id: str) -> bool:
        """Drop a reservation without charging it."""
        return self.settle(reservation_id, Usage(), 0)

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

    # -- concurrency slots ----------------------------------------------------------------------------
    def acquire_slot(self, agent_id: str, force: bool = False) -> bool:
        """Take (or renew) a concurrency slot lease; ``force`` takes one past the cap (soft mode)."""
        now = self.clock()
        return bool(self._acquire_slot(
            keys=[self.keys.slots],
            args=[agent_id, self.s.max_concurrent_agents, now, now + self.s.slot_lease_seconds, "1" if force else "0"],
        ))

    def release_slot(self, agent_id: str) -> None:
        """Give a slot back."""
        self.r.zrem(self.keys.slots, agent_id)

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
        totals = self.budget.settle_totals(reservation.id, usage, cost_micro_usd(
            self.model, usage.input_tokens, usage.output_tokens,
            usage.cache_creation_input_tokens, usage.cache_read_input_tokens))
        self.open = None
        if totals is not None:
            self._check_thresholds(*totals)

    def release_open(self) -> None:
        """Release a reservation left open by a failure path (idempotent)."""
        if self.open is not None:
            self.budget.release(self.open.id)
            self.open = None

    def _check_thresholds(self, used: int, day: int) -> None:
        s = self.budget.s
        for scope, value, limit in (("agent", used, self.agent_limit), ("daily", day, s.daily_token_limit)):
            status = status_for(value, limit, s.budget_warning_percent)
            key = f"{scope}:{status}"
            if status != "within_budget" and key not in self._warned:
                self._warned.add(key)
                self.on_warning(f"{scope} token budget {status}: {value} of {limit} ({percent(value, limit)}%)")
