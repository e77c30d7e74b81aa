"""Killswitch benchmark: from the command to the last agent stopped, against plain Celery ``revoke``.

Two prefork workers (concurrency 10 each, ``ORCHESTRATOR_MAX_CONCURRENT_AGENTS=20``) run 2, 10 or 20 agents. Half
of them stream a slow model turn (the offline model's ``Turn(..., chunk_delay=...)``); the other half sit inside a
long shell command, ``bash -c 'sleep 600 & sleep 600'``. Every agent first writes a file, so there is work to
commit. Then:

* **killswitch drill:** ``Killswitch(...).engage(...)`` in this process (what ``orchestrator killswitch engage``
  does), then poll every agent's record until all are ``killed``; the figure is the time from the command to the
  last ``killed`` record. Repeated (5 drills; ``--quick`` 2) for each fleet size; median and p99 (nearest rank:
  the slowest drill). One more drill at 20 agents runs the real CLI as a subprocess (not with ``--quick``).
  Between drills: ``Killswitch.mark_released(...)`` (held agents stay held) and the fleet's keys are deleted.
* **baseline, plain Celery** (once per size; ``--quick``: at 20 agents only): ``app.control.inspect().active()``
  for the task ids, ``app.control.revoke(task_id, terminate=True)`` for each, then poll ``inspect().active()``
  until none is active (at most 5 s: a revoke may terminate nothing, see :func:`revoke_drill`). Then count what
  it left: ``sleep 600`` processes, open model streams, records not ``killed``, commits. Afterwards the benchmark
  engages the killswitch to stop what revoke did not, and kills leftover processes itself.

The workers' logs time two phases of every stop: command -> the agent's stop handler ran (``stopping``), and
stop handler -> ``finished`` (loop exit, watcher threads joined, git commit, final record).

Run by hand, ``python -m benchmarks.bench_killswitch --profile [--agents 20] [--drills 5] [--listener-fix]``
splits the second phase further: the workers load :data:`PROFILE_HOOKS` (as ``sitecustomize``), which time-stamp
each step of a stop; ``--listener-fix`` also simulates a proposed library change (see :data:`PROFILE_HOOKS`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery.result import AsyncResult

from benchmarks.harness import Benchmark, Harness, ModelServer, Row, median, percentile, terminate_as_interrupt
from orchestrator.keys import Keys
from orchestrator.killswitch import Killswitch
from orchestrator.settings import STATE_DB
from orchestrator.states import State
from orchestrator.testing.cluster import Worker
from orchestrator.testing.offline_model import Script, Turn, bash, text_turn
from orchestrator.workspace import Workspace

NAME = "killswitch"
STREAMER = "bench-ks-streamer"
SLEEPER = "bench-ks-sleeper"
WARM = "bench-ks-warm"
SLEEP_CMD = "bash -c 'sleep 600 & sleep 600'"
CONCURRENCY = 10  # per worker; two workers
GOAL_SECONDS = 1.0  # p99 at 20 agents
REVOKE_WINDOW = 5.0  # seconds to wait for revoked tasks to leave inspect().active()
SLOW_TEXT = [{"type": "text", "text": "thinking very slowly " * 40}]
SCRIPTS = {
    # chunk_delay 30 s: the turn streams (pings every 0.2 s) for minutes, far longer than any drill.
    STREAMER: Script([bash("echo progress > work-$RANDOM.txt"), Turn(SLOW_TEXT, chunk_delay=30.0), text_turn("done")]),
    SLEEPER: Script([bash("echo progress > work-$RANDOM.txt"), bash(SLEEP_CMD), text_turn("done")]),
    WARM: Script([bash("echo warm > warm-$RANDOM.txt"), text_turn("done")]),
}
_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]*\] orchestrator\.runner: "
                       r"agent (\w+) (stopping|finished): killed")


def sleep_pids(root: Path) -> list[int]:
    """``sleep 600`` processes whose working directory is under ``root`` (this run's worktrees only)."""
    out = subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True, text=True, check=False).stdout
    mine = []
    prefix = os.path.realpath(root) + os.sep
    for pid in (int(p) for p in out.split()):
        with contextlib.suppress(OSError):
            if (os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) + os.sep).startswith(prefix):
                mine.append(pid)
    return mine


