"""Shared setup for the benchmarks: real processes on loopback, rows of results, statistics and the table.

A :class:`Harness` owns everything a benchmark run starts (valkey-server, Celery workers, offline model servers,
temporary repositories) and :meth:`Harness.close` stops all of it, so a run never leaves a process behind, also
when a benchmark fails or the run is interrupted (SIGINT, SIGTERM).

A benchmark is a :class:`Benchmark`: a name and a function ``run(harness) -> list[Row]``. Every :class:`Row` holds
one measured value and, when it has one, the baseline it is compared with *in the same run*; the table shows
``ratio = value / baseline``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import redis
from celery import Celery
from celery.result import AsyncResult
from rich.console import Console
from rich.table import Table

from orchestrator.settings import STATE_DB
from orchestrator.testing import offline_model
from orchestrator.testing.cluster import Beat, Proc, Valkey, Worker, fleet_env, free_port, wait_until
from orchestrator.testing.offline_model import OfflineModel, Script
from orchestrator.testing.sample_repo import make_sample_repo

SPAWN_TASK = "orchestrator.spawn_agent"
AGENTS_QUEUE = "agents"
P = TypeVar("P", bound=Proc)


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Row:
    """One measured value, optionally against a baseline measured in the same run."""

    benchmark: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """``value / baseline_value`` (None without a baseline)."""
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form, ratio included."""
        return {**asdict(self), "ratio": self.ratio}


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: ``run`` measures and returns its rows."""

    name: str
    description: str
    run: Callable[[Harness], list[Row]]


@dataclass
class Outcome:
    """What one benchmark produced (or why it failed) and how long it took."""

    benchmark: Benchmark
    rows: list[Row] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    """The median (values must not be empty)."""
    return float(statistics.median(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``p`` percent of the values at or below it.

    With fewer than 100 samples the p99 is the maximum.
    """
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``min-max of n`` for a note."""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))} over {len(values)} runs"


class CountingRedis(redis.Redis):
    """A Valkey client that counts its commands (round trips: no pipelines on the paths measured) and their time."""

    commands = 0
    seconds = 0.0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command, counted and timed."""
        start = time.perf_counter()
        try:
            return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        finally:
            self.commands += 1
            self.seconds += time.perf_counter() - start


# ---------------------------------------------------------------------------------------- offline model


def disable_nagle() -> None:
    """Send the offline model's responses without Nagle's algorithm (TCP_NODELAY on its sockets).

    The offline model writes each SSE event of a stream as its own small segment; with Nagle on, the server
    holds back a segment until the previous one is acknowledged, and the client's delayed ACK makes that about
    40 ms per response on Linux loopback. That wait belongs to the test server, not to the fleet, and at ~40 ms
    a turn it would hide the overhead these benchmarks measure. Applied to this process's offline model class
    (a no-op once the library sets it itself); ``--offline-nagle`` keeps the library's default.
    """
    handler = offline_model._Handler
    if not getattr(handler, "disable_nagle_algorithm", False):
        handler.disable_nagle_algorithm = True


