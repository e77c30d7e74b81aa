"""The dependencies a worker process needs to run agents, built once per process from settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import anthropic
import redis

from orchestrator.budget import Budget
from orchestrator.keys import Keys
from orchestrator.lease import Leases
from orchestrator.settings import Settings, get_settings
from orchestrator.store import AgentStore, connect
from orchestrator.workspace import Workspace

Enqueue = Callable[[str], None]


@lru_cache(maxsize=1)
def default_anthropic() -> anthropic.Anthropic:
    """The process's SDK client (one connection pool, reused by every run in the process).

    It reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL itself; retries are off because our loop is the retry layer.
    """
    return anthropic.Anthropic(max_retries=0)


def _no_enqueue(agent_id: str) -> None:
    raise RuntimeError(f"no enqueue function configured (agent {agent_id})")


@dataclass
class Fleet:
    """Settings, Valkey handles and the workspace, shared by every run in a process."""

    settings: Settings
    r: redis.Redis
    keys: Keys
    store: AgentStore
    budget: Budget
    leases: Leases
    workspace: Workspace
    enqueue: Enqueue = _no_enqueue
    anthropic_factory: Callable[[], anthropic.Anthropic] = field(default=default_anthropic)

    @classmethod
    def create(cls, settings: Settings | None = None, r: redis.Redis | None = None,
               enqueue: Enqueue | None = None) -> Fleet:
        """A fleet on the configured Valkey (or the given client)."""
        s = settings or get_settings()
        client = r if r is not None else connect(s)
        keys = Keys(s.key_prefix)
        return cls(
            settings=s, r=client, keys=keys, store=AgentStore(client, keys), budget=Budget(client, s),
            leases=Leases(client, keys), workspace=Workspace(s.workspace_dir),
            enqueue=enqueue or _no_enqueue,
        )