def kill_groups(pids: Sequence[int]) -> None:
    """SIGKILL the process group of each pid (an agent shell command runs in a group of its own)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Drill:
    """One fleet of agents in place, and how it was stopped."""

    agents: int
    seconds: float = 0.0  # command -> last agent stopped (killed record / task no longer active)
    command_seconds: float = 0.0  # the command itself (engage; or inspect + revokes)
    agent_stop_seconds: float = 0.0  # killswitch status: slowest stop as the agents recorded it
    phases: list[tuple[float, float]] = field(default_factory=list)  # per agent: (to stop handler, wind-down)
    sleeps_left: int = 0
    streams_left: int = 0
    not_stopped: int = 0  # records not in state killed
    commits: int = 0  # agents whose branch got a commit
    terminated: int = 0  # revoke: tasks no longer active within the window
    still_running: int = 0  # revoke: tasks still active at the end of the window
    terminate_logged: int = 0  # revoke: "Terminating <id>" lines in the workers' logs
    last_cut: float = 0.0  # command -> the last model stream closed (the offline model's call log)


class Fleet:
    """The benchmark's fleet: two workers, the offline model, a coordinator and the fleet's Valkey keys."""

    def __init__(self, h: Harness, model: ModelServer, workers: Sequence[Worker], repo: Path) -> None:
        self.h = h
        self.model = model
        self.workers = workers
        self.repo = repo
        self.r: redis.Redis = h.valkey.client(STATE_DB)
        self.keys = Keys("orch:")
        self.switch = Killswitch(self.r, self.keys)
        self.worktrees = h.tmp / "workspace"

    def close(self) -> None:
        self.r.close()

    def launch(self, n: int) -> tuple[list[AsyncResult], list[str]]:
        """Submit ``n`` agents (half streaming, half in ``sleep 600``); return once all are in place."""
        kinds = [STREAMER] * (n // 2) + [SLEEPER] * (n - n // 2)
        task_ids = [self.h.unique("ks") for _ in kinds]
        results = [self.h.send({"task_id": t, "prompt": f"[[script:{kind}]] work", "repo": str(self.repo)})
                   for t, kind in zip(task_ids, kinds, strict=True)]
        streams, sleeps = n // 2, 2 * (n - n // 2)

        def in_place() -> bool:
            return self.model.open_streams(turn=1) == streams and len(sleep_pids(self.worktrees)) == sleeps

        self.h.wait_for(in_place, 90, f"{streams} agents streaming and {sleeps} sleep processes")
        return results, [self.agent_of(t) for t in task_ids]

    def agent_of(self, task_id: str) -> str:
        """The agent id the fleet gave a task id."""
        return str(self.h.wait_for(lambda: self.r.get(self.keys.task_index(task_id)), 10, f"agent of {task_id}"))

    def states(self, agent_ids: Sequence[str]) -> list[str | None]:
        pipe = self.r.pipeline()
        for agent_id in agent_ids:
            pipe.hget(self.keys.agent(agent_id), "state")
        return [None if s is None else str(s).strip('"') for s in pipe.execute()]

    def wait_killed(self, agent_ids: Sequence[str], start: float, timeout: float = 60.0) -> float:
        """Poll the records (every 2 ms) until all are ``killed``; seconds from ``start`` to the last."""
        pending = set(agent_ids)
        last = start
        deadline = time.perf_counter() + timeout
        while pending:
            now = time.perf_counter()
            for agent_id, state in zip(list(pending), self.states(list(pending)), strict=True):
                if state == State.KILLED.value:
                    pending.discard(agent_id)
                    last = now
            if now > deadline:
                raise TimeoutError(f"{len(pending)} agent(s) not killed after {timeout}s: {sorted(pending)}")
            if pending:
                time.sleep(0.002)
        return last - start

    def phases(self, agent_ids: Sequence[str], engaged_wall: float) -> list[tuple[float, float]]:
        """Per agent, from the workers' logs: (command -> stop handler ran, stop handler -> finished)."""
        stamps: dict[tuple[str, str], float] = {}
        for worker in self.workers:
            for line in worker.log().splitlines():
                m = _LOG_LINE.match(line)
                if m and m.group(2) in agent_ids:
                    at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    stamps.setdefault((m.group(2), m.group(3)), at)
        out = []
        for agent_id in agent_ids:
            stop, done = stamps.get((agent_id, "stopping")), stamps.get((agent_id, "finished"))
            if stop is not None and done is not None:
                out.append((stop - engaged_wall, done - stop))
        return out

    def aftermath(self, drill: Drill, agent_ids: Sequence[str], settle: float) -> list[int]:
        """Count what is left a moment after the stop; returns the leftover sleep pids (not killed here)."""
        time.sleep(settle)
        pids = sleep_pids(self.worktrees)
        drill.sleeps_left = len(pids)
        drill.streams_left = self.model.open_streams()
        drill.not_stopped = sum(1 for s in self.states(agent_ids) if s != State.KILLED.value)
        drill.commits = sum(1 for a in agent_ids if self.branch_commits(a) > 0)
        return pids

    def branch_commits(self, agent_id: str) -> int:
        """Commits on the agent's branch beyond the base, in the mirror."""
        mirror = Workspace(self.worktrees).mirror_path(str(self.repo))
        out = subprocess.run(["git", "-C", str(mirror), "rev-list", "--count",
                              f"refs/remotes/origin/main..refs/heads/agent/{agent_id}"],
                             capture_output=True, text=True, check=False)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0

    def reset(self) -> None:
        """Between drills: the workers are idle; forget the fleet's state and the model's call log."""
        self.h.flush_fleet_state()
        self.model.reset()


