"""Every Valkey key and TTL of the fleet's own state, in one place.

All keys start with the settings' ``key_prefix`` (``orch:``), so they never collide with Celery's own keys
(queue lists such as ``agents``, ``unacked``, ``_kombu.*``, ``celery-task-meta-*``) in the same database.
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_TTL_SECONDS = 30 * 24 * 3600  # finished agent records and checkpoints are kept for 30 days
REJECTED_KEEP = 10_000  # rejected specs kept for inspection
DAY_ARCHIVE_TTL_SECONDS = 40 * 24 * 3600  # daily summaries are kept for at least 30 days


@dataclass(frozen=True)
class Keys:
    """Key builder bound to one prefix."""

    prefix: str = "orch:"

    def agent(self, agent_id: str) -> str:
        """Hash: one agent's record (fields JSON-encoded)."""
        return f"{self.prefix}agent:{agent_id}"

    def events(self, agent_id: str) -> str:
        """List: the agent's user-visible events (JSON), oldest first."""
        return f"{self.prefix}agent:{agent_id}:events"

    def snapshot(self, agent_id: str) -> str:
        """String: the agent's worktree at its last checkpoint (commits and uncommitted files), for any host."""
        return f"{self.prefix}snapshot:{agent_id}"

    def rate_limit(self, model: str) -> str:
        """Hash: the fleet-wide pause of one model after a 429 (until, reason, probe holder) and its latest
        rate-limit headers."""
        return f"{self.prefix}ratelimit:{model}"

    def rate_limit_probe(self, model: str) -> str:
        """String: the one agent allowed to probe a paused model (SET NX PX)."""
        return f"{self.prefix}ratelimit:{model}:probe"

    @property
    def dispatch(self) -> str:
        """Sorted set: agents that need a run message sent, scored by when the sweep should send it."""
        return f"{self.prefix}dispatch"

    @property
    def sweep_state(self) -> str:
        """Hash: the health sweep's memory (last run, since when Valkey is seen up)."""
        return f"{self.prefix}sweep"

    def checkpoint(self, agent_id: str) -> str:
        """String: the agent's transcript, turns and usage after its last completed turn."""
        return f"{self.prefix}checkpoint:{agent_id}"

    def task_index(self, task_id: str) -> str:
        """String: coordinator task_id -> agent_id (the idempotency key)."""
        return f"{self.prefix}task:{task_id}"

    @property
    def agents_all(self) -> str:
        """Sorted set: every agent id, scored by creation time."""
        return f"{self.prefix}agents:all"

    @property
    def agents_active(self) -> str:
        """Set: agents not yet in a final state."""
        return f"{self.prefix}agents:active"

    @property
    def rejected(self) -> str:
        """List: rejected specs (JSON), newest first."""
        return f"{self.prefix}rejected"

    def lease(self, agent_id: str) -> str:
        """String: the holder (worker + fencing token) of an agent's run lease."""
        return f"{self.prefix}lease:{agent_id}"

    def fence(self, agent_id: str) -> str:
        """Counter: the agent's latest fencing token."""
        return f"{self.prefix}fence:{agent_id}"

    @property
    def heartbeats(self) -> str:
        """Sorted set: running agent id scored by its last heartbeat (epoch seconds)."""
        return f"{self.prefix}heartbeats"

    @property
    def deadlines(self) -> str:
        """Sorted set: running agent id scored by the end of its duration limit (epoch seconds)."""
        return f"{self.prefix}deadlines"

    def day_ledger(self, day: str) -> str:
        """String "used|reserved|cost_micro": a calendar day's settled tokens, open reservations and spend."""
        return f"{self.prefix}budget:day:{day}:ledger"

    def agent_ledger(self, agent_id: str) -> str:
        """String "used|reserved": one agent's settled tokens and open reservations."""
        return f"{self.prefix}budget:agent:{agent_id}:ledger"

    @property
    def reservations(self) -> str:
        """Sorted set: open token reservations, "id|amount|day|agent", scored by lease expiry."""
        return f"{self.prefix}budget:reservations"

    def day_exhausted(self, day: str) -> str:
        """Flag: a call was refused on this day because the daily limit had too little left."""
        return f"{self.prefix}budget:day:{day}:exhausted"

    def agent_exhausted(self, agent_id: str) -> str:
        """Flag: a call of this agent was refused because its own limit had too little left."""
        return f"{self.prefix}budget:agent:{agent_id}:exhausted"

    def day_agents(self, day: str) -> str:
        """Set: agents that used tokens on a day."""
        return f"{self.prefix}budget:day:{day}:agents"

    def day_archive(self, day: str) -> str:
        """String: the archived summary of a finished day."""
        return f"{self.prefix}budget:archive:{day}"

    @property
    def slots(self) -> str:
        """Sorted set: agent ids holding a concurrency slot, scored by lease expiry."""
        return f"{self.prefix}slots"

    @property
    def waiting(self) -> str:
        """Sorted set: agents waiting for a slot, scored by priority then age."""
        return f"{self.prefix}waiting"

    @property
    def killswitch(self) -> str:
        """Hash: the killswitch state (engaged, reason, at, by)."""
        return f"{self.prefix}killswitch"

    @property
    def killswitch_stops(self) -> str:
        """Sorted set: agents stopped by the current engagement, scored by seconds from engage to stopped."""
        return f"{self.prefix}killswitch:stops"

    @property
    def killswitch_audit(self) -> str:
        """List: engage/release events (JSON), newest first."""
        return f"{self.prefix}killswitch:audit"

    @property
    def held(self) -> str:
        """Sorted set: agents held while the killswitch is engaged."""
        return f"{self.prefix}held"

    @property
    def stop_channel(self) -> str:
        """Pub/sub channel: stop messages (``*`` for the whole fleet, or an agent id)."""
        return f"{self.prefix}stop"

    def stop_request(self, agent_id: str) -> str:
        """String: a persisted stop request for one agent (reason)."""
        return f"{self.prefix}stop:{agent_id}"

    @property
    def outbox(self) -> str:
        """Sorted set: callback deliveries pending, scored by next attempt time."""
        return f"{self.prefix}outbox"

    def outbox_item(self, agent_id: str) -> str:
        """Hash: one pending callback delivery."""
        return f"{self.prefix}outbox:{agent_id}"

    @property
    def stats(self) -> str:
        """Hash: fleet counters (sweep runs, recoveries, finished agents by status, gate results)."""
        return f"{self.prefix}stats"

    @property
    def outbox_stats(self) -> str:
        """Hash: delivered / failed_attempts counters of the outbox."""
        return f"{self.prefix}outbox:stats"

    @property
    def dead_letters(self) -> str:
        """Sorted set: callbacks given up on, for an operator."""
        return f"{self.prefix}outbox:dead"

    def outbox_claim(self, agent_id: str) -> str:
        """String: the token of the one deliverer that owns a pending callback for its lease (SET NX PX)."""
        return f"{self.prefix}outbox-claim:{agent_id}"
