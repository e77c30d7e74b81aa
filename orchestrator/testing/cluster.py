"""Real processes for the demo, the tests and the benchmarks: valkey-server, Celery workers, beat.

Every process starts in its own session (process group) and ``stop()`` kills the whole group, so nothing is
left running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_valkey() -> str | None:
    """The ``valkey-server`` binary, else ``redis-server``, else None."""
    return shutil.which("valkey-server") or shutil.which("redis-server")


class Proc:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, argv: list[str], env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="proc-", suffix=".log")[1])
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, env=dict(env) if env is not None else None, stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                      cwd=cwd)

    @property
    def pid(self) -> int:
        """The leader's pid (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the leader still runs."""
        return self.popen.poll() is None

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        """Block until ``text`` appears in the log; raise with the log if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if not self.alive():
                raise RuntimeError(f"{self.argv[0]} exited early:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not seen in {timeout}s from {self.argv}:\n{self.log()[-4000:]}")

    def signal(self, sig: int, group: bool = True) -> None:
        """Send a signal to the process (or its whole group)."""
        try:
            if group:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL it after ``timeout``; always leaves nothing running."""
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


class Valkey(Proc):
    """A valkey-server on a free loopback port."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None, persistence: bool = False,
                 password: str | None = None) -> None:
        binary = find_valkey()
        if binary is None:
            raise RuntimeError("valkey-server not found: install it (bookworm-backports: valkey-server)")
        self.port = port or free_port()
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="valkey-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.password = password
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--maxmemory-policy", "noeviction", "--daemonize", "no"]
        if persistence:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--save", "", "--appendonly", "no"]
        if password:
            argv += ["--requirepass", password]
        super().__init__(argv, log_path=self.data_dir / "valkey.log")
        self.wait_ready()

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        """A client on one database."""
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, decode_responses=True)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers PING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.RedisError:
                if not self.alive():
                    raise RuntimeError(f"valkey-server exited:\n{self.log()[-2000:]}") from None
                time.sleep(0.05)
        raise TimeoutError("valkey-server did not answer PING")


def fleet_env(broker_url: str, workspace: Path, model_url: str | None, **settings: object) -> dict[str, str]:
    """Environment for fleet processes: broker, workspace, offline model, and ``ORCHESTRATOR_*`` overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "CELERY_"))}
    env.update({"ORCHESTRATOR_BROKER_URL": broker_url, "ORCHESTRATOR_WORKSPACE_DIR": str(workspace),
                "PYTHONUNBUFFERED": "1"})
    if model_url:
        env["ANTHROPIC_BASE_URL"] = model_url
        env["ANTHROPIC_API_KEY"] = "offline-model-key"
    for name, value in settings.items():
        env[f"ORCHESTRATOR_{name.upper()}"] = str(value)
    return env


class Worker(Proc):
    """``celery -A orchestrator worker`` (prefork) serving the agents and ops queues."""

    def __init__(self, env: Mapping[str, str], name: str, concurrency: int = 2, queues: str = "agents,ops",
                 log_path: Path | None = None) -> None:
        self.name = name
        argv = [sys.executable, "-m", "celery", "-A", "orchestrator", "worker", "-P", "prefork", "-c",
                str(concurrency), "-Q", queues, "-n", name, "--without-mingle", "--without-gossip",
                "--loglevel", "INFO"]
        super().__init__(argv, env=env, log_path=log_path)

    def wait_ready(self, timeout: float = 60.0) -> Worker:
        """Block until the worker reports ready."""
        self.wait_for_log(" ready.", timeout)
        return self


class Beat(Proc):
    """``celery -A orchestrator beat`` with its schedule file in a temp dir."""

    def __init__(self, env: Mapping[str, str], log_path: Path | None = None) -> None:
        schedule = Path(tempfile.mkdtemp(prefix="beat-")) / "schedule"
        argv = [sys.executable, "-m", "celery", "-A", "orchestrator", "beat", "-s", str(schedule),
                "--loglevel", "INFO"]
        super().__init__(argv, env=env, log_path=log_path)
