"""The watcher beside a running agent: heartbeats, lease renewal, duration limit and stop messages.

One daemon thread beats every ``heartbeat_interval_seconds`` whatever the agent is doing (a long model call or
shell command does not delay it); each beat also reads the persisted stops (killswitch, a kill of this agent),
so a missed stop message is caught within one interval. A second thread listens on the fleet's stop channel
(Valkey pub/sub) and acts at once; the same channel carries the fleet's rate-limit pause and resume messages,
handed to ``on_pause``. Valkey being away does not stop the run: beats fail and are retried, and the
first beat after it returns takes the lease again (unless a sweep fenced the run out meanwhile).
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

from orchestrator.lifecycle import BeatReply
from orchestrator.states import State

log = logging.getLogger(__name__)


class Supervisor:
    """Runs the heartbeat and stop-listener threads for one agent run."""

    def __init__(self, agent_id: str, channel: str, r: redis.Redis, *, interval: float,
                 beat: Callable[[], BeatReply], stop: Callable[[State, str], None],
                 on_stop_request: Callable[[str], None], deadline: float | None, hard_deadline: bool,
                 on_warning: Callable[[str], None],
                 on_pause: Callable[[dict[str, Any]], None] = lambda body: None) -> None:
        self.agent_id = agent_id
        self.channel = channel
        self.r = r
        self.interval = interval
        self.beat = beat
        self.stop = stop
        self.on_stop_request = on_stop_request
        self.deadline = deadline
        self.hard_deadline = hard_deadline
        self.on_warning = on_warning
        self.on_pause = on_pause
        self._done = threading.Event()
        self._warned_deadline = False
        self._pubsub: Any = None
        self._threads: list[threading.Thread] = []

    def start(self) -> Supervisor:
        """Subscribe, beat once (acting on stops persisted before the run), then start both threads."""
        self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(self.channel)
        self._beat_once()
        for target, name in ((self._beat_loop, "heartbeat"), (self._listen_loop, "stop-listener")):
            t = threading.Thread(target=target, name=f"{name}-{self.agent_id}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self) -> None:
        """Stop both threads. Only the heartbeat is waited for: the listener notices within one poll (0.2 s)
        and closes its own subscription, so ending a run never waits on it."""
        self._done.set()
        if self._threads:
            self._threads[0].join(timeout=5)

    def _beat_once(self) -> bool:
        """One heartbeat and the persisted stops; False once the run lost the agent."""
        try:
            reply = self.beat()
        except redis.RedisError as exc:
            log.warning("heartbeat for %s failed (retrying): %s", self.agent_id, exc)
            return True
        if not reply.owned:
            self.stop(State.FAILED, "lease lost: another worker owns this agent now")
            return False
        if reply.killswitch_reason is not None:
            self.stop(State.KILLED, f"killswitch: {reply.killswitch_reason}")
        elif reply.stop_request:
            self.on_stop_request(reply.stop_request)
        return True

    def _beat_loop(self) -> None:
        while not self._done.wait(self._next_wait()):
            if not self._beat_once():
                return
            if self.deadline is not None and time.time() >= self.deadline:
                if self.hard_deadline:
                    self.stop(State.TIMED_OUT, "duration limit reached")
                elif not self._warned_deadline:
                    self._warned_deadline = True
                    self.on_warning("duration limit passed (soft mode: the agent goes on)")

    def _next_wait(self) -> float:
        wait = self.interval
        if self.deadline is not None and not self._warned_deadline:
            wait = max(0.05, min(wait, self.deadline - time.time()))
        return wait

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
                with contextlib.suppress(redis.RedisError):
                    self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                    self._pubsub.subscribe(self.channel)
                    self._beat_once()  # whatever was published while we were away is persisted too
                continue
            if msg is None or msg.get("type") != "message":
                continue
            try:
                body = json.loads(msg["data"])
            except (TypeError, ValueError):
                continue
            if not isinstance(body, dict):
                continue
            if "pause" in body or "resume" in body:  # a model's fleet-wide rate-limit pause (orchestrator.ratelimit)
                try:
                    self.on_pause(body)
                except Exception:
                    log.exception("pause message for %s not handled", self.agent_id)
                continue
            if body.get("agent") in ("*", self.agent_id):
                try:
                    status = State(body.get("status") or State.KILLED.value)
                except ValueError:
                    status = State.KILLED
                self.stop(status, str(body.get("reason") or "stopped"))
