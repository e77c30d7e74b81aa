"""Quality gates with repair rounds, push to origin, and result callbacks (Celery task and signed webhook)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from orchestrator.agent.tools import Toolbox
from orchestrator.gates import run_gates
from orchestrator.models import GateSpec
from orchestrator.testing.cluster import Proc, free_port
from orchestrator.testing.offline_model import OfflineModel, Script, bash, edit, text_turn
from orchestrator.testing.sample_repo import make_sample_repo
from orchestrator.webhooks import verify
from tests.conftest import REPO_ROOT, Cluster, git, mirror_of

TESTS_GATE = [{"name": "tests", "command": "python -m pytest -q", "timeout_seconds": 120}]


def repair_script(offline: OfflineModel) -> None:
    offline.add_script("repair", Script([
        edit(command="str_replace", path="calc.py", old_str="return a - b", new_str="return a - b + 0"),
        text_turn("I think add is fixed."),
        edit(command="str_replace", path="calc.py", old_str="return a - b + 0", new_str="return a + b"),
        text_turn("Now it really is fixed."),
    ]))


def test_fix_gate_push_and_coordinator_task_callback(cluster: Cluster, tmp_path: Path, offline: OfflineModel) -> None:
    work = make_sample_repo(tmp_path / "work", bare_origin=tmp_path / "origin.git")
    origin = tmp_path / "origin.git"
    out = tmp_path / "coordinator-out"
    consumer = Proc([sys.executable, "-m", "celery", "-A", "tests.coordinator_app", "worker", "-Q", "coordinator",
                     "-c", "1", "-n", "coordinator@%h", "--without-mingle", "--without-gossip", "-l", "INFO"],
                    env={**os.environ, "COORDINATOR_BROKER": cluster.valkey.url, "COORDINATOR_OUT": str(out)},
                    log_path=tmp_path / "coordinator.log", cwd=REPO_ROOT)
    try:
        consumer.wait_for_log(" ready.", 60)
        cluster.worker()
        result = cluster.submit({
            "task_id": "push-1", "prompt": "Fix the failing test.", "repo": str(origin), "push": True,
            "quality_gates": TESTS_GATE, "callback": {"task": "coordinator.agent_finished", "queue": "coordinator"},
        }).get(timeout=90)
        assert result["status"] == "completed", result
        gate = result["gates"][0]
        assert gate["name"] == "tests" and gate["passed"] and gate["exit_code"] == 0
        assert "2 passed" in gate["output_tail"]
        # The branch is on origin, at the result's commit, with the fix.
        assert git(origin, "rev-parse", result["branch"]).strip() == result["commit"]
        assert "return a + b" in git(origin, "show", f"{result['branch']}:calc.py")
        delivered = out / f"{result['agent_id']}.json"
        deadline = time.monotonic() + 30
        while not delivered.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        received = json.loads(delivered.read_text())
        assert received.pop("idempotency_key").startswith(f"{result['agent_id']}:")  # one key per result
        assert received == result
    finally:
        consumer.stop()
    del work


def test_failed_gate_goes_back_to_the_agent_for_repair(cluster: Cluster, sample_repo: Path,
                                                       offline: OfflineModel) -> None:
    repair_script(offline)
    cluster.worker()
    spec = {"task_id": "rep-1", "prompt": "[[script:repair]] fix", "repo": str(sample_repo),
            "quality_gates": TESTS_GATE, "max_gate_attempts": 2}
    result = cluster.submit(spec).get(timeout=90)
    assert result["status"] == "completed", result
    assert [(g["attempt"], g["passed"]) for g in result["gates"]] == [(1, False), (2, True)]
    assert "failed" in result["gates"][0]["output_tail"]
    # The repair round saw the failure: the gate output went back to the model.
    with cluster.state() as r:
        checkpoint = json.loads(r.get(f"orch:checkpoint:{result['agent_id']}"))
    feedback = [m for m in checkpoint["messages"] if m["role"] == "user" and isinstance(m["content"], str)
                and "quality gates failed" in m["content"]]
    assert len(feedback) == 1 and "tests" in feedback[0]["content"]
    assert result["turns"] == 4
    mirror = mirror_of(cluster.workspace)
    log = git(mirror, "log", "--format=%s", result["branch"]).splitlines()
    assert len([line for line in log if "rep-1" in line]) == 2  # a commit per round


def test_one_gate_attempt_ends_gates_failed(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    repair_script(offline)
    cluster.worker()
    result = cluster.submit({"task_id": "rep-2", "prompt": "[[script:repair]] fix", "repo": str(sample_repo),
                             "quality_gates": TESTS_GATE, "max_gate_attempts": 1}).get(timeout=90)
    assert result["status"] == "gates_failed" and "tests" in result["error"]
    assert [g["passed"] for g in result["gates"]] == [False]
    assert result["commit"] is not None  # the work is kept even so


class Hook:
    """A local webhook receiver that fails the first ``failures`` requests."""

    def __init__(self, port: int, failures: int) -> None:
        self.port = port
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = 500 if len(hook.requests) < hook.failures else 200
                hook.requests.append(({k.lower(): v for k, v in self.headers.items()}, body, code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_is_signed_retried_and_acknowledged_once(cluster: Cluster, sample_repo: Path,
                                                         offline: OfflineModel) -> None:
    hook = Hook(free_port(), failures=2)
    settings = {"webhook_secret": "hook-secret", "callback_retry_base_seconds": 0.5,
                "webhook_allowed_hosts": "127.0.0.1"}  # the receiver is on loopback: allow it past the SSRF check
    try:
        cluster.worker(**settings)
        cluster.beat(**settings)
        result = cluster.submit({"task_id": "hook-1", "prompt": "Fix the failing test.", "repo": str(sample_repo),
                                 "callback": {"url": f"http://127.0.0.1:{hook.port}/done"}}).get(timeout=90)
        cluster.wait_for(lambda: any(code == 200 for _, _, code in hook.requests), timeout=30, what="delivery")
        time.sleep(2)
        assert [code for _, _, code in hook.requests] == [500, 500, 200]  # acknowledged once, three attempts
        headers, body, _ = hook.requests[-1]
        doc = json.loads(body)
        key = doc.pop("idempotency_key")
        assert doc == result
        assert headers["x-orchestrator-event"] == "agent.finished"
        assert key.startswith(f"{result['agent_id']}:")
        assert {h["idempotency-key"] for h, _, _ in hook.requests} == {key}  # the same key on every retry
        assert verify("hook-secret", headers, body)
        assert not verify("another-secret", headers, body)
        assert cluster.cli_json("callbacks", **settings) == {"pending": [], "dead": []}
    finally:
        hook.stop()


def test_webhook_survives_receiver_down_and_worker_restart(cluster: Cluster, sample_repo: Path,
                                                           offline: OfflineModel) -> None:
    port = free_port()
    settings = {"callback_retry_base_seconds": 0.5, "callback_retry_max_seconds": 1,
                "webhook_allowed_hosts": "127.0.0.0/8"}
    worker = cluster.worker("first", **settings)
    result = cluster.submit({"task_id": "hook-2", "prompt": "Fix the failing test.", "repo": str(sample_repo),
                             "callback": {"url": f"http://127.0.0.1:{port}/done"}}).get(timeout=90)
    cluster.wait_for(lambda: cluster.cli_json("callbacks", **settings)["pending"][0]["attempts"] >= 1, timeout=20,
                     what="a failed delivery attempt")
    worker.stop()  # the worker restarts while the receiver is down: the result waits in Valkey
    cluster.worker("second", **settings)
    cluster.beat(**settings)
    hook = Hook(port, failures=0)
    try:
        cluster.wait_for(lambda: hook.requests, timeout=30, what="delivery after the receiver returns")
        delivered = json.loads(hook.requests[0][1])
        assert delivered.pop("idempotency_key").startswith(f"{result['agent_id']}:") and delivered == result
        cluster.wait_for(lambda: cluster.cli_json("callbacks", **settings)["pending"] == [], timeout=10,
                         what="outbox empty")
    finally:
        hook.stop()


def test_two_agents_on_one_repository_at_once(cluster: Cluster, sample_repo: Path, offline: OfflineModel) -> None:
    offline.add_script("mul", Script([bash("echo mul > mul.txt"), text_turn("done")]))
    cluster.worker(concurrency=2)
    a = cluster.submit({"task_id": "same-a", "prompt": "Fix the failing test.", "repo": str(sample_repo)})
    b = cluster.submit({"task_id": "same-b", "prompt": "[[script:mul]] go", "repo": str(sample_repo)})
    ra, rb = a.get(timeout=90), b.get(timeout=90)
    assert ra["status"] == rb["status"] == "completed"
    mirror = mirror_of(cluster.workspace)
    assert "return a + b" in git(mirror, "show", f"{ra['branch']}:calc.py")
    assert "mul.txt" not in git(mirror, "ls-tree", "--name-only", ra["commit"])
    files_b = git(mirror, "ls-tree", "--name-only", rb["commit"]).split()
    assert "mul.txt" in files_b and "return a - b" in git(mirror, "show", f"{rb['branch']}:calc.py")


def test_hanging_gate_is_killed_with_its_children(tmp_path: Path) -> None:
    gates = [GateSpec(name="hang", command="bash -c 'sleep 600 & sleep 600'", timeout_seconds=1)]
    started = time.monotonic()
    [result] = run_gates(gates, tmp_path, attempt=1)
    assert time.monotonic() - started < 5
    assert not result.passed and result.exit_code is None and "timed out" in result.output_tail
    leftover = subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""


def test_gate_output_is_capped(tmp_path: Path) -> None:
    gates = [GateSpec(name="loud", command="yes 'a very loud gate line' | head -c 5000000; exit 3")]
    [result] = run_gates(gates, tmp_path, attempt=1, toolbox=Toolbox(tmp_path, output_limit=64_000))
    assert not result.passed and result.exit_code == 3
    assert len(result.output_tail) <= 4_100


def test_gate_environment_has_no_secrets(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-very-secret")
    monkeypatch.setenv("ORCHESTRATOR_BROKER_URL", "redis://:pw-secret@valkey:6379/0")
    [result] = run_gates([GateSpec(name="env", command="env")], tmp_path, attempt=1)
    assert result.passed and "PATH=" in result.output_tail
    assert "sk-very-secret" not in result.output_tail and "pw-secret" not in result.output_tail
