"""Result delivery to the coordinator through an outbox in Valkey (CONTRACT section 3).

A result is stored before it is sent, with its own ``Idempotency-Key`` (the same on every retry of that result, a new
one when a resumed agent finishes again). A deliverer owns an item only while it holds the item's claim key
(``SET NX PX`` with a random token), so two beats or sweepers never send the same result at once; only the owner
completes or reschedules it, and a crashed owner's claim expires so another deliverer retries later. Failures retry
with exponential backoff until ``give_up_seconds``, then go to dead letters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis

from orchestrator import webhooks
from orchestrator.keys import RECORD_TTL_SECONDS, Keys
from orchestrator.models import queue_problem, task_name_problem
from orchestrator.redaction import redact

log = logging.getLogger(__name__)

HTTP_TIMEOUT_SECONDS = 10.0
USER_AGENT = "agent-fleet-orchestrator"
SendTask = Callable[..., Any]
Update = Callable[["redis.client.Pipeline"], None]


class Undeliverable(Exception):
    """A callback that can never be delivered (an invalid target): it goes to dead letters at once."""


def idempotency_key(agent_id: str, result: dict[str, Any]) -> str:
    """The key of one result: ``<agent_id>:<hash of the result>``, so the same result put twice keeps its key and a
    resumed agent's new result (new ``finished_at``) gets a new one."""
    canonical = json.dumps(result, sort_keys=True, separators=(",", ":"), default=str)
    return f"{agent_id}:{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


