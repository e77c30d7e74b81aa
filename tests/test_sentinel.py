"""Valkey high availability: Sentinel URLs in every process, the state client through a failover, WAIT, and a drill.

Everything runs as real processes on loopback: a primary, a replica and three sentinels (``SentinelGroup``), real
``celery -A orchestrator`` workers and beat, and a plain Celery coordinator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kombu
import pytest
from celery import Celery

from orchestrator import replication
from orchestrator.broker import SentinelTransport
from orchestrator.budget import Budget, ledger_fields
from orchestrator.keys import Keys
from orchestrator.replication import StateRedis, replicated
from orchestrator.settings import STATE_DB, Settings
from orchestrator.store import connect
from orchestrator.testing.cluster import (
    Beat,
    SentinelGroup,
    Valkey,
    Worker,
    close_coordinator,
    fleet_env,
    wait_replicas_online,
    wait_until,
)
from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, text_turn
from orchestrator.testing.sample_repo import make_sample_repo
from tests.conftest import REPO_ROOT, env_without_fleet

# A password with every character that must be percent-encoded in a URL.
PASSWORD = "drill#pw/1?x@y"
KEYS = Keys("orch:")


def settings_for(url: str, **values: Any) -> Settings:
    return Settings(broker_url=url, _env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def group(tmp_path: Path) -> Any:
    g = SentinelGroup(password=PASSWORD, root=tmp_path / "ha")
    yield g
    g.stop()


# --- every process's configuration ------------------------------------------------------------------------------


def test_every_process_loading_the_app_gets_the_sentinel_options() -> None:
    """orchestrator/celery.py gives broker and result backend `master_name` and the sentinels' password."""
    pw = quote(PASSWORD, safe="")
    url = f"sentinel://:{pw}@10.0.0.1:26379;sentinel://:{pw}@10.0.0.2:26380"
    probe = ("import json; from orchestrator.celery import app; c = app.conf; b = app.backend; "
             "conn = app.connection_for_write(); first = type(conn.transport); conn.switch(conn.alt[1]); "
             "print(json.dumps({'broker': c.broker_transport_options, 'result': c.result_backend_transport_options, "
             "'backend': type(b).__name__, 'db': b.connparams.get('db'), 'password': b.connparams.get('password'), "
             "'hosts': [[h['host'], h['port']] for h in b.connparams['hosts']], 'url': c.result_backend, "
             "'transports': [f'{t.__module__}.{t.__name__}' for t in (first, type(conn.transport))]}))")

    def run(**extra: str) -> dict[str, Any]:
        env = {**env_without_fleet(), "ORCHESTRATOR_BROKER_URL": url, **extra}
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                              cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    conf = run(ORCHESTRATOR_SENTINEL_MASTER="fleet-main")
    for options in (conf["broker"], conf["result"]):
        assert options["master_name"] == "fleet-main"
        assert options["sentinel_kwargs"]["password"] == PASSWORD  # decoded, for the sentinels themselves
    assert conf["broker"]["visibility_timeout"] > 3600  # the fleet's own options are still there
    assert conf["backend"] == "SentinelBackend"
    assert (conf["db"], conf["password"]) == (1, PASSWORD)  # the result backend's database, the master's password
    assert conf["hosts"] == [["10.0.0.1", 26379], ["10.0.0.2", 26380]]
    assert conf["url"].count("/1") == 2
    # kombu's Sentinel transport with the fleet's fix, also after kombu fails over to the next URL of the list.
    assert conf["transports"] == ["orchestrator.broker.SentinelTransport"] * 2
    # Sentinels configured without a password: an empty ORCHESTRATOR_SENTINEL_PASSWORD sends them none.
    bare = run(ORCHESTRATOR_SENTINEL_PASSWORD="")
    assert "password" not in bare["broker"]["sentinel_kwargs"] and bare["broker"]["master_name"] == "mymaster"
    other = run(ORCHESTRATOR_SENTINEL_PASSWORD="sentinels-own")
    assert other["result"]["sentinel_kwargs"]["password"] == "sentinels-own"
    assert other["password"] == PASSWORD  # the master's password stays the URL's


def test_a_channel_whose_transport_was_detached_still_restores_its_messages(group: SentinelGroup) -> None:
    """The worker-killing path of a failover (orchestrator/broker.py), without the failover: Celery's reconnect
    detaches the transport (``Transport.client = None``) before it closes the channel that holds unacked messages."""
    s = settings_for(group.url(0))
    conn = kombu.Connection(s.broker_url, transport=SentinelTransport,
                            transport_options=s.sentinel_transport_options(s.broker_url))
    try:
        channel = conn.channel()
        queue = kombu.Queue("probe", kombu.Exchange("probe"), "probe", channel=channel)
        queue.declare()
        kombu.Producer(channel).publish({"n": 1}, exchange="probe", routing_key="probe")
        message = channel.basic_get("probe", no_ack=False)
        assert message is not None and json.loads(message.body) == {"n": 1}
        with group.primary.client() as c:
            assert c.llen("probe") == 0 and c.hlen("unacked") == 1
        conn.transport.client = None  # what kombu's Connection.collect() leaves behind
        channel.close()  # restores the unacked message: kombu's own channel raises AttributeError here
        with group.primary.client() as c:
            assert c.llen("probe") == 1 and c.hlen("unacked") == 0
    finally:
        with contextlib.suppress(Exception):
            conn.release()


