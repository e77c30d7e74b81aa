"""Flower: the auth guard, and a real Flower process watching a real worker, through its API and in Chromium."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.flower_guard import check_flower_auth, is_flower_invocation
from orchestrator.testing.cluster import Proc, free_port
from orchestrator.testing.offline_model import OfflineModel
from tests.conftest import REPO_ROOT, Cluster

CELERY = "/venv/bin/celery"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
USER, PASSWORD = "admin", "secret"
ARTIFACTS = REPO_ROOT / "artifacts"


# -- the guard ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [CELERY, "-A", "orchestrator", "flower"],
    [CELERY, "-A", "orchestrator", "flower", "--port=5555", "--address=0.0.0.0"],
    ["/usr/lib/python3/site-packages/celery/__main__.py", "-A", "orchestrator", "flower"],
    ["/venv/lib/python3.11/site-packages/flower/__main__.py", "-A", "orchestrator", "flower"],
    [CELERY, "--app=orchestrator", "-b", "redis://h/0", "--quiet", "flower"],
    [CELERY, "-A", "orchestrator", "flower", "--basic-auth="],  # empty value
])
def test_guard_refuses_flower_without_auth(argv: list[str]) -> None:
    message = check_flower_auth(argv, {}, allow_unauthenticated=False)
    assert message is not None and "FLOWER_BASIC_AUTH" in message
    assert "ORCHESTRATOR_FLOWER_ALLOW_UNAUTHENTICATED" in message
    assert check_flower_auth(argv, {}, allow_unauthenticated=True) is None


@pytest.mark.parametrize(("extra", "env"), [
    ([], {"FLOWER_BASIC_AUTH": "admin:secret"}),
    ([], {"FLOWER_BASIC_AUTH": "admin:secret,ops:other"}),
    ([], {"FLOWER_AUTH": r".*@example\.com"}),
    (["--basic-auth=admin:secret"], {}),
    (["--basic_auth=admin:secret"], {}),
    (["--auth=.*@example.com"], {}),
    (["--port=1", "--basic-auth=admin:secret"], {"FLOWER_BASIC_AUTH": ""}),
])
def test_guard_accepts_flower_with_auth(extra: list[str], env: dict[str, str]) -> None:
    assert check_flower_auth([CELERY, "-A", "orchestrator", "flower", *extra], env, False) is None


@pytest.mark.parametrize("credentials", ["admin", "admin:", ":secret", "admin:secret,ops", " "])
def test_guard_refuses_credentials_without_user_or_password(credentials: str) -> None:
    message = check_flower_auth([CELERY, "-A", "orchestrator", "flower"], {"FLOWER_BASIC_AUTH": credentials}, False)
    assert message is not None and "refusing" in message


@pytest.mark.parametrize("argv", [
    [CELERY, "-A", "orchestrator", "worker", "-n", "flower@host"],
    [CELERY, "-A", "flower", "worker"],  # an app named flower is not the flower command
    [CELERY, "-A", "orchestrator", "beat"],
    [CELERY, "-A", "orchestrator", "control", "kill_agent", "flower"],
    ["/venv/bin/orchestrator", "agents"],
    ["/venv/bin/pytest", "tests/test_flower.py", "flower"],
    [CELERY],
    [],
])
def test_guard_ignores_other_commands(argv: list[str]) -> None:
    assert not is_flower_invocation(argv)
    assert check_flower_auth(argv, {}, allow_unauthenticated=False) is None


# -- a real Flower process ---------------------------------------------------------------------------------
class Flower:
    """``celery -A orchestrator flower`` with basic auth on a free loopback port."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in cluster.env().items() if not k.startswith("FLOWER_")}
        env["FLOWER_BASIC_AUTH"] = f"{USER}:{PASSWORD}"
        self.proc = Proc([sys.executable, "-m", "celery", "-A", "orchestrator", "flower", f"--port={self.port}",
                          "--address=127.0.0.1"], env=env, log_path=tmp / "flower.log", cwd=REPO_ROOT)

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def api(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def wait_for_worker(self, cluster: Cluster, worker: str) -> None:
        """Until Flower's event receiver has seen the worker's heartbeat events (it then sees task events too)."""
        def seen() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"flower exited:\n{self.proc.log()[-3000:]}")
            try:
                return bool(self.api("/api/workers?status=1").get(worker))
            except (urllib.error.URLError, ConnectionError):
                return False
        cluster.wait_for(seen, timeout=60, what=f"flower seeing worker {worker}")


