"""Planted secrets over a whole run: no log line, CLI output, record, result or Valkey value ever holds one.

Every secret setting gets a known value (Valkey's password in the broker URL, the API key, the webhook secret, a
git credential, an unrelated token in the environment). One agent run then goes through as many paths as possible:
tools, an invalid tool call, quality gates, a refused push (``push_failed`` with git's error), a webhook that fails
once before it is delivered (``last_error``); then Valkey restarts (the worker logs its lost connections with
tracebacks), and the operator's commands run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from orchestrator.testing.cluster import Beat, Valkey, Worker, fleet_env, free_port, wait_until
from orchestrator.testing.offline_model import OfflineModel, Script, bash, edit, text_turn
from orchestrator.testing.sample_repo import make_sample_repo
from tests.conftest import REPO_ROOT

VALKEY_PASSWORD = "vk#pass/PLANTED-1a2b3c"  # '#' and '/' too: the hardest case for URL redaction
SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-PLANTED-4d5e6f7a8b",
    "ORCHESTRATOR_WEBHOOK_SECRET": "whsec-PLANTED-9c0d1e2f3a",
    "DEPLOY_TOKEN": "tok-PLANTED-5b6c7d8e9f",
}
GIT_PASSWORD = "ghp_PLANTED_0a1b2c3d4e"


def every_form(secret: str) -> set[str]:
    return {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}


ALL_FORMS = set().union(*(every_form(s) for s in [VALKEY_PASSWORD, GIT_PASSWORD, *SECRETS.values()]))


class FlakyHook:
    """A webhook receiver that answers 500 once, then 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[bytes] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(500 if len(owner.bodies) == 1 else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def guarded_valkey(tmp_path: Path) -> Iterator[list[Valkey]]:
    servers = [Valkey(data_dir=tmp_path / "valkey", password=VALKEY_PASSWORD, persistence=True)]
    yield servers  # the test may restart it: the last one is the live one
    servers[-1].stop()


def leaks(text: str) -> list[str]:
    return sorted(form for form in ALL_FORMS if form in text)


def all_values(valkey: Valkey) -> str:
    """Every key and value of every database, as text."""
    out = []
    for db in range(16):
        with valkey.client(db) as r:
            for key in r.scan_iter(count=1000):
                kind = r.type(key)
                out.append(key)
                if kind == "string":
                    out.append(str(r.get(key)))
                elif kind == "hash":
                    out.append(json.dumps(r.hgetall(key)))
                elif kind == "list":
                    out.append(json.dumps(r.lrange(key, 0, -1)))
                elif kind == "set":
                    out.append(json.dumps(sorted(r.smembers(key))))
                elif kind == "zset":
                    out.append(json.dumps(r.zrange(key, 0, -1)))
    return "\n".join(out)


def test_no_planted_secret_leaks_anywhere_over_a_whole_run(guarded_valkey: list[Valkey], offline: OfflineModel,
                                                            tmp_path: Path) -> None:
    valkey = guarded_valkey[0]
    make_sample_repo(tmp_path / "work", bare_origin=tmp_path / "origin.git")
    origin = tmp_path / "origin.git"
    (origin / "hooks" / "pre-receive").write_text("#!/bin/sh\necho 'push refused by policy' >&2\nexit 1\n")
    (origin / "hooks" / "pre-receive").chmod(0o755)
    creds = tmp_path / "git-credentials"
    creds.write_text(f"https://fleet:{GIT_PASSWORD}@git.example.com\n")
    hook = FlakyHook()
    offline.add_script("secrets", Script([
        bash("env; cat /proc/1/environ | tr '\\0' '\\n'; echo done"),
        edit(command="view", path="calc.py\u0000"),  # an invalid path: an error result
        edit(command="str_replace", path="calc.py", old_str="return a - b", new_str="return a + b"),
        text_turn("fixed"),
    ]))
    # A password with '#' and '/' goes into a URL percent-encoded, as a deployer writes it.
    broker = f"redis://:{urllib.parse.quote(VALKEY_PASSWORD, safe='')}@127.0.0.1:{valkey.port}/0"
    env = fleet_env(broker, tmp_path / "ws", offline.url, heartbeat_interval_seconds=1,
                    health_sweep_interval_seconds=1, webhook_allowed_hosts="127.0.0.1",
                    git_credentials_file=str(creds), callback_retry_base_seconds=1, log_json="true")
    env.update(SECRETS)
    procs: list[Worker | Beat] = [Worker(env, "w1@%h", log_path=tmp_path / "w1.log")]
    procs.append(Beat(env, log_path=tmp_path / "beat.log"))
    coordinator = Celery(broker=broker, backend=broker.rsplit("/", 1)[0] + "/1")
    outputs: list[str] = []
    try:
        procs[0].wait_ready()  # type: ignore[union-attr]
        result = coordinator.send_task("orchestrator.spawn_agent", queue="agents", kwargs={"spec": {
            "task_id": "secrets-1", "prompt": "[[script:secrets]] fix it", "repo": str(origin), "push": True,
            "quality_gates": [{"name": "tests", "command": "python -m pytest -q"}],
            "callback": {"url": f"http://127.0.0.1:{hook.port}/hook"}}}).get(timeout=120)
        assert result["status"] == "push_failed" and "push failed" in result["error"], result
        wait_until(lambda: len(hook.bodies) >= 2, 60, "the webhook's second attempt")
        valkey.stop()  # the worker and beat lose Valkey: they log it, beat with tracebacks

        def tracebacks() -> int:
            return sum((tmp_path / name).read_text().count("Traceback") for name in ("w1.log", "beat.log"))

        wait_until(tracebacks, 30, "a traceback in the logs")
        valkey = Valkey(port=valkey.port, data_dir=tmp_path / "valkey", password=VALKEY_PASSWORD, persistence=True)
        guarded_valkey.append(valkey)
        for args in (["agents", "--all", "--json"], ["agents", "--all"], ["show", result["agent_id"], "--json"],
                     ["show", result["agent_id"]], ["callbacks", "--json"], ["budget", "--json"],
                     ["rejected", "--json"], ["killswitch", "status", "--json"]):
            proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                                  text=True, timeout=60, cwd=REPO_ROOT)
            assert proc.returncode == 0, proc.stderr
            outputs += [proc.stdout, proc.stderr]
        time.sleep(1)
    finally:
        coordinator.close()
        for p in procs:
            p.stop()
        hook.stop()
    worker_log = (tmp_path / "w1.log").read_text()
    assert "Traceback" in worker_log + (tmp_path / "beat.log").read_text()
    assert "refused by policy" in json.dumps(result) or "push failed" in json.dumps(result)
    found = {
        "result": leaks(json.dumps(result)),
        "webhook bodies": leaks(b"".join(hook.bodies).decode()),
        "cli": leaks("\n".join(outputs)),
        "worker log": leaks(worker_log),
        "beat log": leaks((tmp_path / "beat.log").read_text()),
        "valkey": leaks(all_values(valkey)),
    }
    assert found == {name: [] for name in found}, found