# --- the state client -------------------------------------------------------------------------------------------


def test_state_client_follows_a_failover_and_reloads_the_scripts_the_new_master_lacks(group: SentinelGroup) -> None:
    s = settings_for(group.url(), state_wait_replicas=1)
    r = connect(s)
    assert isinstance(r, StateRedis) and r.connection_pool.__class__.__name__ == "SentinelConnectionPool"
    budget = Budget(r, s)
    res = budget.reserve("a1", agent_limit=100_000, input_bound=1000, max_output=500)
    assert res is not None
    old = group.primary
    replica = next(v for v in group.servers if v is not old)
    with replica.client(STATE_DB) as c:
        assert c.zscore(KEYS.reservations, res.id) is not None  # WAIT returned: the replica holds it already
        assert c.script_exists(budget._settle.sha) == [False]  # the script cache is not replicated
    group.kill_primary()
    started = time.monotonic()
    totals = budget.settle_totals(res, 1200, 0)  # retried through the failover; NOSCRIPT there: reloaded
    elapsed = time.monotonic() - started
    assert totals == (1200, 1200), totals
    assert group.wait_failover(old.port) == replica.port
    assert elapsed < 30, elapsed
    with replica.client(STATE_DB) as c:
        assert c.script_exists(budget._settle.sha) == [True]
        assert c.get(KEYS.day_ledger(res.day)) == "1200|0|0"  # used|reserved|cost
    assert r.get(KEYS.day_ledger(res.day)) == "1200|0|0"  # decode_responses: strings, as everywhere in the fleet


def test_wait_confirms_a_write_and_reports_a_replica_that_does_not_acknowledge(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "_short", replication._ShortLog())  # no throttling left over from other tests
    primary = Valkey(data_dir=tmp_path / "p")
    replica = Valkey(data_dir=tmp_path / "r", replica_of=primary.port)
    try:
        wait_replicas_online(primary, 1)
        s = Settings(broker_url=primary.url, state_wait_replicas=1, state_wait_timeout_ms=300,
                     _env_file=None)  # type: ignore[call-arg]
        r = connect(s)
        timings = []
        for _ in range(200):
            r.set("k", "v")
            t = time.perf_counter()
            assert replicated(r, "test write") == 1
            timings.append(time.perf_counter() - t)
        assert statistics.median(timings) < 0.005, statistics.median(timings)  # a loopback round trip, not 300 ms
        off = connect(Settings(broker_url=primary.url, _env_file=None))  # type: ignore[call-arg]
        assert replicated(off, "test write") is None  # 0 replicas to wait for: WAIT is not sent at all
        budget = Budget(r, s)
        replica.signal(signal.SIGSTOP)  # alive, connected, silent: every WAIT times out
        try:
            with caplog.at_level(logging.WARNING, logger="orchestrator.replication"):
                t = time.monotonic()
                res = budget.reserve("a1", agent_limit=100_000, input_bound=10, max_output=10)
                waited = time.monotonic() - t
        finally:
            replica.signal(signal.SIGCONT)
        assert res is not None  # availability first: the write stands, the run goes on
        assert waited >= 0.29, waited
        assert "token reservation acknowledged by 0 of 1 replica(s) within 300 ms" in caplog.text
    finally:
        replica.stop()
        primary.stop()