CLI_COMMANDS = {
    "orchestrator": ["-m", "orchestrator.cli", "killswitch", "engage", "--reason", "bench drill (cli)", "--wait", "0"],
    "celery": ["-m", "celery", "-A", "orchestrator", "control", "killswitch", "bench drill (celery control)"],
}


def killswitch_drill(fleet: Fleet, n: int, cli: str | None = None) -> Drill:
    """Engage with ``n`` agents in place (in-process, or a real command: ``cli`` names one of ``CLI_COMMANDS``),
    until the last record is ``killed``; also when the last model stream was cut, from the model's call log.

    With ``cli``, ``command_seconds`` is the time from starting the command to the engage inside it (interpreter
    start and imports: the state's ``engaged_ts``).
    """
    results, agent_ids = fleet.launch(n)
    drill = Drill(n)
    try:
        engaged_wall = time.time()
        start = time.perf_counter()
        if cli:
            argv = [sys.executable, *CLI_COMMANDS[cli]]
            with subprocess.Popen(argv, env=fleet.h.env(None), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, cwd=Path(__file__).resolve().parent.parent) as proc:
                try:
                    drill.seconds = fleet.wait_killed(agent_ids, start)  # polled while the CLI runs
                finally:
                    _, stderr = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"killswitch engage failed: {stderr[-2000:]}")
            engaged_ts = float(fleet.r.hget(fleet.keys.killswitch, "engaged_ts") or 0)
            drill.command_seconds = engaged_ts - engaged_wall
        else:
            running = fleet.r.zcount(fleet.keys.slots, time.time(), "+inf")  # as the CLI passes it
            fleet.switch.engage("bench drill", by="bench", running=int(running))
            drill.command_seconds = time.perf_counter() - start
            drill.seconds = fleet.wait_killed(agent_ids, start)
        outs = [r.get(timeout=30) for r in results]
        if any(o.get("status") != State.KILLED.value for o in outs):
            raise RuntimeError(f"not every agent was killed: {[o.get('status') for o in outs]}")
        drill.agent_stop_seconds = float(fleet.switch.status()["slowest_stop_seconds"])
        cut = [float(c["finished_at"]) for c in fleet.model.calls() if c.get("stream") and c.get("finished_at")
               and c.get("status") == "client_closed" and float(c["finished_at"]) > engaged_wall]
        drill.last_cut = (max(cut) - engaged_wall) if cut else 0.0
        fleet.aftermath(drill, agent_ids, settle=0.2)
        drill.phases = fleet.phases(agent_ids, engaged_wall)
        if drill.sleeps_left or drill.streams_left:
            raise RuntimeError(f"the killswitch left {drill.sleeps_left} sleep(s), {drill.streams_left} stream(s)")
    finally:
        fleet.h.forget(results)
        fleet.switch.mark_released(by="bench")
    fleet.reset()
    return drill


def _active(fleet: Fleet) -> dict[str, Any]:
    replies = fleet.h.coordinator.control.inspect(timeout=2.0, limit=len(fleet.workers)).active()
    return dict(replies or {})


