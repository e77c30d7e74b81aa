"""Cost from the price table (unknown models flagged, never $0) and the idempotent midnight rollup."""

from __future__ import annotations

import json
from pathlib import Path

import fakeredis

from orchestrator.fleet import Fleet
from orchestrator.models import Usage
from orchestrator.ops import budget_rollup
from orchestrator.pricing import FALLBACK, PRICES, cost_micro_usd, price_for
from orchestrator.settings import Settings
from tests.test_budget_unit import at


def test_known_models_and_dated_ids_are_priced() -> None:
    assert price_for("claude-sonnet-5-5") == (PRICES["claude-sonnet-5-5"], True)
    assert price_for("claude-haiku-4-5-20251001") == (PRICES["claude-haiku-4-5"], True)
    # 1M input + 1M output of Sonnet: $3 + $15; cache write is 1.25x input, cache read 0.1x.
    assert cost_micro_usd("claude-sonnet-5-5", 1_000_000, 1_000_000, 0, 0) == 18_000_000
    assert cost_micro_usd("claude-sonnet-5-5", 0, 0, 1_000_000, 1_000_000) == 3_750_000 + 300_000


def test_unknown_model_is_flagged_and_priced_at_the_fallback() -> None:
    price, known = price_for("claude-imaginary-9")
    assert not known and price == FALLBACK
    assert cost_micro_usd("claude-imaginary-9", 1000, 1000, 0, 0) > 0


def test_midnight_rollup_archives_yesterday_once(tmp_path: Path) -> None:
    tz = "Europe/Berlin"
    settings = Settings(_env_file=None, timezone=tz, workspace_dir=tmp_path)  # type: ignore[call-arg]
    fleet = Fleet.create(settings, r=fakeredis.FakeRedis(decode_responses=True))
    clock = [at(tz, "2026-11-22T18:00:00")]
    fleet.budget.clock = lambda: clock[0]
    res = fleet.budget.reserve("a1", 10**6, 100, 100)
    assert res is not None
    fleet.budget.settle(res, Usage(total_tokens=150), 42)
    first = budget_rollup(fleet, now=at(tz, "2026-11-23T00:00:05"))
    assert first == {"day": "2026-11-22", "archived": True}
    archived = json.loads(fleet.r.get(fleet.keys.day_archive("2026-11-22")) or "{}")
    assert archived["daily"]["used"] == 150 and archived["date"] == "2026-11-22"
    assert fleet.r.ttl(fleet.keys.day_archive("2026-11-22")) >= 30 * 24 * 3600
    second = budget_rollup(fleet, now=at(tz, "2026-11-23T00:00:09"))  # a second beat: nothing changes
    assert second == {"day": "2026-11-22", "archived": False}
    assert json.loads(fleet.r.get(fleet.keys.day_archive("2026-11-22")) or "{}") == archived
