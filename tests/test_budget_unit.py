"""The token ledger on fakeredis: statuses, day boundaries across DST, leases, and property-based invariants."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.budget import MIN_CALL_OUTPUT_TOKENS, Budget, status_for
from orchestrator.models import Usage
from orchestrator.settings import Settings


def make_budget(clock: list[float] | None = None, **overrides: object) -> Budget:
    s = Settings(_env_file=None, **overrides)  # type: ignore[call-arg, arg-type]
    r = fakeredis.FakeRedis(decode_responses=True)
    moment = clock if clock is not None else [1_800_000_000.0]
    return Budget(r, s, clock=lambda: moment[0])


def usage(total: int) -> Usage:
    return Usage(input_tokens=total, total_tokens=total)


@pytest.mark.parametrize(("used", "expected"), [
    (0, "within_budget"), (799, "within_budget"), (800, "approaching_limit"), (999, "approaching_limit"),
    (1000, "at_limit"), (1001, "exceeded"),
])
def test_status_thresholds(used: int, expected: str) -> None:
    assert status_for(used, 1000, 80) == expected


def test_too_little_left_for_a_call_is_at_limit() -> None:
    assert status_for(995, 1000, 80, min_left=MIN_CALL_OUTPUT_TOKENS) == "at_limit"


def test_reserve_lowers_max_tokens_to_headroom_then_refuses() -> None:
    b = make_budget(daily_token_limit=10_000, agent_token_limit=1_000)
    first = b.reserve("a", 1_000, input_bound=300, max_output=8192)
    assert first is not None and first.max_tokens == 700  # lowered to what is left
    b.settle(first, usage(900), 0)
    assert b.reserve("a", 1_000, input_bound=90, max_output=8192) is None  # 100 left < 90 + 16
    assert b.agent_used("a") == 900


def test_settle_is_idempotent_and_release_frees() -> None:
    b = make_budget(daily_token_limit=1_000)
    res = b.reserve("a", 1_000, 100, 200)
    assert res is not None
    assert b.day_totals()["reserved"] == 300
    assert b.settle(res, usage(250), 10) is True
    assert b.settle(res, usage(250), 10) is False
    assert b.release(res) is False
    totals = b.day_totals()
    assert totals == {"used": 250, "reserved": 0, "cost_micro": 10, "exhausted": 0}


def test_expired_reservation_lease_is_released() -> None:
    clock = [1_800_000_000.0]
    b = make_budget(clock, daily_token_limit=1_000, reservation_lease_seconds=30)
    assert b.reserve("a", 1_000, 100, 800) is not None
    assert b.reserve("b", 1_000, 100, 800) is None  # the first reservation pins the day
    clock[0] += 31
    assert b.expire_reservations() == 1
    assert b.day_totals()["reserved"] == 0
    assert b.reserve("b", 1_000, 100, 800) is not None


def test_soft_mode_goes_past_the_limit() -> None:
    b = make_budget(daily_token_limit=1_000, budget_enforcement="soft")
    res = b.reserve("a", 1_000, 900, 8192)
    assert res is not None and res.max_tokens == 8192
    b.settle(res, usage(1_500), 0)
    summary = b.summary([{"agent_id": "a", "task_id": "t", "spec": {}}])
    assert summary["daily"]["status"] == "exceeded" and summary["daily"]["percent"] == 150.0


def at(tz: str, text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(("moment", "day"), [
    ("2026-03-07T23:59:59", "2026-03-07"),
    ("2026-03-08T00:00:00", "2026-03-08"),
    ("2026-03-08T03:30:00", "2026-03-08"),  # after the spring-forward gap (02:00 -> 03:00)
    ("2026-03-08T23:59:59", "2026-03-08"),  # a 23-hour day still ends at local midnight
    ("2026-11-01T01:30:00", "2026-11-01"),  # the repeated hour when clocks fall back
    ("2026-11-01T23:59:59", "2026-11-01"),
    ("2026-11-02T00:00:01", "2026-11-02"),
])
def test_day_boundary_follows_local_midnight_across_dst(moment: str, day: str) -> None:
    tz = "America/New_York"
    b = make_budget(timezone=tz)
    assert b.day(at(tz, moment)) == day


def test_daily_limit_resets_at_local_midnight_not_utc() -> None:
    tz = "Asia/Tokyo"  # UTC+9: local midnight is 15:00 UTC
    clock = [at(tz, "2026-11-23T23:58:00")]
    b = make_budget(clock, timezone=tz, daily_token_limit=1_000)
    res = b.reserve("a", 10**9, 500, 500)
    assert res is not None
    b.settle(res, usage(1_000), 0)
    assert b.reserve("a", 10**9, 10, 10) is None  # the day is spent
    clock[0] = at(tz, "2026-11-24T00:00:30")
    assert b.day() == "2026-11-24"
    assert b.reserve("a", 10**9, 10, 10) is not None  # a new day, implicitly reset
    assert b.day_totals("2026-11-23")["used"] == 1_000


ops = st.lists(st.tuples(st.sampled_from(["reserve", "settle", "release", "expire"]),
                         st.integers(0, 3), st.integers(1, 400), st.integers(1, 600), st.floats(0, 1.5)),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_ledger_never_exceeds_limits_and_never_counts_twice(steps: list[tuple[str, int, int, int, float]]) -> None:
    clock = [1_800_000_000.0]
    daily, per_agent = 2_000, 900
    b = make_budget(clock, daily_token_limit=daily, reservation_lease_seconds=60)
    open_res: list[tuple[str, str, int]] = []  # (reservation id, agent, amount)
    settled_total = 0
    per_agent_settled: dict[str, int] = {}
    for op, agent_n, input_bound, output, fraction in steps:
        agent = f"a{agent_n}"
        if op == "reserve":
            res = b.reserve(agent, per_agent, input_bound, output)
            if res is not None:
                assert res.max_tokens <= output
                open_res.append((res.id, agent, res.amount))
        elif op in ("settle", "release") and open_res:
            res_id, owner, amount = open_res.pop(agent_n % len(open_res))
            spent = min(amount, int(amount * fraction)) if op == "settle" else 0
            if b.settle(res_id, usage(spent), 0):
                settled_total += spent
                per_agent_settled[owner] = per_agent_settled.get(owner, 0) + spent
            assert b.settle(res_id, usage(spent), 0) is False  # never counted twice
        elif op == "expire":
            clock[0] += 61 * fraction
            b.expire_reservations()
            open_res = [o for o in open_res if b.r.zscore(b.keys.reservations, o[0]) is not None]
        totals = b.day_totals()
        assert totals["used"] + totals["reserved"] <= daily
        assert totals["used"] == settled_total
        for n in range(4):
            a = f"a{n}"
            used, reserved = b.agent_totals(a)
            assert used == b.agent_used(a) == per_agent_settled.get(a, 0)
            assert reserved == sum(amount for _, owner, amount in open_res if owner == a)
            assert b.agent_used(a) + reserved <= per_agent
