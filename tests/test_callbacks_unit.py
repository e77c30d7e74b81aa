"""The callback outbox against a real valkey-server and real loopback receivers: exclusive claims (exactly one
delivery under concurrent deliverers, retry after a deliverer dies), one idempotency key per result, signed bodies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from orchestrator.callbacks import Outbox
from orchestrator.keys import Keys
from orchestrator.testing.cluster import Valkey, wait_until
from orchestrator.webhooks import verify
from tests.conftest import REPO_ROOT
from tests.test_webhooks import Receiver

SECRET = "outbox-secret"
KEYS = Keys()


def result(agent_id: str, finished_at: str = "2026-11-23T10:00:00+00:00", **extra: Any) -> dict[str, Any]:
    return {"agent_id": agent_id, "task_id": f"t-{agent_id}", "status": "completed", "turns": 3,
            "finished_at": finished_at, "metadata": {"n": 1}, **extra}


def outbox(r: redis.Redis, **kwargs: Any) -> Outbox:
    base = kwargs.pop("retry_base", 0.2)
    return Outbox(r, KEYS, SECRET, base, max(1.0, base), kwargs.pop("give_up", 3600), allowed_hosts="127.0.0.1",
                  timeout=5, **kwargs)


def no_task(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("no Celery callback expected")


@pytest.fixture
def r(valkey: Valkey) -> Iterator[redis.Redis]:
    client = valkey.client()
    yield client
    client.close()


@pytest.fixture
def slow_receiver() -> Iterator[Receiver]:
    rec = Receiver(delay=0.5)
    yield rec
    rec.stop()


def test_two_concurrent_deliverers_deliver_each_result_exactly_once(r: redis.Redis, slow_receiver: Receiver) -> None:
    box = outbox(r)
    url = f"http://127.0.0.1:{slow_receiver.port}/done"
    keys = {box.put(f"a{i}", {"url": url}, result(f"a{i}")) for i in range(6)}
    start = threading.Barrier(2)
    reports: list[dict[str, int]] = []

    def deliverer() -> None:
        start.wait()
        reports.append(outbox(r).deliver_due(no_task))

    threads = [threading.Thread(target=deliverer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    delivered = [h["idempotency-key"] for _, h, _ in slow_receiver.requests]
    assert sorted(delivered) == sorted(keys)  # every result once, none twice
    assert sum(rep["sent"] for rep in reports) == 6 and all(rep["sent"] > 0 for rep in reports)  # both worked
    assert box.pending() == 0 and r.hget(KEYS.outbox_stats, "delivered") == "6"
    assert r.keys(f"{KEYS.prefix}outbox-claim:*") == []


def test_delivered_request_is_signed_and_keyed(r: redis.Redis) -> None:
    rec = Receiver()
    try:
        box = outbox(r)
        res = result("a1")
        key = box.put("a1", {"url": f"http://127.0.0.1:{rec.port}/done"}, res)
        assert box.deliver_due(no_task)["sent"] == 1
        [(_, headers, body)] = rec.requests
        assert verify(SECRET, headers, body)
        doc = json.loads(body)
        assert headers["idempotency-key"] == doc["idempotency_key"] == key
        assert headers["x-orchestrator-event"] == "agent.finished"
        assert {k: v for k, v in doc.items() if k != "idempotency_key"} == res  # the result itself, unchanged
        assert not verify("another-secret", headers, body)
    finally:
        rec.stop()


def test_a_redirect_is_not_followed_and_retried_later(r: redis.Redis) -> None:
    target = Receiver()
    redirector = Receiver(status=302, location=f"http://127.0.0.1:{target.port}/elsewhere")
    try:
        box = outbox(r, retry_base=60)
        box.put("a1", {"url": f"http://127.0.0.1:{redirector.port}/done"}, result("a1"))
        assert box.deliver_due(no_task) == {"sent": 0, "failed": 1, "pending": 1}
        assert len(redirector.requests) == 1 and target.requests == []
        [item] = box.listing()["pending"]
        assert item["attempts"] == 1 and "redirect not followed" in item["last_error"]
        assert item["next_attempt_at"] > time.time() + 30  # backed off, not due again at once
        assert box.deliver_due(no_task)["sent"] == 0 and len(redirector.requests) == 1
    finally:
        redirector.stop()
        target.stop()


def test_one_key_per_result(r: redis.Redis) -> None:
    box = outbox(r)
    first = box.put("a1", {"task": "coordinator.done", "queue": "coordinator"}, result("a1"))
    assert box.put("a1", {"task": "coordinator.done", "queue": "coordinator"}, result("a1")) == first  # same result
    resumed = box.put("a1", {"task": "coordinator.done", "queue": "coordinator"},
                      result("a1", finished_at="2026-11-23T11:00:00+00:00", turns=9))
    assert resumed != first and resumed.startswith("a1:") and first.startswith("a1:")
    assert box.listing()["pending"][0]["idempotency_key"] == resumed  # the newer result replaced the older


def test_retries_keep_the_key_and_task_callbacks_carry_it(r: redis.Redis) -> None:
    box = outbox(r, retry_base=0.05)
    res = result("a1")
    key = box.put("a1", {"task": "coordinator.done", "queue": "coordinator"}, res)
    sent: list[tuple[str, dict[str, Any], str]] = []
    down = [True]

    def send_task(name: str, kwargs: dict[str, Any], queue: str) -> None:
        if down[0]:
            raise ConnectionError("broker redis://:broker-pw-77@vk:6379/0 is down")
        sent.append((name, kwargs, queue))

    assert box.deliver_due(send_task)["failed"] == 1
    [item] = box.listing()["pending"]
    assert item["idempotency_key"] == key and "broker-pw-77" not in item["last_error"]  # redacted
    down[0] = False
    wait_until(lambda: box.deliver_due(send_task)["sent"], 5, "the retry")
    [(name, kwargs, queue)] = sent
    assert (name, queue) == ("coordinator.done", "coordinator")
    assert kwargs["result"] == {**res, "idempotency_key": key}


def test_a_fleet_queue_is_never_sent_to(r: redis.Redis) -> None:
    box = outbox(r)
    box.put("a1", {"task": "coordinator.done", "queue": "agents"}, result("a1"))  # as an old, unchecked spec
    assert box.deliver_due(no_task)["failed"] == 1
    assert box.pending() == 0 and [d["agent_id"] for d in box.dead()] == ["a1"]  # dead at once, never retried


def test_listing_redacts_urls(r: redis.Redis) -> None:
    box = outbox(r)
    box.put("a1", {"url": "https://hook:pw-in-url@127.0.0.1:9/x"}, result("a1"))
    box.deliver_due(no_task)  # refused: credentials in the URL
    text = json.dumps(box.listing())
    assert "pw-in-url" not in text and "hook:***@127.0.0.1:9/x" in text


def test_a_dead_deliverers_claim_expires_and_another_delivers(r: redis.Redis, valkey: Valkey) -> None:
    """A deliverer process is killed while its receiver holds the request; after its claim expires, another
    deliverer delivers the result (and none could while the claim was live)."""
    hanging = Receiver(delay=30)
    good = Receiver()
    try:
        box = outbox(r, claim_seconds=2)
        box.put("a1", {"url": f"http://127.0.0.1:{hanging.port}/done"}, result("a1"))
        script = ("import sys, redis\nfrom orchestrator.callbacks import Outbox\nfrom orchestrator.keys import Keys\n"
                  "r = redis.Redis.from_url(sys.argv[1], decode_responses=True)\n"
                  "Outbox(r, Keys(), None, allowed_hosts='127.0.0.1', timeout=60, claim_seconds=2)"
                  ".deliver_due(lambda *a, **k: None)\n")
        proc = subprocess.Popen([sys.executable, "-c", script, valkey.url], cwd=REPO_ROOT)
        try:
            wait_until(lambda: hanging.requests, 20, "the first deliverer's request")
        finally:
            proc.kill()
            proc.wait(10)
        # Point the pending item at a live receiver, as if the coordinator came back elsewhere.
        item = json.loads(r.get(KEYS.outbox_item("a1")) or "{}")
        item["callback"] = {"url": f"http://127.0.0.1:{good.port}/done"}
        r.set(KEYS.outbox_item("a1"), json.dumps(item))
        assert box.deliver_due(no_task)["sent"] == 0 and good.requests == []  # the claim is still held
        wait_until(lambda: box.deliver_due(no_task)["sent"], 10, "delivery after the claim expired")
        assert len(good.requests) == 1 and box.pending() == 0
    finally:
        hanging.stop()
        good.stop()
