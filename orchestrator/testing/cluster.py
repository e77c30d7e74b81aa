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
from urllib.parse import quote

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


def close_coordinator(app: Any) -> None:
    """Close a coordinator's Celery app, its result subscription first, while Valkey still runs.

    Otherwise ``AsyncResult.__del__`` at interpreter exit tries to unsubscribe through a dead connection and raises
    an unraisable error.
    """
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None:
        with contextlib.suppress(Exception):
            consumer.stop()
        consumer.subscribed_to.clear()  # nothing left to unsubscribe from later
    app.close()


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
                 password: str | None = None, replica_of: int | None = None) -> None:
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
            argv += ["--requirepass", password, "--masterauth", password]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
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


def _conf_quote(value: str) -> str:
    """A value for a valkey config file, double-quoted with its backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SentinelNode(Proc):
    """``valkey-server sentinel.conf --sentinel`` on a free loopback port, watching one master."""

    def __init__(self, master_port: int, master_name: str = "mymaster", password: str | None = None, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000, data_dir: Path | None = None) -> None:
        binary = find_valkey()
        if binary is None:
            raise RuntimeError("valkey-server not found: install it (bookworm-backports: valkey-server)")
        self.port = free_port()
        self.password = password
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="sentinel-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {_conf_quote(str(self.data_dir))}",
                 f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}",
                 f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
                 f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
                 f"sentinel parallel-syncs {master_name} 1"]
        if password:
            # The master's password (auth-pass), this sentinel's (requirepass), the other sentinels' (sentinel-pass).
            q = _conf_quote(password)
            lines += [f"sentinel auth-pass {master_name} {q}", f"requirepass {q}", f"sentinel sentinel-pass {q}"]
        conf = self.data_dir / "sentinel.conf"  # sentinel rewrites it: it must be its own, writable file
        conf.write_text("\n".join(lines) + "\n")
        super().__init__([binary, str(conf), "--sentinel"], log_path=self.data_dir / "sentinel.log")
        self.wait_ready()

    def client(self) -> redis.Redis:
        """A client of this sentinel."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True,
                           socket_timeout=5)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the sentinel answers PING."""
        def ping() -> bool:
            try:
                with self.client() as c:
                    return bool(c.ping())
            except redis.RedisError:
                if not self.alive():
                    raise RuntimeError(f"sentinel exited:\n{self.log()[-2000:]}") from None
                return False
        wait_until(ping, timeout, f"sentinel on port {self.port}")


def wait_replicas_online(primary: Valkey, count: int, timeout: float = 30.0) -> None:
    """Block until ``primary`` has ``count`` replicas online (initial sync done)."""
    def synced() -> bool:
        with primary.client() as c:
            info = c.info("replication")
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online"]
        return info.get("role") == "master" and len(online) >= count
    wait_until(synced, timeout, f"{count} replica(s) online", interval=0.1)


class SentinelGroup:
    """A primary, its replicas and a quorum of sentinels on loopback: Valkey HA for tests and drills.

    Every process has its own process group; ``stop()`` ends them all.
    """

    def __init__(self, replicas: int = 1, sentinels: int = 3, master_name: str = "mymaster",
                 password: str | None = None, down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                 root: Path | None = None) -> None:
        self.master_name = master_name
        self.password = password
        self.root = root or Path(tempfile.mkdtemp(prefix="sentinel-group-"))
        self.servers: list[Valkey] = []
        self.sentinels: list[SentinelNode] = []
        try:
            primary = Valkey(password=password, data_dir=self.root / "primary")
            self.servers.append(primary)
            for i in range(replicas):
                self.servers.append(Valkey(password=password, replica_of=primary.port,
                                           data_dir=self.root / f"replica-{i}"))
            wait_replicas_online(primary, replicas)
            for i in range(sentinels):
                self.sentinels.append(SentinelNode(primary.port, master_name, password, quorum=sentinels // 2 + 1,
                                                   down_after_ms=down_after_ms,
                                                   failover_timeout_ms=failover_timeout_ms,
                                                   data_dir=self.root / f"sentinel-{i}"))
            self.wait_settled(replicas)
        except BaseException:
            self.stop()
            raise

    # -- addresses ------------------------------------------------------------------------------------------
    def url(self, db: int | None = None) -> str:
        """The ``sentinel://`` list of every sentinel (password percent-encoded), with ``db`` on each entry."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        path = f"/{db}" if db is not None else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}{path}" for s in self.sentinels)

    def master_port(self) -> int | None:
        """The master's port as the first answering sentinel names it (None if none answers)."""
        for node in self.sentinels:
            if not node.alive():
                continue
            try:
                with node.client() as c:
                    addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        return None

    def server(self, port: int) -> Valkey:
        """The data server listening on ``port``."""
        return next(s for s in self.servers if s.port == port)

    @property
    def primary(self) -> Valkey:
        """The server the sentinels name as master now."""
        port = self.master_port()
        if port is None:
            raise RuntimeError("no sentinel names a master")
        return self.server(port)

    # -- readiness ------------------------------------------------------------------------------------------
    def wait_settled(self, replicas: int, timeout: float = 30.0) -> None:
        """Block until every live sentinel knows the master, its replicas and every other live sentinel."""
        live = [s for s in self.sentinels if s.alive()]

        def known() -> bool:
            for node in live:
                try:
                    with node.client() as c:
                        peers = c.execute_command("SENTINEL", "SENTINELS", self.master_name)
                        seen = c.execute_command("SENTINEL", "REPLICAS", self.master_name)
                except redis.RedisError:
                    return False
                up = [r for r in seen if "s_down" not in _flags(r) and "disconnected" not in _flags(r)]
                if len(peers) < len(live) - 1 or len(up) < replicas:
                    return False
            return True
        wait_until(known, timeout, "sentinels to know each other and the replicas", interval=0.2)

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> int:
        """Block until the sentinels name a master other than ``old_port`` that answers as master; its port."""
        def promoted() -> int | None:
            port = self.master_port()
            if port is None or port == old_port:
                return None
            with contextlib.suppress(redis.RedisError), self.server(port).client() as c:
                if c.info("replication").get("role") == "master":
                    return port
            return None
        return int(wait_until(promoted, timeout, "a failover", interval=0.05))

    # -- faults ---------------------------------------------------------------------------------------------
    def kill_primary(self) -> Valkey:
        """SIGKILL the current master (no shutdown, no last write to anyone); returns it."""
        victim = self.primary
        victim.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            victim.popen.wait(5)
        return victim

    def shutdown_primary(self) -> Valkey:
        """SIGTERM the current master: valkey-server waits for its replicas to catch up, then exits; returns it."""
        victim = self.primary
        victim.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            victim.popen.wait(15)
        return victim

    def stop(self) -> None:
        """Stop every sentinel and server; nothing is left running."""
        for proc in [*self.sentinels, *self.servers]:
            proc.stop(timeout=5)


def _flags(entry: Any) -> str:
    """The ``flags`` field of one ``SENTINEL REPLICAS`` entry (a flat [key, value, ...] list or a dict)."""
    if isinstance(entry, dict):
        return str(entry.get("flags", ""))
    pairs = dict(zip(entry[::2], entry[1::2], strict=False))
    return str(pairs.get("flags", ""))


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
    """``celery -A orchestrator worker`` (prefork unless ``pool`` says otherwise) serving the agents and ops queues."""

    def __init__(self, env: Mapping[str, str], name: str, concurrency: int = 2, queues: str = "agents,ops",
                 log_path: Path | None = None, pool: str = "prefork") -> None:
        self.name = name
        argv = [sys.executable, "-m", "celery", "-A", "orchestrator", "worker", "-P", pool, "-c",
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
