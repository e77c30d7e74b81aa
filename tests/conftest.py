"""Shared fixtures: a real valkey-server, the offline model over HTTP, real Celery workers, sample repos.

A missing valkey-server fails the run (it never skips): the fleet is only tested against the real thing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from celery import Celery

from orchestrator.settings import STATE_DB, Settings
from orchestrator.testing.cluster import Beat, Valkey, Worker, close_coordinator, fleet_env, wait_until
from orchestrator.testing.offline_model import OfflineModel
from orchestrator.testing.sample_repo import make_sample_repo

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[Valkey]:
    server = Valkey()
    yield server
    server.stop()


@pytest.fixture
def valkey(valkey_server: Valkey) -> Valkey:
    """A clean valkey-server (flushed before each test)."""
    with valkey_server.client() as c:
        c.flushall()
    return valkey_server


@pytest.fixture(scope="session")
def model_server() -> Iterator[OfflineModel]:
    server = OfflineModel().start()
    yield server
    server.stop()


@pytest.fixture
def offline(model_server: OfflineModel) -> OfflineModel:
    """The offline Messages API, log cleared."""
    model_server.reset()
    model_server.latency = 0.0
    return model_server


@pytest.fixture
def sample_repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path / "repo")


@pytest.fixture
def fake_redis() -> redis.Redis:
    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def unit_settings(tmp_path: Path) -> Settings:
    return Settings(workspace_dir=tmp_path / "ws", _env_file=None)  # type: ignore[call-arg]


class Cluster:
    """Workers (and beat) started by a test, a coordinator client, and the CLI, all on one Valkey."""

    def __init__(self, valkey: Valkey, offline: OfflineModel, tmp: Path) -> None:
        self.valkey = valkey
        self.offline = offline
        self.tmp = tmp
        self.workspace = tmp / "workspace"
        self.procs: list[Worker | Beat] = []
        self.settings: dict[str, Any] = {"heartbeat_interval_seconds": 1}
        self.extra_env: dict[str, str] = {}
        self.coordinator = Celery(broker=valkey.url, backend=valkey.url.rsplit("/", 1)[0] + "/1")
        self.coordinator.conf.result_expires = 3600

    def env(self, **settings: Any) -> dict[str, str]:
        env = fleet_env(self.valkey.url, self.workspace, self.offline.url, **{**self.settings, **settings})
        env.update(self.extra_env)
        return env

    def worker(self, name: str = "w1", concurrency: int = 2, wait: bool = True, queues: str = "agents,ops",
               pool: str = "prefork", **settings: Any) -> Worker:
        w = Worker(self.env(**settings), f"{name}@%h", concurrency=concurrency, queues=queues,
                   log_path=self.tmp / f"{name}.log", pool=pool)
        self.procs.append(w)
        return w.wait_ready() if wait else w

    def beat(self, **settings: Any) -> Beat:
        b = Beat(self.env(**settings), log_path=self.tmp / "beat.log")
        self.procs.append(b)
        return b

    def submit(self, spec: dict[str, Any]) -> Any:
        """What a coordinator does (CONTRACT section 1)."""
        return self.coordinator.send_task("orchestrator.spawn_agent", kwargs={"spec": spec}, queue="agents")

    def cli(self, *args: str, check: bool = True, **settings: Any) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=self.env(**settings),
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"orchestrator {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def cli_json(self, *args: str, **settings: Any) -> Any:
        return json.loads(self.cli(*args, "--json", **settings).stdout)

    def state(self) -> redis.Redis:
        """The fleet's own state (records, ledger, leases): its own database on the broker's server."""
        return self.valkey.client(STATE_DB)

    def record(self, agent_id: str) -> dict[str, Any]:
        return self.cli_json("show", agent_id)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        try:
            return wait_until(predicate, timeout, what)
        except TimeoutError as exc:
            raise AssertionError(str(exc)) from None

    def agent_for(self, task_id: str, timeout: float = 30.0) -> str:
        with self.state() as r:
            return str(self.wait_for(lambda: r.get(f"orch:task:{task_id}"), timeout, f"agent of {task_id}"))

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        close_coordinator(self.coordinator)


@pytest.fixture
def cluster(valkey: Valkey, offline: OfflineModel, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(valkey, offline, tmp_path)
    yield c
    c.stop()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def mirror_of(workspace: Path) -> Path:
    mirrors = list((workspace / "mirrors").glob("*.git"))
    assert len(mirrors) == 1, mirrors
    return mirrors[0]


def env_without_fleet() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