def revoke_drill(fleet: Fleet, n: int, window: float) -> Drill:
    """Plain Celery: inspect the active tasks, revoke each with terminate=True, poll until none is active.

    A revoke can terminate nothing: the fleet runs an agent under the Celery task id of its first delivery
    (intake re-enqueues the run under the same id), and when the run's message reaches the worker before the
    intake delivery has finished, finishing the intake removes the id from the worker's request index, which
    ``revoke(terminate=True)`` looks the task up in ("terminate: tasks unknown"). So polling stops after
    ``window`` seconds; agents still active then are counted, and stopped afterwards with the killswitch.
    """
    results, agent_ids = fleet.launch(n)
    drill = Drill(n)
    try:
        control = fleet.h.coordinator.control
        start = time.perf_counter()
        active = [t for tasks in _active(fleet).values() for t in tasks]
        ids = [t["id"] for t in active]
        for task_id in ids:
            control.revoke(task_id, terminate=True)
        drill.command_seconds = time.perf_counter() - start
        wanted = set(ids)
        gone_at: dict[str, float] = {}
        while len(gone_at) < len(wanted) and time.perf_counter() - start < window:
            now = time.perf_counter()
            still = {t["id"] for tasks in _active(fleet).values() for t in tasks}
            for task_id in wanted - still - set(gone_at):
                gone_at[task_id] = now - start
            time.sleep(0.005)
        drill.terminated = len(gone_at)
        drill.still_running = n - len(gone_at)
        drill.seconds = max(gone_at.values(), default=float("nan"))
        logs = "\n".join(w.log() for w in fleet.workers)
        drill.terminate_logged = sum(1 for task_id in ids if f"Terminating {task_id}" in logs)
        time.sleep(1.0)  # let what was terminated settle before counting what it left
        stopped_agents = {str(t["kwargs"].get("run_agent_id")) for t in active if t["id"] in gone_at}
        drill.sleeps_left = len([p for p in sleep_pids(fleet.worktrees)
                                 if any(f"/worktrees/{a}" in _cwd(p) for a in stopped_agents)])
        drill.streams_left = sum(1 for c in fleet.model.calls() if c.get("stream") and c.get("status") == "open"
                                 and c.get("agent") in stopped_agents)
        drill.not_stopped = sum(1 for a, s in zip(agent_ids, fleet.states(agent_ids), strict=True)
                                if a in stopped_agents and s != State.KILLED.value)
        drill.commits = sum(1 for a in stopped_agents if fleet.branch_commits(a) > 0)
    finally:
        # Clean up: the killswitch stops what revoke did not; then the orphaned shells revoke left behind go.
        fleet.switch.engage("bench cleanup after revoke", by="bench")
        try:
            fleet.h.wait_for(lambda: not any(_active(fleet).values()), 60, "idle workers after revoke")
            kill_groups(sleep_pids(fleet.worktrees))
            fleet.h.wait_for(lambda: not sleep_pids(fleet.worktrees), 10, "leftover sleep processes to go")
        finally:
            fleet.switch.mark_released(by="bench")
            fleet.h.forget(results)
    fleet.reset()
    return drill


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


@contextlib.contextmanager
def _fleet(h: Harness, extra_env: Mapping[str, str] | None = None) -> Iterator[Fleet]:
    """Valkey (emptied), the offline model and two workers of concurrency 10, warmed up."""
    h.fresh_state()
    repo = h.sample_repo("killswitch")
    settings = {"max_concurrent_agents": 2 * CONCURRENCY, "heartbeat_interval_seconds": 1}

    def worker(model_url: str, name: str) -> Worker:
        return Worker({**h.env(model_url, **settings), **(extra_env or {})}, f"{h.unique(name)}@%h",
                      concurrency=CONCURRENCY, queues="agents,ops", log_path=h.tmp / f"worker-{h.unique(name)}.log")

    with h.model_server(SCRIPTS) as model, h.started(lambda: worker(model.url, "ks-a")) as a, \
            h.started(lambda: worker(model.url, "ks-b")) as b:
        a.wait_ready()
        b.wait_ready()
        fleet = Fleet(h, model, [a, b], repo)
        try:
            # Warm every pool process (imports, the SDK client, connections) and the mirror: 20 one-turn agents.
            warm = [h.send({"task_id": h.unique("ks-warm"), "prompt": f"[[script:{WARM}]] go", "repo": str(repo)})
                    for _ in range(2 * CONCURRENCY)]
            try:
                for res in warm:
                    res.get(timeout=120)
            finally:
                h.forget(warm)
            fleet.reset()
            yield fleet
        finally:
            with contextlib.suppress(Exception):
                kill_groups(sleep_pids(fleet.worktrees))
            fleet.close()


