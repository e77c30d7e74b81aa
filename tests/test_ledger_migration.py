"""Upgrading from the first ledger layout keeps the day's spend, each agent's usage and the open reservations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from orchestrator.budget import Budget
from orchestrator.keys import Keys
from orchestrator.ledger_migration import legacy_reservation_data, migrate_legacy_ledger
from orchestrator.models import Usage
from orchestrator.settings import Settings
from orchestrator.testing.cluster import Valkey

K = Keys("orch:")


@pytest.fixture
def r(valkey: Valkey) -> Iterator[redis.Redis]:
    with valkey.client(2) as client:
        yield client


def test_old_counters_and_open_reservations_are_folded_once(r: redis.Redis) -> None:
    budget = Budget(r, Settings(_env_file=None, daily_token_limit=10_000))
    day = budget.day()
    # what the first layout left: 3,000 used and 500 reserved today, by two agents, one reservation open
    r.set(f"orch:budget:day:{day}:used", 3_000, ex=3600)
    r.set(f"orch:budget:day:{day}:reserved", 500, ex=3600)
    r.set(f"orch:budget:day:{day}:cost_micro", 42_000, ex=3600)
    r.set("orch:budget:agent:a1:used", 2_000)
    r.set("orch:budget:agent:a1:reserved", 500)
    r.set("orch:budget:agent:a2:used", 1_000, ex=600)  # a finished agent: its keys had the record's TTL
    r.zadd(K.reservations, {"res-1": budget.clock() + 600})
    r.hset(legacy_reservation_data(K), "res-1", f"500|{day}|a1")

    assert migrate_legacy_ledger(r, K) == {"days": 1, "agents": 2, "reservations": 1}
    assert budget.day_totals() == {"used": 3_000, "reserved": 500, "cost_micro": 42_000, "exhausted": 0}
    assert budget.agent_totals("a1") == (2_000, 500) and budget.agent_totals("a2") == (1_000, 0)
    assert 0 < r.ttl(K.day_ledger(day)) <= 3600 and 0 < r.ttl(K.agent_ledger("a2")) <= 600
    assert r.ttl(K.agent_ledger("a1")) == -1
    assert not r.keys("orch:budget:*:used") and not r.exists(legacy_reservation_data(K))
    # the daily limit still counts what was spent before the upgrade
    assert budget.reserve("a3", 10_000, 7_000, 1_000) is None  # 6,500 left; 10,000 had it been lost
    # the migrated reservation settles like a new one
    assert budget.settle(f"res-1|500|{day}|a1", Usage(total_tokens=400), 7) is True
    assert budget.day_totals()["reserved"] == 0 and budget.agent_totals("a1") == (2_400, 0)
    assert migrate_legacy_ledger(r, K) == {"days": 0, "agents": 0, "reservations": 0}  # nothing twice
    assert budget.day_totals()["used"] == 3_400