class ModelServer(Proc):
    """The offline model in its own process (``python -m benchmarks.model_server``) with the given scripts.

    Turn-rate benchmarks use it so that the model server never shares a GIL with the loop it serves: the fleet's
    agent runs in a worker process, and the in-process baselines must not be slowed by a server thread either.
    """

    def __init__(self, scripts: Mapping[str, Script], directory: Path, nagle: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        script_file = directory / "scripts.json"
        script_file.write_text(json.dumps({name: s.to_dict() for name, s in scripts.items()}))
        self.port = free_port()
        argv = [sys.executable, "-m", "benchmarks.model_server", "--port", str(self.port),
                "--script-file", str(script_file)]
        if nagle:
            argv.append("--nagle")
        super().__init__(argv, log_path=directory / "model-server.log", cwd=Path(__file__).resolve().parent.parent)

    def wait_ready(self, timeout: float = 30.0) -> ModelServer:
        """Block until the server listens."""
        self.wait_for_log("listening on", timeout)
        return self

    @property
    def url(self) -> str:
        """Base URL for the SDK."""
        return f"http://127.0.0.1:{self.port}"

    def calls(self, agent: str | None = None) -> list[dict[str, Any]]:
        """The server's call log (``GET /_offline/calls``), optionally only one agent's calls."""
        with urllib.request.urlopen(f"{self.url}/_offline/calls", timeout=10) as response:
            calls: list[dict[str, Any]] = json.loads(response.read())
        return [c for c in calls if agent is None or c.get("agent") == agent]

    def reset(self) -> None:
        """Forget the server's call log (``POST /_offline/reset``)."""
        request = urllib.request.Request(f"{self.url}/_offline/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def open_streams(self, turn: int | None = None) -> int:
        """Streaming calls in progress (optionally only those answering turn ``turn``), from the call log."""
        return sum(1 for c in self.calls() if c.get("stream") and c.get("status") == "open"
                   and (turn is None or c.get("turn") == turn))


# ------------------------------------------------------------------------------------------------ harness


class Harness:
    """Processes, repositories and clients shared by the benchmarks of one run; ``close()`` stops everything."""

    def __init__(self, quick: bool = False, nagle: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.quick = quick
        self.nagle = nagle
        self.log = log or (lambda message: print(f"==> {message}", file=sys.stderr, flush=True))
        self.run_id = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
        self._ids = itertools.count(1)
        self._valkey: Valkey | None = None
        self._offline: OfflineModel | None = None
        self._coordinator: Celery | None = None
        self._procs: list[Proc] = []
        if not nagle:
            disable_nagle()

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process and server this harness started and remove its temporary files."""
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self._procs.clear()
        if self._coordinator is not None:
            with contextlib.suppress(Exception):
                self._coordinator.close()
            self._coordinator = None
        if self._offline is not None:
            with contextlib.suppress(Exception):
                self._offline.stop()
            self._offline = None
        if self._valkey is not None:
            with contextlib.suppress(Exception):
                self._valkey.stop()
            self._valkey = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- shared services (started on first use) ----------------------------------------------------------
    @property
    def valkey(self) -> Valkey:
        """A valkey-server on a free loopback port, without persistence."""
        if self._valkey is None:
            self._valkey = Valkey(data_dir=self.tmp / "valkey")
        return self._valkey

    @property
    def coordinator(self) -> Celery:
        """A plain Celery client, as a coordinator has (it does not import the fleet's app)."""
        if self._coordinator is None:
            backend = self.valkey.url.rsplit("/", 1)[0] + "/1"
            self._coordinator = Celery(broker=self.valkey.url, backend=backend)
            self._coordinator.conf.result_expires = 3600
        return self._coordinator

    def counting_client(self) -> CountingRedis:
        """A client on the run's Valkey (database 0) that counts its round trips."""
        return CountingRedis(host="127.0.0.1", port=self.valkey.port, decode_responses=True)

    def fresh_state(self) -> None:
        """Empty Valkey; call it only while no worker runs."""
        with self.valkey.client() as c:
            c.flushall()

    # -- processes -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def worker(self, model_url: str, name: str = "bench", concurrency: int = 2,
               **settings: Any) -> Iterator[Worker]:
        """A prefork worker on the agents and ops queues, talking to ``model_url``; stopped on exit.

        ``settings`` become ``ORCHESTRATOR_*`` variables (``heartbeat_interval_seconds`` defaults to 1).
        """
        env = fleet_env(self.valkey.url, self.tmp / "workspace", model_url,
                        **{"heartbeat_interval_seconds": 1, **settings})
        n = next(self._ids)
        worker = Worker(env, f"{name}{n}@%h", concurrency=concurrency, log_path=self.tmp / f"worker-{name}{n}.log")
        self._procs.append(worker)
        try:
            worker.wait_ready()
            yield worker
        finally:
            worker.stop()
            self._procs.remove(worker)

    @contextlib.contextmanager
    def offline_model(self, scripts: Mapping[str, Script]) -> Iterator[OfflineModel]:
        """The offline model served from a thread of this process (read its ``calls()`` directly); stopped on exit.

        Only for benchmarks where this process waits while the fleet works (the server would otherwise share a GIL
        with the loop it serves); turn-rate benchmarks use :meth:`model_server`.
        """
        model = OfflineModel(scripts).start()
        self._offline = model
        try:
            yield model
        finally:
            model.stop()
            self._offline = None

    @contextlib.contextmanager
    def model_server(self, scripts: Mapping[str, Script]) -> Iterator[ModelServer]:
        """The offline model in its own process, serving ``scripts``; stopped on exit."""
        server = ModelServer(scripts, self.tmp / f"model-{next(self._ids)}", self.nagle)
        self._procs.append(server)
        try:
            yield server.wait_ready()
        finally:
            server.stop()
            self._procs.remove(server)

    # -- helpers ---------------------------------------------------------------------------------------
    def unique(self, prefix: str) -> str:
        """A task id no other run (of this or an earlier benchmark run) uses."""
        return f"{prefix}-{self.run_id}-{next(self._ids)}"

    def sample_repo(self, name: str) -> Path:
        """A fresh sample git repository (branch ``main``) under the run's temp dir."""
        return make_sample_repo(self.tmp / "repos" / name)

    def submit(self, spec: Any, timeout: float) -> dict[str, Any]:
        """What a coordinator does: ``send_task("orchestrator.spawn_agent", kwargs={"spec": spec})``, ``get()``.

        Every send gets its own Celery task id (the spec's ``task_id`` is up to the caller).
        """
        result = self.coordinator.send_task(SPAWN_TASK, kwargs={"spec": spec}, queue=AGENTS_QUEUE,
                                            task_id=self.unique("celery"))
        try:
            out: dict[str, Any] = result.get(timeout=timeout)
            return out
        finally:
            # Unsubscribe now, while Valkey is up: an AsyncResult left for the garbage collector (say, in the
            # traceback of an interrupted run) would otherwise retry against the stopped server for a minute.
            with contextlib.suppress(Exception):
                result.backend.remove_pending_result(result)

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate`` until it returns something truthy."""
        return wait_until(predicate, timeout, what, interval=0.01)

    # -- more processes and helpers (killswitch and health benchmarks) -----------------------------------------
    def env(self, model_url: str | None, **settings: Any) -> dict[str, str]:
        """The environment of a fleet process on this run's Valkey and workspace (as :meth:`worker` builds it)."""
        return fleet_env(self.valkey.url, self.tmp / "workspace", model_url,
                         **{"heartbeat_interval_seconds": 1, **settings})

    @contextlib.contextmanager
    def started(self, make: Callable[[], P]) -> Iterator[P]:
        """Own the process ``make()`` starts: it is stopped on exit, and by :meth:`close` whatever happens.

        Unlike :meth:`worker` it does not wait for readiness, so several processes can start at once.
        """
        proc = make()
        self._procs.append(proc)
        try:
            yield proc
        finally:
            proc.stop()
            if proc in self._procs:
                self._procs.remove(proc)

    def queue_worker(self, model_url: str, name: str, concurrency: int, queues: str, **settings: Any) -> Worker:
        """A prefork worker (not yet ready) on the given queues; start it with ``h.started(lambda: ...)``."""
        n = next(self._ids)
        return Worker(self.env(model_url, **settings), f"{name}{n}@%h", concurrency=concurrency, queues=queues,
                      log_path=self.tmp / f"worker-{name}{n}.log")

    @contextlib.contextmanager
    def beat(self, **settings: Any) -> Iterator[Beat]:
        """``celery beat`` with the fleet's schedule (intervals from ``settings``); stopped on exit."""
        made: list[Beat] = []

        def make() -> Beat:
            made.append(Beat(self.env(None, **settings), log_path=self.tmp / f"beat-{next(self._ids)}.log"))
            return made[-1]

        try:
            with self.started(make) as beat:
                yield beat
        finally:
            for beat in made:  # Beat keeps its schedule file in a temp dir of its own
                schedule = beat.argv[beat.argv.index("-s") + 1]
                shutil.rmtree(Path(schedule).parent, ignore_errors=True)

    def send(self, spec: Any) -> AsyncResult:
        """``send_task`` without waiting (its own Celery task id); give the result to :meth:`forget` when done."""
        result: AsyncResult = self.coordinator.send_task(SPAWN_TASK, kwargs={"spec": spec}, queue=AGENTS_QUEUE,
                                                         task_id=self.unique("celery"))
        return result

    def forget(self, results: Sequence[AsyncResult]) -> None:
        """Stop listening for these results (do it while Valkey is up; see :meth:`submit`)."""
        for result in results:
            with contextlib.suppress(Exception):
                result.backend.remove_pending_result(result)

    def flush_fleet_state(self, prefix: str = "orch:") -> int:
        """Delete the fleet's keys (``prefix*``) but not Celery's queues and bindings: safe while idle workers
        run, unlike :meth:`fresh_state`. Returns how many keys went."""
        deleted = 0
        with self.valkey.client(STATE_DB) as c:
            batch: list[str] = []
            for key in c.scan_iter(match=f"{prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += int(c.delete(*batch))
                    batch.clear()
            if batch:
                deleted += int(c.delete(*batch))
        return deleted


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the block runs, so ``finally`` clauses stop our processes."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -------------------------------------------------------------------------------------------------- table


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def render_table(outcomes: Sequence[Outcome], title: str) -> Table:
    """The results as a rich table: one line per row, ``ratio = value / baseline``."""
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("benchmark", no_wrap=True)
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("baseline (same run)")
    table.add_column("baseline value", justify="right", no_wrap=True)
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("note")
    for outcome in outcomes:
        if outcome.error is not None:
            table.add_row(outcome.benchmark.name, "FAILED", "-", "-", "-", "-", outcome.error)
            continue
        for i, row in enumerate(outcome.rows):
            ratio = row.ratio
            table.add_row(
                row.benchmark if i == 0 or row.benchmark != outcome.rows[i - 1].benchmark else "",
                row.metric, _fmt(row.value, row.unit), row.baseline or "-",
                _fmt(row.baseline_value, row.unit) if row.baseline_value is not None else "-",
                f"{ratio:.2f}x" if ratio is not None else "-", row.note,
            )
    return table


def print_table(outcomes: Sequence[Outcome], title: str, width: int | None = None) -> None:
    """Print the table to stdout (plain text when stdout is not a terminal)."""
    console = Console(width=width or 200) if not sys.stdout.isatty() else Console()
    console.print(render_table(outcomes, title))
