"""The handles a process needs to run or operate agents, built once per process from settings.

Nothing here imports the agent stack: the operator's commands build a ``Fleet`` too, and must start fast. The
SDK client and the workspace are created on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import redis

from orchestrator.budget import Budget
from orchestrator.keys import Keys
from orchestrator.lifecycle import AdmitParams, Lifecycle
from orchestrator.store import AgentStore, connect

if TYPE_CHECKING:
    import anthropic

    from orchestrator.settings import Settings
    from orchestrator.workspace import Workspace

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]


@lru_cache(maxsize=1)
def default_anthropic() -> anthropic.Anthropic:
    """The process's SDK client (one connection pool, reused by every run in the process).

    It reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL itself; retries are off because our loop is the retry layer.
    """
    import anthropic

    return anthropic.Anthropic(max_retries=0)


def _no_enqueue(agent_id: str) -> None:
    raise RuntimeError(f"no enqueue function configured (agent {agent_id})")


@dataclass
class Fleet:
    """Settings, Valkey handles, the lifecycle and the workspace, shared by every run in a process."""

    settings: Settings
    r: redis.Redis
    keys: Keys
    store: AgentStore
    budget: Budget
    lifecycle: Lifecycle
    enqueue: Enqueue = _no_enqueue
    anthropic_factory: Callable[[], Any] = field(default=default_anthropic)

    @classmethod
    def create(cls, settings: Settings | None = None, r: redis.Redis | None = None,
               enqueue: Enqueue | None = None) -> Fleet:
        """A fleet on the configured Valkey (or the given client)."""
        if settings is None:
            from orchestrator.settings import get_settings

            settings = get_settings()
        s = settings
        client = r if r is not None else connect(s)
        keys = Keys(s.key_prefix)
        params = AdmitParams(lease_seconds=s.heartbeat_timeout_seconds, slot_lease_seconds=s.slot_lease_seconds,
                             slot_limit=s.max_concurrent_agents, hard=s.budget_enforcement == "hard",
                             max_recoveries=s.max_recoveries)
        return cls(settings=s, r=client, keys=keys, store=AgentStore(client, keys), budget=Budget(client, s),
                   lifecycle=Lifecycle(client, keys, params), enqueue=enqueue or _no_enqueue)

    @cached_property
    def workspace(self) -> Workspace:
        """Mirrors and worktrees of this host (created on first use)."""
        from orchestrator.workspace import Workspace

        s = self.settings
        return Workspace(s.workspace_dir, credentials_file=s.git_credentials_file, git_timeout=s.git_timeout_seconds)

    def dispatch(self, agent_id: str, score: float) -> bool:
        """Send the run message of an agent the lifecycle put in dispatch.

        If the broker refuses, the entry stays and the health sweep sends it later: the agent is never lost.
        """
        try:
            self.enqueue(agent_id)
        except Exception as exc:
            log.warning("could not send the run message of agent %s (the sweep retries): %s", agent_id, exc)
            return False
        try:
            self.lifecycle.dispatched(agent_id, score)
        except redis.RedisError as exc:  # the entry stays: at worst the sweep sends a harmless second message
            log.warning("agent %s: message sent, dispatch entry kept: %s", agent_id, exc)
        return True

    def wake(self) -> int:
        """Send waiting agents to the queue for the free slots (highest priority first); returns how many."""
        woken = self.lifecycle.wake()
        for agent_id, score in woken:
            self.dispatch(agent_id, score)
        return len(woken)