def bench_killswitch(h: Harness) -> list[Row]:
    """Killswitch drills at 2, 10 and 20 agents (median, p99) vs plain Celery revoke(terminate=True)."""
    drills = 2 if h.quick else 5
    sizes = (2, 10, 20)
    ks: dict[int, list[Drill]] = {n: [] for n in sizes}
    revoked: dict[int, Drill] = {}
    with _fleet(h) as fleet:
        for n in sizes:
            for _ in range(drills):
                ks[n].append(killswitch_drill(fleet, n))
            h.log(f"killswitch, {n} agents: " + ", ".join(f"{d.seconds * 1000:.0f} ms" for d in ks[n]))
        clis: dict[str, Drill] = {}
        for name in CLI_COMMANDS:
            clis[name] = killswitch_drill(fleet, sizes[-1], cli=name)
            h.log(f"killswitch via {name}, {sizes[-1]} agents: last cut {clis[name].last_cut * 1000:.0f} ms, "
                  f"last killed {clis[name].seconds * 1000:.0f} ms")
        for n in sizes[-1:] if h.quick else sizes:  # last: revoke kills pool processes; the workers start new ones
            revoked[n] = d = revoke_drill(fleet, n, REVOKE_WINDOW)
            h.log(f"revoke, {n} agents: {d.terminated} terminated (last after {d.seconds * 1000:.0f} ms), "
                  f"{d.still_running} still running after {REVOKE_WINDOW:g} s; terminated ones left "
                  f"{d.sleeps_left} sleeps, {d.streams_left} streams, {d.not_stopped} records not killed, "
                  f"{d.commits} commits")
    return _rows(ks, revoked, clis, drills)


def _rows(ks: dict[int, list[Drill]], revoked: dict[int, Drill], clis: dict[str, Drill], drills: int) -> list[Row]:
    rows = []
    for n, runs in ks.items():
        ms = [d.seconds * 1000 for d in runs]
        rv = revoked.get(n)
        base_label: str | None
        base: float | None
        if rv is None:
            base_label, base = None, None  # --quick: revoke only at the largest size
        elif rv.terminated == n:
            base_label, base = "revoke(terminate=True): last task gone", rv.seconds * 1000
        else:
            base_label, base = f"revoke(terminate=True): {rv.terminated} of {n} stopped in {REVOKE_WINDOW:g} s", None
        p99 = percentile(ms, 99)
        note = f"{drills} drills; engage call {median([d.command_seconds * 1000 for d in runs]):.1f} ms"
        if n == max(ks):
            note += f"; goal p99 < {GOAL_SECONDS * 1000:.0f} ms: {'met' if p99 < GOAL_SECONDS * 1000 else 'MISSED'}"
        rows.append(Row(NAME, f"{n} agents: engage -> last killed, median", median(ms), "ms", base_label, base,
                        f"{n // 2} streaming + {n - n // 2} in sleep 600, 2 workers x {CONCURRENCY}"))
        rows.append(Row(NAME, f"{n} agents: engage -> last killed, p99", p99, "ms", base_label, base, note))
    big = max(ks)
    phases = [p for d in ks[big] for p in d.phases]
    if phases:
        to_stop = [p[0] * 1000 for p in phases]
        wind = [p[1] * 1000 for p in phases]
        rows.append(Row(NAME, f"  {big} agents: engage -> agent's stop handler", median(to_stop), "ms",
                        note=f"median of {len(phases)} agent stops; max {max(to_stop):.0f} ms (pub/sub delivery)"))
        rows.append(Row(NAME, f"  {big} agents: stop handler -> finished", median(wind), "ms",
                        note=f"median; max {max(wind):.0f} ms: loop exit, watcher threads joined, git commit, "
                             "final record"))
    rows.append(Row(NAME, f"  slowest stop as agents recorded it, {big} agents", median(
        [d.agent_stop_seconds * 1000 for d in ks[big]]), "ms", note="killswitch status slowest_stop_seconds, median"))
    labels = {"orchestrator": "orchestrator killswitch engage", "celery": "celery -A orchestrator control killswitch"}
    for name, cli in clis.items():
        rows.append(Row(NAME, f"keystroke -> last stream cut, {big} agents: {labels[name]}", cli.last_cut * 1000, "ms",
                        note=f"1 drill; {cli.command_seconds * 1000:.0f} ms before the command engaged (interpreter, "
                             f"imports); goal < 1000 ms: {'met' if cli.last_cut < 1.0 else 'MISSED'}"))
        rows.append(Row(NAME, f"keystroke -> last agent killed, {big} agents: {labels[name]}", cli.seconds * 1000,
                        "ms", "in-process engage, median", median([d.seconds * 1000 for d in ks[big]]),
                        note="work committed, record killed"))
    for n, d in revoked.items():
        ks_commits = min(x.commits for x in ks[n])
        left = (f"the {d.terminated} it stopped left {d.sleeps_left} sleep 600 processes (killswitch 0), "
                f"{d.streams_left} open streams (0), {d.not_stopped} records not 'killed' (0), "
                f"{d.commits} branches with a commit (killswitch {ks_commits}/{n})") if d.terminated else \
            "it stopped none"
        rows.append(Row(NAME, f"revoke(terminate=True), {n} agents: still running after {REVOKE_WINDOW:g} s",
                        d.still_running, f"of {n}", "after the killswitch", 0,
                        f"'Terminating' logged for {d.terminate_logged}/{n}; {left}; inspect + revokes "
                        f"{d.command_seconds * 1000:.0f} ms"))
    return rows