# --- the drill --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "shutdown"])
def test_sentinel_failover_drill_loses_nothing_and_runs_nothing_twice(fault: str, group: SentinelGroup,
                                                                      offline: OfflineModel, tmp_path: Path) -> None:
    """The primary dies while four agents run on two workers: SIGKILL (asynchronous replication's worst case), or
    a maintenance stop (SIGTERM: the primary lets its replica catch up, then exits; docs/scale-out.md)."""
    started = time.time()
    repo = make_sample_repo(tmp_path / "repo")
    offline.add_script("drill", Script([bash("sleep 2; echo one > one.txt"), bash("echo two > two.txt"),
                                        text_turn("done")]))
    offline.add_script("canary", Script([Turn([{"type": "text", "text": "still consuming"}], delay=2.0)]))
    limits = {"daily_token_limit": 2_000_000, "agent_token_limit": 100_000}
    settings = {"heartbeat_interval_seconds": 0.5, "heartbeat_timeout_seconds": 15,
                "health_sweep_interval_seconds": 1, "state_wait_replicas": 1, **limits}
    env = fleet_env(group.url(0), tmp_path / "ws", offline.url, **settings)
    workers = [Worker(env, f"w{i}@%h", concurrency=3, log_path=tmp_path / f"w{i}.log") for i in (1, 2)]
    procs: list[Worker | Beat] = [*workers, Beat(env, log_path=tmp_path / "beat.log")]
    sentinel_options = {"master_name": "mymaster", "sentinel_kwargs": {"password": PASSWORD}}
    coordinator = Celery(broker=group.url(0), backend=group.url(1))
    # What docs/scale-out.md asks of a coordinator: the options, and a result backend that retries through a
    # failover (without it, a `.get()` polling during the failover raises MasterNotFoundError).
    coordinator.conf.update(broker_transport_options=sentinel_options,
                            result_backend_transport_options=sentinel_options, result_backend_always_retry=True,
                            result_expires=3600)
    stack = contextlib.ExitStack()
    try:
        for w in workers:
            w.wait_ready()

        def submit(task_id: str, script: str) -> Any:
            return coordinator.send_task("orchestrator.spawn_agent", queue="agents", kwargs={
                "spec": {"task_id": task_id, "prompt": f"[[script:{script}]] go", "repo": str(repo)}})

        pending = [submit(f"ha-{i}", "drill") for i in range(4)]
        first = wait_until(lambda: (done := [c for c in offline.calls() if c.turn == 0 and c.status == "completed"])
                           and len({c.agent for c in done}) == 4 and done, 60, "four agents in their 2 s command")
        # Kill while every agent is mid-run: its command ends about when the primary is gone, so its next step
        # (checkpoint, reservation, model call) needs the failover.
        time.sleep(max(0.0, max(c.finished_at or 0 for c in first) + 0.3 - time.time()))
        assert not [c for c in offline.calls() if c.turn == 2], "an agent got to its last turn before the kill"
        logs_before = [len(w.log()) for w in workers]
        old = group.primary
        killed_at = time.time()
        if fault == "kill":
            group.kill_primary()
        else:
            group.shutdown_primary()
        new_port = group.wait_failover(old.port)
        promoted_at = time.time()
        results = [p.get(timeout=120) for p in pending]  # the coordinator gets every result, through the failover
        done_at = time.time()

        assert [r["status"] for r in results] == ["completed"] * 4, results
        ids = [r["agent_id"] for r in results]
        assert len(set(ids)) == 4
        after = [c for c in offline.calls() if c.started_at > killed_at]
        for agent_id in ids:  # every turn asked exactly once: nothing redone, no recovery
            turns = sorted(c.turn for c in offline.calls() if c.agent == agent_id)
            assert turns == [0, 1, 2], (agent_id, turns)

        # Workers alive and still consuming after the reconnect (kombu#2007): canaries on both workers complete.
        canaries = [submit(f"canary-{i}", "canary") for i in range(4)]
        canary_results = [p.get(timeout=90) for p in canaries]
        assert [r["status"] for r in canary_results] == ["completed"] * 4
        assert len({r["worker"] for r in canary_results}) == 2, canary_results
        assert all(p.alive() for p in procs)

        state = stack.enter_context(group.server(new_port).client(STATE_DB))
        day = datetime.now(UTC).date().isoformat()
        served = offline.usage_for()["total_tokens"]
        used, reserved = ledger_fields(state.get(KEYS.day_ledger(day)), 2)[:2]
        assert used == served, (used, served)  # the ledger equals what the model served: nothing lost, nothing twice
        assert reserved == 0
        assert used <= limits["daily_token_limit"]
        for agent_id in ids + [r["agent_id"] for r in canary_results]:
            agent_used = ledger_fields(state.get(KEYS.agent_ledger(agent_id)), 1)[0]
            assert agent_used == offline.usage_for(agent_id)["total_tokens"] <= limits["agent_token_limit"]
            record = state.hgetall(KEYS.agent(agent_id))
            assert json.loads(record["state"]) == "completed"
            assert json.loads(record.get("recoveries") or "0") == 0
        assert state.hget(KEYS.stats, "finished:completed") == "8"
        assert state.hget(KEYS.stats, "recoveries") in (None, "0")
        # WAIT is checked: no short answer while the replica lived, then the lone new primary is reported.
        before = "".join(w.log()[:n] for w, n in zip(workers, logs_before, strict=True))
        assert "replica(s) within" not in before
        assert "acknowledged by 0 of 1 replica(s)" in "".join(w.log() for w in workers)

        first_after = min(c.started_at for c in after)
        print(f"\nsentinel drill ({fault}): new master named {promoted_at - killed_at:.1f} s after the fault; "
              f"next model request {first_after - killed_at:.1f} s after; all 4 complete "
              f"{done_at - killed_at:.1f} s after; the whole drill {time.time() - started:.1f} s")
    finally:
        stack.close()
        close_coordinator(coordinator)
        for p in procs:
            p.stop()
