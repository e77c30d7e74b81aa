"""One agent's lifecycle: every state change is one fenced Lua script, and nothing else writes an agent's state.

The transition table (``TRANSITIONS``)::

    create      -              -> queued        (+ dispatch)
    admit       queued | recovering | held -> running   (lease, fence, slot, heartbeat, deadline)
                                       | held          (killswitch engaged)
                                       | queued        (waiting for a slot)
    save/beat   running        -> running       (fenced progress, heartbeat, lease renewal)
    hand_back   running        -> recovering    (warm shutdown; + dispatch; not a recovery)
    recover     running        -> recovering    (sweep: heartbeat stale and lease gone; counted; fenced out)
    finish      live           -> final         (result, indexes cleared, TTLs, outbox)
    resume      final | held   -> queued        (operator; fresh duration window; + dispatch)
    release     held           -> queued        (killswitch release --resume; + dispatch)

Each script updates the record, every index set that mirrors it (active, heartbeats, deadlines, slots, waiting,
held, dispatch) and the TTLs together. The **dispatch** index is the lifecycle's outbox for broker messages: a
verb that needs a run message (create, hand_back, recover, resume, release, wake) adds the agent there in the
same step, the caller sends the message and then drops the entry; whatever a dead sender or a refusing broker
leaves behind is sent again by the health sweep. So no agent is ever stranded ``queued`` without a message.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis

from orchestrator import scripts
from orchestrator.errors import StaleFence
from orchestrator.keys import RECORD_TTL_SECONDS, Keys
from orchestrator.replication import replicated
from orchestrator.states import LIVE_STATES, RESUMABLE_STATES, State

#: Seconds a dispatch entry waits for its sender before the sweep sends the message itself.
DISPATCH_GRACE_SECONDS = 30.0
#: Seconds between two sweep attempts to send an overdue message (the broker refused the last one).
DISPATCH_RETRY_SECONDS = 10.0

#: Which verb may move an agent from which state to which (documentation, and the property tests' oracle).
TRANSITIONS: dict[str, tuple[frozenset[State], frozenset[State]]] = {
    "admit": (frozenset({State.QUEUED, State.RECOVERING, State.HELD}),
              frozenset({State.RUNNING, State.HELD, State.QUEUED})),
    "save": (frozenset({State.RUNNING}), frozenset({State.RUNNING})),
    "hand_back": (frozenset({State.RUNNING}), frozenset({State.RECOVERING})),
    "recover": (frozenset({State.RUNNING}), frozenset({State.RECOVERING})),
    "finish": (LIVE_STATES, frozenset(s for s in State if s.final)),
    "resume": (frozenset(RESUMABLE_STATES), frozenset({State.QUEUED})),
    "release": (frozenset({State.HELD}), frozenset({State.QUEUED})),
}


def now_iso() -> str:
    """The current time as ISO 8601 (UTC)."""
    return datetime.now(UTC).isoformat()


def _js(value: Any) -> str:
    return json.dumps(value)


def _pairs(fields: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += [name, _js(value)]
    return out


def event_json(kind: str, message: str) -> str:
    """One event as stored in an agent's event list."""
    return _js({"at": now_iso(), "kind": kind, "message": message})


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Admission:
    """What ``admit`` decided for one delivery of an agent's run message."""

    outcome: str  # started | held | waiting | busy | final | stop | give_up | unknown
    fence: str = ""  # the run's fencing token, opaque: "<n>:<server time>"
    window_start: float = 0.0
    over_limit: bool = False


@dataclass(frozen=True)
class BeatReply:
    """A heartbeat's answer: whether the run still owns the agent, and the stops persisted in Valkey."""

    owned: bool
    killswitch_reason: str | None
    stop_request: str | None


@dataclass(frozen=True)
class AdmitParams:
    """The fleet's settings that admission needs."""

    lease_seconds: float
    slot_lease_seconds: float
    slot_limit: int
    hard: bool
    max_recoveries: int


def waiting_score(priority: int, now: float | None = None) -> float:
    """Score of the waiting and held indexes: higher priority first, then oldest first."""
    return -priority * 1e10 + (now if now is not None else time.time())