class Outbox:
    """Pending callback deliveries, scored by when they are next due."""

    def __init__(self, r: redis.Redis, keys: Keys, secret: str | None, retry_base: float = 5.0,
                 retry_max: float = 600.0, give_up_seconds: float = 6 * 3600, *, allowed_hosts: str | None = None,
                 timeout: float = HTTP_TIMEOUT_SECONDS, claim_seconds: float | None = None) -> None:
        self.r = r
        self.keys = keys
        self.secret = secret
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.give_up_seconds = give_up_seconds
        self.allowed_hosts = allowed_hosts  # None: ORCHESTRATOR_WEBHOOK_ALLOWED_HOSTS of this process's settings
        self.timeout = timeout
        self.claim_seconds = claim_seconds if claim_seconds is not None else max(60.0, 4 * timeout)

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failures (exponential, capped)."""
        return float(min(self.retry_max, self.retry_base * 2 ** max(0, attempts - 1)))

    def put(self, agent_id: str, callback: dict[str, Any], result: dict[str, Any]) -> str:
        """Store a result for delivery (replacing an older undelivered result of the same agent); its key."""
        key = idempotency_key(agent_id, result)
        current = self._load(agent_id)
        if current is not None and current.get("idempotency_key") == key:
            return key  # this very result is already waiting: keep its attempts
        item = {"agent_id": agent_id, "callback": callback, "result": result, "idempotency_key": key,
                "attempts": 0, "created": time.time(), "last_error": None}
        pipe = self.r.pipeline()
        pipe.set(self.keys.outbox_item(agent_id), json.dumps(item), ex=RECORD_TTL_SECONDS)
        pipe.zadd(self.keys.outbox, {agent_id: time.time()})
        pipe.execute()
        return key

    def pending(self) -> int:
        """Deliveries waiting."""
        return int(self.r.zcard(self.keys.outbox))

    def listing(self) -> dict[str, list[dict[str, Any]]]:
        """Pending and given-up deliveries with their attempts and last error, for an operator (URLs redacted)."""
        pending = []
        for agent_id, due in cast(list[tuple[str, float]], self.r.zrange(self.keys.outbox, 0, -1, withscores=True)):
            item = self._load(agent_id)
            if item is not None:
                pending.append({**self._public(item), "next_attempt_at": due})
        return {"pending": pending, "dead": [self._public(i) for i in self.dead()]}

    @staticmethod
    def _public(item: dict[str, Any]) -> dict[str, Any]:
        callback = dict(item["callback"])
        if callback.get("url"):
            callback["url"] = redact(str(callback["url"]))
        return {"agent_id": item["agent_id"], "callback": callback, "attempts": item["attempts"],
                "last_error": item["last_error"], "idempotency_key": item.get("idempotency_key")}

    def dead(self) -> list[dict[str, Any]]:
        """Deliveries given up on, for an operator."""
        ids = cast(list[str], self.r.zrange(self.keys.dead_letters, 0, -1))
        items = [self._load(i) for i in ids]
        return [i for i in items if i is not None]

    def deliver_due(self, send_task: SendTask, limit: int = 100) -> dict[str, int]:
        """Try every delivery that is due; each is claimed first, so no other deliverer sends it meanwhile."""
        sent = failed = 0
        for agent_id in cast(list[str], self.r.zrangebyscore(self.keys.outbox, "-inf", time.time(), 0, limit)):
            token = self._claim(agent_id, due_only=True)
            if token is None:
                continue  # another deliverer owns it, or it was delivered or rescheduled meanwhile
            if self._deliver_claimed(agent_id, token, send_task):
                sent += 1
            else:
                failed += 1
        return {"sent": sent, "failed": failed, "pending": self.pending()}

    def deliver(self, agent_id: str, send_task: SendTask) -> bool:
        """One delivery attempt now, due or not; False when it failed (rescheduled) or another deliverer owns it."""
        if self._load(agent_id) is None:
            self.r.zrem(self.keys.outbox, agent_id)
            return True
        token = self._claim(agent_id, due_only=False)
        return token is not None and self._deliver_claimed(agent_id, token, send_task)

    # -- ownership -----------------------------------------------------------------------------------
    def _claim(self, agent_id: str, due_only: bool) -> str | None:
        """Own an item for ``claim_seconds``: a random token in its claim key, or None if someone else holds it."""
        token = uuid.uuid4().hex
        if not self.r.set(self.keys.outbox_claim(agent_id), token, nx=True, px=int(self.claim_seconds * 1000)):
            return None
        now = time.time()
        due = self.r.zscore(self.keys.outbox, agent_id)
        if due is None or (due_only and due > now):
            self._settle(agent_id, token, None, lambda pipe: None)  # just release the claim
            return None
        # Not due again until the claim has expired: a crashed owner's item is retried after its lease.
        self.r.zadd(self.keys.outbox, {agent_id: now + self.claim_seconds}, xx=True)
        return token

    def _settle(self, agent_id: str, token: str, key: str | None, update: Update) -> bool:
        """Apply ``update`` and release the claim, atomically, if this deliverer still owns the item and the item
        is still the result it delivered (``key``); release only, when a newer result was put meanwhile."""
        claim, item_key = self.keys.outbox_claim(agent_id), self.keys.outbox_item(agent_id)
        with self.r.pipeline() as pipe:
            for _ in range(10):
                try:
                    pipe.watch(claim, item_key)  # type: ignore[no-untyped-call]
                    if pipe.get(claim) not in (token, None):  # None: our claim expired and nobody took it
                        pipe.unwatch()
                        return False
                    raw = pipe.get(item_key)
                    current = json.loads(cast(str, raw)) if raw else None
                    pipe.multi()
                    if current is None:
                        pipe.zrem(self.keys.outbox, agent_id)
                    elif key is not None and current.get("idempotency_key", key) == key:
                        update(pipe)
                    pipe.delete(claim)
                    pipe.execute()
                    return current is None or key is None or current.get("idempotency_key", key) == key
                except redis.WatchError:
                    continue
        return False

    # -- one attempt ---------------------------------------------------------------------------------
    def _deliver_claimed(self, agent_id: str, token: str, send_task: SendTask) -> bool:
        item = self._load(agent_id)
        if item is None:
            self._settle(agent_id, token, None, lambda pipe: None)
            return True
        key = str(item.get("idempotency_key") or idempotency_key(agent_id, item["result"]))
        item["idempotency_key"] = key
        try:
            self._send(item, send_task)
        except Exception as exc:
            self._failed(agent_id, token, item, exc)
            return False
        stats = self.keys.outbox_stats

        def done(pipe: redis.client.Pipeline) -> None:
            pipe.zrem(self.keys.outbox, agent_id)
            pipe.delete(self.keys.outbox_item(agent_id))
            pipe.hincrby(stats, "delivered", 1)

        self._settle(agent_id, token, key, done)
        log.info("callback for agent %s delivered after %d failed attempt(s)", agent_id, item["attempts"])
        return True

    def _failed(self, agent_id: str, token: str, item: dict[str, Any], exc: Exception) -> None:
        item["attempts"] += 1
        item["last_error"] = redact(str(exc) or type(exc).__name__)[:500]
        give_up = isinstance(exc, Undeliverable) or time.time() - item["created"] > self.give_up_seconds

        def reschedule(pipe: redis.client.Pipeline) -> None:
            pipe.set(self.keys.outbox_item(agent_id), json.dumps(item), ex=RECORD_TTL_SECONDS)
            if give_up:
                pipe.zrem(self.keys.outbox, agent_id)
                pipe.zadd(self.keys.dead_letters, {agent_id: time.time()})
            else:
                pipe.zadd(self.keys.outbox, {agent_id: time.time() + self.backoff(item["attempts"])})

        self.r.hincrby(self.keys.outbox_stats, "failed_attempts", 1)
        self._settle(agent_id, token, item["idempotency_key"], reschedule)
        if give_up:
            log.error("callback for agent %s given up after %d attempts: %s", agent_id, item["attempts"],
                      item["last_error"])
        else:
            log.warning("callback for agent %s failed (attempt %d): %s", agent_id, item["attempts"],
                        item["last_error"])

    def _send(self, item: dict[str, Any], send_task: SendTask) -> None:
        callback, key = item["callback"], str(item["idempotency_key"])
        body_doc = {**item["result"], "idempotency_key": key}
        if callback.get("url"):
            body = json.dumps(body_doc).encode()
            headers = {"Content-Type": "application/json", webhooks.EVENT_HEADER: "agent.finished",
                       webhooks.IDEMPOTENCY_HEADER: key, "User-Agent": USER_AGENT}
            if self.secret:
                headers[webhooks.SIGNATURE_HEADER] = webhooks.sign(self.secret, body)
            webhooks.deliver(str(callback["url"]), body, headers, allowed_hosts=self._allowed_hosts(),
                             timeout=self.timeout)
            return
        task, queue = str(callback.get("task")), str(callback.get("queue"))
        problem = task_name_problem(task) or queue_problem(queue, self.keys.prefix)
        if problem:
            raise Undeliverable(f"callback {task!r} on {queue!r} refused: {problem}")
        send_task(task, kwargs={"result": body_doc}, queue=queue)

    def _allowed_hosts(self) -> str:
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        from orchestrator.settings import get_settings

        return get_settings().webhook_allowed_hosts

    def _load(self, agent_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.keys.outbox_item(agent_id))
        return cast(dict[str, Any], json.loads(cast(str, raw))) if raw else None
