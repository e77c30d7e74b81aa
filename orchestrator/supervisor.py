"""The watcher beside a running agent: heartbeats, lease renewal, duration limit and stop messages.

One daemon thread beats every ``heartbeat_interval_seconds`` whatever the agent is doing (a long model call or
shell command does not delay it). A second thread listens on the fleet's stop channel (Valkey pub/sub) and acts
at once; the persisted stop state is checked on every beat, so a missed message is caught within one interval.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from orchestrator.keys import Keys
from orchestrator.killswitch import parse_stop_request
from orchestrator.models import State

log = logging.getLogger(__name__)


class Supervisor:
    """Runs the heartbeat and stop-listener threads for one agent run."""

    def __init__(self, r: redis.Redis, keys: Keys, agent_id: str, *, interval: float,
                 beat: Callable[[], bool], stop: Callable[[State, str], None],
                 deadline: float | None, hard_deadline: bool, on_warning: Callable[[str], None]) -> None:
        self.r = r
        self.keys = keys
        self.agent_id = agent_id
        self.interval = interval
        self.beat = beat
        self.stop = stop
        self.deadline = deadline
        self.hard_deadline = hard_deadline
        self.on_warning = on_warning
        self._done = threading.Event()
        self._warned_deadline = False
        self._pubsub: Any = None
        self._threads: list[threading.Thread] = []

    def start(self) -> Supervisor:
        """Start both threads; the pub/sub subscription is live when this returns."""
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(self.keys.stop_channel)
        for target, name in ((self._beat_loop, "heartbeat"), (self._listen_loop, "stop-listener")):
            t = threading.Thread(target=target, name=f"{name}-{self.agent_id}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        """Stop both threads. Only the heartbeat is waited for: the listener notices within one poll (0.2 s)
        and closes its own subscription, so ending a run never waits on it."""
        self._done.set()
        self._threads[0].join(timeout=5)

    def check_persisted_stop(self) -> None:
        """Act on a stop that lives in Valkey (killswitch engaged, or a kill for this agent)."""
        pipe = self.r.pipeline()
        pipe.hget(self.keys.killswitch, "engaged")
        pipe.get(self.keys.stop_request(self.agent_id))
        engaged, own = pipe.execute()
        request = parse_stop_request(own)
        if engaged == "1":
            reason = str(self.r.hget(self.keys.killswitch, "reason") or "killswitch engaged")
            self.stop(State.KILLED, f"killswitch: {reason}")
        elif request is not None:
            self.stop(request[0], request[1])

    def _beat_loop(self) -> None:
        while not self._done.is_set():
            try:
                if not self.beat():
                    self.stop(State.FAILED, "lease lost: another worker owns this agent now")
                    return
                self.check_persisted_stop()
            except redis.RedisError as exc:
                log.warning("heartbeat for %s failed: %s", self.agent_id, exc)
            if self.deadline is not None and time.time() >= self.deadline:
                if self.hard_deadline:
                    self.stop(State.TIMED_OUT, "duration limit reached")
                elif not self._warned_deadline:
                    self._warned_deadline = True
                    self.on_warning("duration limit passed (soft mode: the agent goes on)")
            wait = self.interval
            if self.deadline is not None:
                wait = max(0.05, min(wait, self.deadline - time.time()))
            self._done.wait(wait)

    def _listen_loop(self) -> None:
        try:
            self._listen()
        finally:
            with contextlib.suppress(redis.RedisError, AttributeError):
                self._pubsub.close()

    def _listen(self) -> None:
        while not self._done.is_set():
            try:
                msg = self._pubsub.get_message(timeout=0.2)
            except (redis.RedisError, ValueError, AttributeError) as exc:
                if self._done.is_set():
                    return
                log.warning("stop listener for %s: %s; resubscribing", self.agent_id, exc)
                self._done.wait(0.5)
                try:
                    self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                    self._pubsub.subscribe(self.keys.stop_channel)
                    self.check_persisted_stop()
                except redis.RedisError:
                    pass
                continue
            if msg is None or msg.get("type") != "message":
                continue
            try:
                body = json.loads(msg["data"])
            except (TypeError, ValueError):
                continue
            target = body.get("agent")
            if target in ("*", self.agent_id):
                try:
                    status = State(body.get("status") or State.KILLED.value)
                except ValueError:
                    status = State.KILLED
                self.stop(status, str(body.get("reason") or "stopped"))