class Lifecycle:
    """The verbs of an agent's lifecycle, over one Valkey client."""

    def __init__(self, r: redis.Redis, keys: Keys, params: AdmitParams,
                 clock: Callable[[], float] = time.time) -> None:
        self.r = r
        self.keys = keys
        self.params = params
        self.clock = clock
        self._s = {name: scripts.load(r, name) for name in (
            "create", "forget_task", "admit", "beat", "save", "hand_back", "finish", "recover", "resume",
            "release_held", "wake", "dispatch_claim", "dispatched")}

    # -- keys -------------------------------------------------------------------------------------------
    def _expiring(self, agent_id: str, task_id: str | None) -> list[str]:
        """Per-agent keys (besides record, fence and events) that live exactly as long as the record."""
        k = self.keys
        out = [k.checkpoint(agent_id), k.agent_ledger(agent_id),
               k.agent_exhausted(agent_id), k.snapshot(agent_id)]
        if task_id:
            out.append(k.task_index(task_id))
        return out

    # -- create -----------------------------------------------------------------------------------------
    def create(self, record: dict[str, Any], task_id: str) -> tuple[str, bool, float]:
        """Register a queued agent for ``task_id``: (agent_id, created, dispatch score). An existing agent wins.

        A task index whose record is gone (expired, deleted) is dropped and the task_id registered afresh.
        """
        k = self.keys
        for _ in range(3):
            agent_id = uuid.uuid4().hex[:16]
            now = self.clock()
            rec = dict(record, agent_id=agent_id, branch=record.get("branch") or f"agent/{agent_id}")
            score = now + DISPATCH_GRACE_SECONDS
            ok, found = cast(list[Any], self._s["create"](
                keys=[k.task_index(task_id), k.agent(agent_id), k.agents_all, k.agents_active, k.dispatch],
                args=[agent_id, now, repr(score), *_pairs(rec)]))
            if int(ok):
                return agent_id, True, score
            existing = _str(found)
            if self.r.exists(k.agent(existing)):
                return existing, False, 0.0
            self._s["forget_task"](keys=[k.task_index(task_id)], args=[existing])
        raise RuntimeError(f"could not register task_id {task_id!r}")

    # -- admit ------------------------------------------------------------------------------------------
    def admit(self, agent_id: str, holder: str, worker: str, *, priority: int, duration_seconds: float) -> Admission:
        """Decide what this delivery may do, and if it may run, make the agent ``running`` (see admit.lua)."""
        k, p = self.keys, self.params
        now = self.clock()
        out = cast(list[Any], self._s["admit"](
            keys=[k.agent(agent_id), k.lease(agent_id), k.fence(agent_id), k.killswitch, k.stop_request(agent_id),
                  k.slots, k.waiting, k.held, k.dispatch, k.heartbeats, k.deadlines],
            args=[agent_id, holder, int(p.lease_seconds * 1000), repr(now), now + p.slot_lease_seconds,
                  p.slot_limit, "0" if p.hard else "1", duration_seconds, _js(worker), _js(now_iso()),
                  p.max_recoveries, waiting_score(priority, now), repr(now + DISPATCH_GRACE_SECONDS)]))
        replicated(self.r, "admission (lease and fencing token)")
        token = _str(out[1])
        return Admission(_str(out[0]), "" if token == "0" else token, float(_str(out[2])), bool(int(out[3])))

    # -- a run's own writes -----------------------------------------------------------------------------
    def beat(self, agent_id: str, holder: str, fence: str, *, reservation_id: str | None = None,
             reservation_lease_seconds: float = 600, **fields: Any) -> BeatReply:
        """Heartbeat: renew lease, heartbeat, slot and reservation; write ``fields``; read the persisted stops."""
        k, p = self.keys, self.params
        now = self.clock()
        ok, engaged, reason, stop = cast(list[Any], self._s["beat"](
            keys=[k.agent(agent_id), k.lease(agent_id), k.fence(agent_id), k.heartbeats, k.slots, k.killswitch,
                  k.stop_request(agent_id), k.reservations],
            args=[fence, holder, int(p.lease_seconds * 1000), now, now + p.slot_lease_seconds, agent_id,
                  reservation_id or "", now + reservation_lease_seconds, *_pairs(fields)]))
        return BeatReply(bool(int(ok)), (_str(reason) or "killswitch engaged") if _str(engaged) == "1" else None,
                         _str(stop) or None)

    def save(self, agent_id: str, fence: str | None, checkpoint: Mapping[str, Any] | None = None, *,
             snapshot: str | None = None, **fields: Any) -> None:
        """Write progress (the checkpoint, the worktree snapshot) while ``fence`` is the newest token, in one step;
        StaleFence otherwise."""
        k = self.keys
        ok = self._s["save"](keys=[k.agent(agent_id), k.fence(agent_id), k.checkpoint(agent_id), k.snapshot(agent_id)],
                             args=["" if fence is None else fence, _js(checkpoint) if checkpoint is not None else "",
                                   snapshot or "", *_pairs(fields)])
        if not int(cast(int, ok)):
            raise StaleFence(f"agent {agent_id}: fencing token {fence} is stale")

    def hand_back(self, agent_id: str, holder: str, fence: str, reason: str) -> float:
        """running -> recovering (warm shutdown); returns the dispatch score to clear once the message is sent."""
        k = self.keys
        score = self._dispatch_score()
        ok = self._s["hand_back"](
            keys=[k.agent(agent_id), k.lease(agent_id), k.fence(agent_id), k.heartbeats, k.deadlines, k.slots,
                  k.dispatch, k.events(agent_id)],
            args=[fence, holder, agent_id, repr(score), event_json("recovering", reason)])
        if not int(cast(int, ok)):
            raise StaleFence(f"agent {agent_id}: fencing token {fence} is stale")
        return score

    def finish(self, agent_id: str, task_id: str | None, status: State, fields: Mapping[str, Any], *,
               fence: str | None = None, outbox: tuple[str, str, str] | None = None,
               event: str | None = None) -> int:
        """A live agent -> ``status`` with ``fields`` (result etc.), atomically (see finish.lua).

        ``outbox`` is (member, item key, item JSON) of a callback to deliver. Without ``fence`` the agent must
        not be owned by a run. Returns 1 finished, 2 already final, -1 a run owns it; StaleFence if outrun.
        """
        k = self.keys
        member, item_key, item = outbox if outbox is not None else ("", k.outbox_item(agent_id), "")
        done = int(cast(int, self._s["finish"](
            keys=[k.agent(agent_id), k.lease(agent_id), k.fence(agent_id), k.agents_active, k.heartbeats,
                  k.deadlines, k.slots, k.waiting, k.held, k.dispatch, k.stop_request(agent_id), k.stats, k.outbox,
                  item_key, k.events(agent_id), *self._expiring(agent_id, task_id)],
            args=["" if fence is None else fence, agent_id, RECORD_TTL_SECONDS, status.value, item, self.clock(),
                  member, event_json(status.value, event or f"finished: {status.value}"),
                  *_pairs(dict(fields, state=status.value))])))
        replicated(self.r, "finish")
        if done == 0:
            raise StaleFence(f"agent {agent_id}: fencing token {fence} is stale")
        return done

    # -- the sweep's verbs ------------------------------------------------------------------------------
    def recover(self, agent_id: str, stale_before: float, reason: str) -> tuple[int, int, float]:
        """running -> recovering when presumed dead.

        Returns (1, recoveries, dispatch score), (0, 0, 0) when there is nothing to do, (-1, lease ms left, 0).
        """
        k = self.keys
        score = self._dispatch_score()
        out = cast(list[Any], self._s["recover"](
            keys=[k.agent(agent_id), k.lease(agent_id), k.fence(agent_id), k.heartbeats, k.deadlines, k.slots,
                  k.dispatch, k.events(agent_id), k.stats],
            args=[agent_id, repr(stale_before), repr(score), event_json("recovering", reason)]))
        done = int(out[0])
        return done, int(out[1]) if len(out) > 1 else 0, score if done == 1 else 0.0

    def wake(self) -> list[tuple[str, float]]:
        """Waiting agents for the free slots, moved to dispatch (highest priority first): (agent_id, score)."""
        now = self.clock()
        score = now + DISPATCH_GRACE_SECONDS
        ids = self._s["wake"](keys=[self.keys.slots, self.keys.waiting, self.keys.dispatch],
                              args=[now, self.params.slot_limit, repr(score)])
        return [(_str(i), score) for i in cast(list[Any], ids)]

    def claim_dispatch(self, limit: int = 500) -> list[tuple[str, float]]:
        """Overdue dispatch entries, claimed exclusively until the next retry: (agent_id, score to clear)."""
        now = self.clock()
        retry = now + DISPATCH_RETRY_SECONDS
        ids = self._s["dispatch_claim"](keys=[self.keys.dispatch], args=[repr(now), repr(retry), limit])
        return [(_str(i), retry) for i in cast(list[Any], ids)]

    def dispatched(self, agent_id: str, score: float) -> None:
        """The run message for ``score`` was sent: drop the entry unless a newer one replaced it."""
        self._s["dispatched"](keys=[self.keys.dispatch], args=[agent_id, repr(score)])

    # -- the operator's verbs ---------------------------------------------------------------------------
    def resume(self, agent_id: str, task_id: str | None, by: str) -> tuple[bool, str, float]:
        """final | held -> queued with a fresh duration window: (resumed, previous state, dispatch score)."""
        k = self.keys
        score = self._dispatch_score()
        ok, state = cast(list[Any], self._s["resume"](
            keys=[k.agent(agent_id), k.agents_active, k.held, k.dispatch, k.stop_request(agent_id),
                  k.lease(agent_id), k.events(agent_id), k.fence(agent_id), *self._expiring(agent_id, task_id)],
            args=[agent_id, repr(score), event_json("resumed", f"resumed by {by}"),
                  *[_js(s.value) for s in RESUMABLE_STATES]]))
        previous = _str(state)
        with contextlib.suppress(ValueError):
            previous = str(json.loads(previous))
        return bool(int(ok)), previous, score

    def release_held(self, agent_id: str) -> float | None:
        """held -> queued (killswitch released with --resume), put in dispatch; the score, or None if not held."""
        k = self.keys
        score = self._dispatch_score()
        ok = self._s["release_held"](keys=[k.agent(agent_id), k.held, k.dispatch], args=[agent_id, repr(score)])
        return score if int(cast(int, ok)) else None

    def _dispatch_score(self) -> float:
        return self.clock() + DISPATCH_GRACE_SECONDS
