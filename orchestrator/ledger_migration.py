"""Fold ledger keys of the first layout (one counter per field, reservation data in a hash) into the compact one.

Workers run it when they start (``workers/signals.py``), so an upgrade keeps the day's spend, every agent's usage
and the open reservations. It is idempotent (old keys are deleted as they are folded) and safe to run from
several workers at once (each fold is one script). The upgrade step: stop every worker of the old version, then
start the new ones (an old and a new worker running side by side would count in different keys).
"""

from __future__ import annotations

import logging
import re
from typing import cast

import redis

from orchestrator import scripts
from orchestrator.keys import Keys

log = logging.getLogger(__name__)

DAY_KEY_TTL_SECONDS = 3 * 24 * 3600
_OLD_DAY = re.compile(r"budget:day:([^:]+):(used|reserved|cost_micro)$")
_OLD_AGENT = re.compile(r"budget:agent:([^:]+):(used|reserved)$")


def legacy_reservation_data(keys: Keys) -> str:
    """The first layout's hash of reservation id -> "amount|day|agent"."""
    return f"{keys.prefix}budget:reservation-data"


def migrate_legacy_ledger(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """Fold every old ledger key into the new layout; how many days, agents and reservations were folded."""
    fold = scripts.load(r, "ledger_migrate")
    rewrite = scripts.load(r, "reservation_migrate")
    days: set[str] = set()
    agents: set[str] = set()
    for raw in r.scan_iter(match=f"{keys.prefix}budget:*", count=1000):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        rest = name[len(keys.prefix):]
        if m := _OLD_DAY.match(rest):
            days.add(m.group(1))
        elif m := _OLD_AGENT.match(rest):
            agents.add(m.group(1))
    p = keys.prefix
    for day in days:
        fold(keys=[keys.day_ledger(day), f"{p}budget:day:{day}:used", f"{p}budget:day:{day}:reserved",
                   f"{p}budget:day:{day}:cost_micro"], args=[3, DAY_KEY_TTL_SECONDS])
    for agent in agents:
        fold(keys=[keys.agent_ledger(agent), f"{p}budget:agent:{agent}:used", f"{p}budget:agent:{agent}:reserved"],
             args=[2, 0])
    moved = 0
    data_key = legacy_reservation_data(keys)
    for member in cast(list[str], r.zrange(keys.reservations, 0, -1)):
        text = member.decode() if isinstance(member, bytes) else str(member)
        if "|" not in text:
            moved += int(rewrite(keys=[keys.reservations, data_key], args=[text]))
    leftover = r.hlen(data_key)
    if leftover:  # data of reservations no longer in the zset: released long ago
        r.delete(data_key)
    done = {"days": len(days), "agents": len(agents), "reservations": moved}
    if any(done.values()):
        log.warning("ledger: folded the first layout's keys into the compact ledger: %s", done)
    return done