def _wall_ms(argv: Sequence[str], env: Mapping[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(list(argv), env=dict(env), capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parent.parent)
        times.append((time.perf_counter() - start) * 1000)
        if proc.returncode not in (0, 69):  # 69: celery control with no worker to reply (the stop went out anyway)
            raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr[-1000:]}")
    return times


def bench_operator(h: Harness) -> list[Row]:
    """Wall time of the operator's commands against ``python -c "from celery import Celery"``."""
    runs = 5 if h.quick else 11
    env = h.env(None)
    py = sys.executable
    baseline = median(_wall_ms([py, "-c", "from celery import Celery"], env, runs))
    commands = {
        "orchestrator agents --json": [py, "-m", "orchestrator.cli", "agents", "--json"],
        "orchestrator agents (table)": [py, "-m", "orchestrator.cli", "agents"],
        "orchestrator killswitch status": [py, "-m", "orchestrator.cli", "killswitch", "status"],
        "celery -A orchestrator control killswitch": [py, "-m", "celery", "-A", "orchestrator", "control",
                                                      "killswitch", "bench"],
    }
    rows = []
    for label, argv in commands.items():
        ms = median(_wall_ms(argv, env, runs))
        note = "goal < 2x" if "celery" not in label else "waits 1 s for replies (Celery's default --timeout)"
        rows.append(Row("operator path", label, ms, "ms", "python -c 'from celery import Celery'", baseline,
                        note=f"median of {runs}; {note}"))
        if "control" in label:
            with h.valkey.client(STATE_DB) as r:
                r.delete("orch:killswitch", "orch:killswitch:stops", "orch:killswitch:audit")
    return rows


# --------------------------------------------------------------------------- profile (run by hand)

#: Loaded by the workers as ``sitecustomize`` (through PYTHONPATH) in profile mode only: it logs a time stamp at
#: each step of an agent's stop. With KSPROF_LISTENER_FIX it also stands in for a proposed library change:
#: ``Supervisor.close()`` no longer joins the stop-listener thread (which sits in ``get_message(timeout=0.2)``);
#: the listener closes its own subscription when it sees the run is done.
PROFILE_HOOKS = """
import contextlib, logging, os, time
from orchestrator import lifecycle, runner, supervisor, workspace

_log = logging.getLogger("ksprof")

def _mark(event, agent):
    _log.warning("KSPROF %s %s %.6f", event, agent, time.time())

def _wrap(cls, name, before=None, after=None, agent=lambda self, *a: self.agent_id):
    original = getattr(cls, name)
    def hooked(self, *args, **kwargs):
        if before: _mark(before, agent(self, *args))
        try:
            return original(self, *args, **kwargs)
        finally:
            if after: _mark(after, agent(self, *args))
    setattr(cls, name, hooked)

_wrap(runner.AgentRun, "request_stop", before="stop")
_wrap(runner.AgentLedger, "release_open", before="loop_exit")
_wrap(workspace.Workspace, "commit", "commit_start", "commit_end", agent=lambda self, wt, *a: wt.path.name)
_wrap(lifecycle.Lifecycle, "finish", after="finished", agent=lambda self, agent_id, *a: agent_id)
if os.environ.get("KSPROF_LISTENER_FIX"):
    def close(self):
        self._done.set()
        for t in self._threads:
            if t.name.startswith("heartbeat"):
                t.join(timeout=5)
    supervisor.Supervisor.close = close
    _listen = supervisor.Supervisor._listen_loop
    def _listen_loop(self):
        try:
            _listen(self)
        finally:
            with contextlib.suppress(Exception):
                self._pubsub.close()
    supervisor.Supervisor._listen_loop = _listen_loop
_wrap(supervisor.Supervisor, "close", "close_start", "close_end")
"""
_PROFILE_LINE = re.compile(r"KSPROF (\w+) (\w+) ([\d.]+)")
_PROFILE_STEPS = [
    ("stop", "loop_exit", "stop handler -> loop exited (stream cut / shell killed)"),
    ("loop_exit", "close_start", "loop exited -> Supervisor.close()"),
    ("close_start", "close_end", "Supervisor.close(): watcher threads joined"),
    ("close_end", "commit_start", "-> Workspace.commit (fence check)"),
    ("commit_start", "commit_end", "Workspace.commit: 5 git processes"),
    ("commit_end", "finished", "-> final record written (AgentStore.finish)"),
    ("stop", "finished", "stop handler -> finished, in all"),
]


def profile(agents: int, drills: int, listener_fix: bool) -> None:
    """Killswitch drills with time stamps at each step of every agent's stop (see PROFILE_HOOKS); prints a table."""
    with terminate_as_interrupt(), Harness() as h:
        hooks = h.tmp / "ksprof"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(PROFILE_HOOKS)
        env = {"PYTHONPATH": str(hooks), "KSPROF": "1", **({"KSPROF_LISTENER_FIX": "1"} if listener_fix else {})}
        with _fleet(h, env) as fleet:
            totals = [killswitch_drill(fleet, agents).seconds * 1000 for _ in range(drills)]
            stamps: dict[str, dict[str, float]] = {}
            for worker in fleet.workers:
                for m in _PROFILE_LINE.finditer(worker.log()):
                    stamps.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    variant = "with the listener-join fix simulated" if listener_fix else "library as is"
    print(f"killswitch profile, {variant}: {agents} agents x {drills} drills, {os.cpu_count()} cores")
    print(f"engage -> last killed: median {median(totals):.0f} ms, p99 {percentile(totals, 99):.0f} ms "
          f"({', '.join(f'{t:.0f}' for t in totals)})")
    complete = [e for e in stamps.values() if all(step in e for pair in _PROFILE_STEPS for step in pair[:2])]
    print(f"  {f'per agent stop ({len(complete)} stops), ms':58} {'median':>7} {'p90':>7} {'max':>7}")
    for first, last, label in _PROFILE_STEPS:
        ms = [(e[last] - e[first]) * 1000 for e in complete]
        print(f"  {label:58} {median(ms):7.1f} {percentile(ms, 90):7.1f} {max(ms):7.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_killswitch --profile [--agents N] [--drills N] [--listener-fix]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_killswitch",
                                     description="Profile where the time of a killswitch stop goes.")
    parser.add_argument("--profile", action="store_true", required=True)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--drills", type=int, default=5)
    parser.add_argument("--listener-fix", action="store_true",
                        help="simulate Supervisor.close() not joining the stop-listener thread")
    args = parser.parse_args(argv)
    profile(args.agents, args.drills, args.listener_fix)
    return 0


BENCHMARKS = [
    Benchmark("operator", "wall time of orchestrator agents / killswitch status / celery control killswitch",
              bench_operator),
    Benchmark("killswitch", "engage -> every agent killed (2, 10, 20 agents) vs Celery revoke(terminate=True)",
              bench_killswitch),
]

if __name__ == "__main__":
    sys.exit(main())