@pytest.fixture
def flower(cluster: Cluster, tmp_path: Path) -> Iterator[Flower]:
    f = Flower(cluster, tmp_path)
    yield f
    f.proc.stop()


def run_agent(cluster: Cluster, flower: Flower, sample_repo: Path, task_id: str) -> tuple[str, dict[str, Any]]:
    """A worker, Flower watching it, one agent to completion; returns the worker's name and the result."""
    worker = cluster.worker().name.replace("%h", socket.gethostname())
    flower.wait_for_worker(cluster, worker)
    pending = cluster.submit({"task_id": task_id, "prompt": "Fix the failing test.", "repo": str(sample_repo)})
    result = pending.get(timeout=90)
    assert result["status"] == "completed", result
    assert pending.id
    return worker, {**result, "celery_id": pending.id}


def test_flower_api_shows_worker_and_task(cluster: Cluster, flower: Flower, sample_repo: Path,
                                          offline: OfflineModel) -> None:
    worker, result = run_agent(cluster, flower, sample_repo, "flower-api-1")

    workers = flower.api("/api/workers?refresh=1")
    assert worker in workers, list(workers)
    assert {"agents", "ops"} <= {q["name"] for q in workers[worker]["active_queues"]}

    def task() -> dict[str, Any] | None:
        tasks = flower.api("/api/tasks?taskname=orchestrator.spawn_agent")
        found: dict[str, Any] | None = tasks.get(result["celery_id"])
        return found if found and found.get("state") == "SUCCESS" else None

    t = cluster.wait_for(task, timeout=30, what="flower listing the task as SUCCESS")
    assert t["name"] == "orchestrator.spawn_agent" and t["worker"] == worker
    assert "flower-api-1" in t["kwargs"] and result["agent_id"] in str(t["result"])

    for path in ("/api/workers", "/api/tasks", "/tasks", "/"):
        assert flower.get(path, auth=None)[0] == 401, path
        assert flower.get(path, auth=(USER, "wrong"))[0] == 401, path


def _chromium_or_skip() -> None:
    """A missing chromium (or playwright) fails in CI and skips elsewhere."""
    missing = [what for what, ok in (("chromium", os.access(CHROMIUM, os.X_OK)),
                                     ("playwright", importlib.util.find_spec("playwright") is not None)) if not ok]
    if missing:
        message = f"{' and '.join(missing)} missing: apt-get install -y chromium; pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_flower_tasks_page_in_headless_chromium(cluster: Cluster, flower: Flower, sample_repo: Path,
                                                offline: OfflineModel) -> None:
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    _, result = run_agent(cluster, flower, sample_repo, "flower-ui-1")
    uuid = result["celery_id"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-tasks.png"
    shot.unlink(missing_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                          viewport={"width": 1600, "height": 900})
            page = context.new_page()
            response = page.goto(f"{flower.base}/tasks", wait_until="domcontentloaded")
            assert response is not None and response.status == 200
            deadline = time.monotonic() + 30
            while uuid not in page.inner_text("body"):  # the table fills in by AJAX; reload until it shows the task
                assert time.monotonic() < deadline, f"task {uuid} not shown:\n{page.inner_text('body')[:2000]}"
                page.wait_for_timeout(1000)
                if uuid not in page.inner_text("body"):
                    page.reload(wait_until="domcontentloaded")
            row = page.locator("tr", has_text=uuid)
            assert "SUCCESS" in row.inner_text() and "orchestrator.spawn_agent" in row.inner_text()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000


def test_flower_refuses_to_start_without_auth(cluster: Cluster, tmp_path: Path) -> None:
    env = {k: v for k, v in cluster.env().items() if not k.startswith("FLOWER_")}
    proc = Proc([sys.executable, "-m", "celery", "-A", "orchestrator", "flower", f"--port={free_port()}",
                 "--address=127.0.0.1"], env=env, log_path=tmp_path / "flower-open.log", cwd=REPO_ROOT)
    try:
        assert proc.popen.wait(60) != 0
        assert "refusing to start Flower without authentication" in proc.log()
    finally:
        proc.stop()
    allowed = Proc([sys.executable, "-m", "celery", "-A", "orchestrator", "flower", f"--port={free_port()}",
                    "--address=127.0.0.1"], env={**env, "ORCHESTRATOR_FLOWER_ALLOW_UNAUTHENTICATED": "true"},
                   log_path=tmp_path / "flower-allowed.log", cwd=REPO_ROOT)
    try:
        allowed.wait_for_log("Visit me at", 60)
    finally:
        allowed.stop()
