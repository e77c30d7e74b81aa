"""The lifecycle through real workers: resume windows, push_failed, Valkey outages, exactly-once callbacks."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from celery import Celery

from orchestrator.settings import STATE_DB
from orchestrator.testing.cluster import Beat, Valkey, Worker, fleet_env, free_port, wait_until
from orchestrator.testing.offline_model import OfflineModel, Script, Turn, bash, text_turn
from orchestrator.testing.sample_repo import make_sample_repo
from orchestrator.webhooks import verify
from tests.conftest import Cluster, git, mirror_of

FAST = {"heartbeat_interval_seconds": 0.5, "heartbeat_timeout_seconds": 3, "health_sweep_interval_seconds": 1}


class Receiver:
    """A webhook receiver on loopback that answers slowly and keeps every request it got."""

    def __init__(self, delay: float = 0.0, secret: str = "hook-secret") -> None:
        self.port = free_port()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay)
                owner.requests.append(({k: v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.secret = secret
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def results(self) -> list[dict[str, Any]]:
        out = []
        for headers, body in self.requests:
            assert verify(self.secret, headers, body), headers
            out.append(json.loads(body))
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def webhook_settings(receiver: Receiver) -> dict[str, Any]:
    return {"webhook_secret": receiver.secret, "webhook_allowed_hosts": "127.0.0.1"}


def test_spec_priority_zero_five_nine_start_nine_five_zero(cluster: Cluster, sample_repo: Path,
                                                           offline: OfflineModel) -> None:
    offline.add_script("slow", Script([Turn([{"type": "text", "text": "thinking"}], delay=2.0)]))
    offline.add_script("quick", Script([text_turn("ok")]))
    cluster.worker(concurrency=1)
    blocker = cluster.submit({"task_id": "block", "prompt": "[[script:slow]]", "repo": str(sample_repo)})
    cluster.wait_for(lambda: any(c.agent for c in offline.calls()), what="blocker running")
    pending = [cluster.submit({"task_id": f"p{p}", "prompt": "[[script:quick]] go", "repo": str(sample_repo),
                               "priority": p}) for p in (0, 5, 9)]
    blocker.get(timeout=60)
    results = [p.get(timeout=60) for p in pending]
    assert [r["status"] for r in results] == ["completed"] * 3
    order = [r["task_id"] for r in sorted(results, key=lambda r: r["started_at"])]
    assert order == ["p9", "p5", "p0"]


def test_timed_out_agent_resumes_with_a_fresh_window_and_completes(cluster: Cluster, sample_repo: Path,
                                                                   offline: OfflineModel) -> None:
    # The first run spends its whole window in a slow command; the resumed run does the rest in a new window.
    offline.add_script("slowstart", Script([bash("test -f .slept || { touch .slept; sleep 8; }"),
                                            bash("echo done > done.txt"), text_turn("done")]))
    cluster.worker(max_task_duration_minutes=0.05)  # 3 s
    first = cluster.submit({"task_id": "tmo-1", "prompt": "[[script:slowstart]] go", "repo": str(sample_repo)})
    timed_out = first.get(timeout=60)
    assert timed_out["status"] == "timed_out" and timed_out["commit"], timed_out
    agent_id = timed_out["agent_id"]
    cluster.cli("resume", agent_id)
    record = cluster.wait_for(lambda: (r := cluster.record(agent_id))["state"] == "completed" and r,
                              timeout=60, what="the resumed agent to complete")
    assert record["result"]["status"] == "completed", record
    assert record["result"]["started_at"] == timed_out["started_at"]  # the result keeps the first start
    assert "done.txt" in git(mirror_of(cluster.workspace), "ls-tree", "--name-only", record["commit"])


def test_a_refused_push_ends_push_failed_with_the_commit_kept(cluster: Cluster, tmp_path: Path,
                                                              offline: OfflineModel) -> None:
    make_sample_repo(tmp_path / "work", bare_origin=tmp_path / "origin.git")
    origin = tmp_path / "origin.git"
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'pushes are closed today' >&2\nexit 1\n")
    hook.chmod(0o755)
    cluster.worker()
    result = cluster.submit({"task_id": "push-no", "prompt": "Fix the failing test.", "repo": str(origin),
                             "push": True}).get(timeout=90)
    assert result["status"] == "push_failed", result
    assert result["commit"] and "push failed" in (result["error"] or "")
    assert git(mirror_of(cluster.workspace), "rev-parse", result["branch"]).strip() == result["commit"]
    assert git(origin, "branch", "--list", result["branch"]).strip() == ""  # nothing reached origin


def test_after_its_record_expires_the_task_id_is_free(cluster: Cluster, sample_repo: Path,
                                                      offline: OfflineModel) -> None:
    offline.add_script("quick", Script([text_turn("ok")]))
    cluster.worker()
    spec = {"task_id": "reuse-1", "prompt": "[[script:quick]] go", "repo": str(sample_repo)}
    first = cluster.submit(spec).get(timeout=60)
    assert first["status"] == "completed"
    assert cluster.submit(spec).get(timeout=30)["status"] == "duplicate"
    with cluster.state() as r:
        for key in (f"orch:agent:{first['agent_id']}", "orch:task:reuse-1"):
            assert 0 < r.ttl(key) <= 30 * 24 * 3600, key  # everything of the agent expires together
        r.pexpire(f"orch:agent:{first['agent_id']}", 1)  # ... as if the 30 days had passed for the record
    time.sleep(0.05)
    again = cluster.submit(spec).get(timeout=60)
    assert again["status"] == "completed" and again["agent_id"] != first["agent_id"]


def test_kill_resume_complete_delivers_two_results_with_two_keys(cluster: Cluster, sample_repo: Path,
                                                                 offline: OfflineModel) -> None:
    receiver = Receiver()
    try:
        offline.add_script("long", Script([bash("echo a > a.txt"), Turn([{"type": "text", "text": "x" * 400}],
                                                                         chunk_delay=0.5),
                                           bash("echo b > b.txt"), text_turn("done")]))
        settings = webhook_settings(receiver)
        cluster.worker(**settings)
        pending = cluster.submit({"task_id": "kr-1", "prompt": "[[script:long]] go", "repo": str(sample_repo),
                                  "callback": {"url": receiver.url}})
        agent_id = cluster.agent_for("kr-1")
        cluster.wait_for(lambda: offline.open_streams() == 1, what="the slow turn streaming")
        cluster.cli("kill", agent_id, **settings)
        assert pending.get(timeout=30)["status"] == "killed"
        cluster.wait_for(lambda: len(receiver.requests) == 1, what="the killed result delivered")
        cluster.cli("resume", agent_id, **settings)
        cluster.wait_for(lambda: len(receiver.requests) == 2, timeout=60, what="the completed result delivered")
        time.sleep(1)
        bodies = receiver.results()
        assert [b["status"] for b in bodies] == ["killed", "completed"]
        keys = [h["Idempotency-Key"] for h, _ in receiver.requests]
        assert keys[0] != keys[1] and [b["idempotency_key"] for b in bodies] == keys
    finally:
        receiver.stop()


def test_two_beats_and_a_slow_receiver_deliver_every_result_exactly_once(cluster: Cluster, sample_repo: Path,
                                                                         offline: OfflineModel) -> None:
    receiver = Receiver(delay=2.0)
    try:
        offline.add_script("quick", Script([bash("echo hi"), text_turn("ok")]))
        settings = {**webhook_settings(receiver), "callback_retry_base_seconds": 1}
        cluster.worker("agents", concurrency=2, queues="agents", **settings)
        cluster.worker("ops", concurrency=4, queues="ops", **settings)
        cluster.beat(**settings)
        cluster.procs.append(Beat(cluster.env(**settings), log_path=cluster.tmp / "beat2.log"))
        pending = [cluster.submit({"task_id": f"once-{i}", "prompt": "[[script:quick]] go", "repo": str(sample_repo),
                                   "callback": {"url": receiver.url}}) for i in range(4)]
        ids = {p.get(timeout=90)["agent_id"] for p in pending}
        cluster.wait_for(lambda: len(receiver.requests) >= 4, timeout=60, what="four deliveries")
        time.sleep(8)  # more beat ticks and deliver_callbacks runs: nothing is sent again
        bodies = receiver.results()
        assert sorted(b["agent_id"] for b in bodies) == sorted(ids)
        assert len({h["Idempotency-Key"] for h, _ in receiver.requests}) == 4
        with cluster.state() as r:
            assert r.zcard("orch:outbox") == 0
    finally:
        receiver.stop()


def test_a_100_second_valkey_outage_loses_nothing_and_counts_no_recovery(offline: OfflineModel,
                                                                        tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    offline.add_script("outage", Script([bash("sleep 4; echo one > one.txt"), bash("echo two > two.txt"),
                                         text_turn("done")]))
    data = tmp_path / "valkey-data"
    server = Valkey(data_dir=data, persistence=True)
    port = server.port
    settings = {**FAST, "heartbeat_timeout_seconds": 6}  # the default VALKEY_RETRY_SECONDS (300) outlasts it
    env = fleet_env(server.url, tmp_path / "ws", offline.url, **settings)
    procs = [Worker(env, f"w{i}@%h", concurrency=2, log_path=tmp_path / f"w{i}.log") for i in (1, 2)]
    procs.append(Beat(env, log_path=tmp_path / "beat.log"))
    for p in procs[:2]:
        p.wait_ready()  # type: ignore[attr-defined]
    coordinator = Celery(broker=server.url, backend=server.url.rsplit("/", 1)[0] + "/1")
    try:
        pending = [coordinator.send_task("orchestrator.spawn_agent", queue="agents", kwargs={
            "spec": {"task_id": f"out-{i}", "prompt": "[[script:outage]] go", "repo": str(repo)}}) for i in range(3)]
        wait_until(lambda: len({c.agent for c in offline.calls() if c.turn == 0}) == 3, 60, "three agents running")
        server.stop()  # every agent is inside its 4 s command: Valkey is gone for 100 s
        time.sleep(100)
        server = Valkey(port=port, data_dir=data, persistence=True)
        ids = []
        for async_result in pending:
            result = async_result.get(timeout=120)
            assert result["status"] == "completed", result
            ids.append(result["agent_id"])
        with server.client(STATE_DB) as r:
            assert r.hget("orch:stats", "recoveries") in (None, "0")
            for agent_id in ids:
                assert json.loads(r.hget(f"orch:agent:{agent_id}", "recoveries") or "0") == 0
        for agent_id in ids:  # and no turn was asked twice
            turns = [c.turn for c in offline.calls() if c.agent == agent_id]
            assert sorted(turns) == [0, 1, 2], turns
    finally:
        coordinator.close()
        for p in procs:
            p.stop()
        server.stop()
