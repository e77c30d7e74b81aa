"""Result delivery to the coordinator through an outbox in Valkey: stored before sent, retried with exponential
backoff for at least an hour, at least once, with an ``Idempotency-Key`` so repeats can be dropped."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, cast

import redis

from orchestrator.keys import RECORD_TTL_SECONDS, Keys
from orchestrator.settings import redact_url

log = logging.getLogger(__name__)

HTTP_TIMEOUT_SECONDS = 10.0
SendTask = Callable[..., Any]


def sign(body: bytes, secret: str) -> str:
    """The ``X-Orchestrator-Signature`` value of a body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Outbox:
    """Pending callback deliveries, scored by when they are next due."""

    def __init__(self, r: redis.Redis, keys: Keys, secret: str | None, retry_base: float = 5.0,
                 retry_max: float = 600.0, give_up_seconds: float = 6 * 3600) -> None:
        self.r = r
        self.keys = keys
        self.secret = secret
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.give_up_seconds = give_up_seconds

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failures (exponential, capped)."""
        return float(min(self.retry_max, self.retry_base * 2 ** max(0, attempts - 1)))

    def put(self, agent_id: str, callback: dict[str, Any], result: dict[str, Any]) -> None:
        """Store a result for delivery (replacing an older undelivered one of the same agent)."""
        item = {"agent_id": agent_id, "callback": callback, "result": result, "attempts": 0,
                "created": time.time(), "last_error": None}
        pipe = self.r.pipeline()
        pipe.set(self.keys.outbox_item(agent_id), json.dumps(item), ex=RECORD_TTL_SECONDS)
        pipe.zadd(self.keys.outbox, {agent_id: time.time()})
        pipe.execute()

    def pending(self) -> int:
        """Deliveries waiting."""
        return int(self.r.zcard(self.keys.outbox))

    def listing(self) -> dict[str, list[dict[str, Any]]]:
        """Pending and given-up deliveries with their attempts and last error, for an operator."""
        pending = []
        for agent_id, due in cast(list[tuple[str, float]], self.r.zrange(self.keys.outbox, 0, -1, withscores=True)):
            raw = self.r.get(self.keys.outbox_item(agent_id))
            if raw:
                item = json.loads(cast(str, raw))
                pending.append({"agent_id": agent_id, "callback": item["callback"], "attempts": item["attempts"],
                                "last_error": item["last_error"], "next_attempt_at": due})
        dead = [{"agent_id": i["agent_id"], "callback": i["callback"], "attempts": i["attempts"],
                 "last_error": i["last_error"]} for i in self.dead()]
        return {"pending": pending, "dead": dead}

    def dead(self) -> list[dict[str, Any]]:
        """Deliveries given up on, for an operator."""
        ids = cast(list[str], self.r.zrange(self.keys.dead_letters, 0, -1))
        items = [self.r.get(self.keys.outbox_item(i)) for i in ids]
        return [json.loads(cast(str, raw)) for raw in items if raw]

    def deliver_due(self, send_task: SendTask, limit: int = 100) -> dict[str, int]:
        """Try every delivery that is due; each is claimed first so two sweepers never send it at once."""
        now = time.time()
        sent = failed = 0
        for agent_id in cast(list[str], self.r.zrangebyscore(self.keys.outbox, "-inf", now, 0, limit)):
            # Claim: push its due time forward; only the sweeper whose update wins delivers it.
            if not self.r.zadd(self.keys.outbox, {agent_id: now + 60}, xx=True, gt=True, ch=True):
                continue
            if self.deliver(agent_id, send_task):
                sent += 1
            else:
                failed += 1
        return {"sent": sent, "failed": failed, "pending": self.pending()}

    def deliver(self, agent_id: str, send_task: SendTask) -> bool:
        """One delivery attempt; on failure it is rescheduled with backoff (or moved to dead letters)."""
        raw = self.r.get(self.keys.outbox_item(agent_id))
        if raw is None:
            self.r.zrem(self.keys.outbox, agent_id)
            return True
        item = json.loads(cast(str, raw))
        try:
            self._send(item, send_task)
        except Exception as exc:
            item["attempts"] += 1
            item["last_error"] = redact_url(str(exc))[:500]
            self.r.set(self.keys.outbox_item(agent_id), json.dumps(item), ex=RECORD_TTL_SECONDS)
            self.r.hincrby(self.keys.outbox_stats, "failed_attempts", 1)
            if time.time() - item["created"] > self.give_up_seconds:
                self.r.zrem(self.keys.outbox, agent_id)
                self.r.zadd(self.keys.dead_letters, {agent_id: time.time()})
                log.error("callback for agent %s given up after %d attempts: %s", agent_id, item["attempts"],
                          item["last_error"])
            else:
                self.r.zadd(self.keys.outbox, {agent_id: time.time() + self.backoff(item["attempts"])})
                log.warning("callback for agent %s failed (attempt %d): %s", agent_id, item["attempts"],
                            item["last_error"])
            return False
        pipe = self.r.pipeline()
        pipe.zrem(self.keys.outbox, agent_id)
        pipe.delete(self.keys.outbox_item(agent_id))
        pipe.hincrby(self.keys.outbox_stats, "delivered", 1)
        pipe.execute()
        log.info("callback for agent %s delivered after %d failed attempt(s)", agent_id, item["attempts"])
        return True

    def _send(self, item: dict[str, Any], send_task: SendTask) -> None:
        callback, result = item["callback"], item["result"]
        if callback.get("url"):
            body = json.dumps(result).encode()
            headers = {"Content-Type": "application/json", "X-Orchestrator-Event": "agent.finished",
                       "Idempotency-Key": str(item["agent_id"]), "User-Agent": "agent-fleet-orchestrator"}
            if self.secret:
                headers["X-Orchestrator-Signature"] = sign(body, self.secret)
            request = urllib.request.Request(callback["url"], data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:
                raise RuntimeError(f"webhook answered HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise RuntimeError(f"webhook unreachable: {getattr(exc, 'reason', exc)}") from None
            if not 200 <= status < 300:
                raise RuntimeError(f"webhook answered HTTP {status}")
        else:
            send_task(callback["task"], kwargs={"result": result}, queue=callback["queue"])
