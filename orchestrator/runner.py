"""One agent's run from intake to result: admission, lease, worktree, loop, gates, commit, result.

Plain functions over a ``Fleet``; the Celery task in ``workers/tasks.py`` only calls ``intake`` and ``execute``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import datetime
from typing import Any

from orchestrator.agent.loop import AgentLoop, Checkpoint, LoopConfig, StopRun, StopSignal
from orchestrator.agent.model import ModelClient
from orchestrator.agent.tools import TOOL_DEFINITIONS, Toolbox
from orchestrator.budget import AgentLedger
from orchestrator.fleet import Fleet
from orchestrator.gates import gate_feedback, run_gates
from orchestrator.killswitch import Killswitch
from orchestrator.logs import set_agent_context
from orchestrator.models import AgentResult, AgentSpec, GateResult, Rejection, State, Usage, iso, utcnow, validate_spec
from orchestrator.pricing import price_for
from orchestrator.settings import redact_text
from orchestrator.store import StaleFence
from orchestrator.supervisor import Supervisor
from orchestrator.workspace import WorkspaceError, Worktree

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """You are a software engineering agent working in a git worktree at {path}.
Use the bash tool to run commands (each command starts in the worktree) and the str_replace_based_edit_tool to view
and edit files; paths are relative to the worktree. Make the change the task asks for, run the project's tests,
and when you are done reply with a short summary of what you changed. Your changes are committed for you."""


def intake(fleet: Fleet, raw: Any, celery_task_id: str | None) -> AgentResult | str:
    """Validate a spec and register its agent: the agent id, or a final ``rejected``/``duplicate`` result."""
    parsed = validate_spec(raw)
    now = iso(utcnow())
    if isinstance(parsed, Rejection):
        fleet.store.reject(parsed)
        fleet.r.hincrby(fleet.keys.stats, f"finished:{State.REJECTED.value}", 1)
        log.warning("rejected spec (task_id=%s): %s", parsed.task_id, parsed.summary())
        meta = raw.get("metadata") if isinstance(raw, dict) else None
        metadata: dict[str, Any] = meta if isinstance(meta, dict) else {}
        return AgentResult(agent_id=None, task_id=parsed.task_id, status=State.REJECTED, error=parsed.summary(),
                           started_at=now, finished_at=now, metadata=metadata)
    agent_id, created = fleet.store.create(parsed, celery_task_id)
    if created:
        return agent_id
    existing = fleet.store.get(agent_id) or {}
    if celery_task_id and existing.get("celery_task_id") == celery_task_id:
        return agent_id  # the same message delivered again: not a new spec; the lease decides who runs
    fleet.r.hincrby(fleet.keys.stats, f"finished:{State.DUPLICATE.value}", 1)
    return AgentResult(agent_id=agent_id, task_id=parsed.task_id, status=State.DUPLICATE,
                       branch=existing.get("branch"), error=f"task_id {parsed.task_id!r} already has agent {agent_id}",
                       started_at=now, finished_at=now, metadata=parsed.metadata)


def execute(fleet: Fleet, agent_id: str, worker: str) -> AgentResult | None:
    """Run (or resume) an agent to its result; None when this delivery must not act (held, waiting, owned)."""
    rec = fleet.store.get(agent_id)
    if rec is None:
        return AgentResult(agent_id=agent_id, task_id=None, status=State.FAILED, error="unknown agent")
    state = State(rec["state"])
    if state.final:
        return AgentResult.model_validate(rec["result"]) if rec.get("result") else None
    spec = AgentSpec.model_validate(rec["spec"])
    switch = Killswitch(fleet.r, fleet.keys)
    requested = switch.kill_requested(agent_id)
    if requested is not None and not rec.get("started_at"):
        return finish_unstarted(fleet, rec, requested[0], f"stopped before it started: {requested[1]}")
    if switch.engaged():
        switch.hold(agent_id, spec.priority)
        fleet.store.update(agent_id, state=State.HELD.value)
        fleet.store.add_event(agent_id, "held", "killswitch engaged: held until release --resume")
        return None
    holder = f"{worker}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    fence = fleet.leases.acquire(agent_id, holder, fleet.settings.heartbeat_timeout_seconds)
    if fence is None:
        log.info("agent %s is already running elsewhere; this delivery does nothing", agent_id)
        return None
    run: AgentRun | None = None
    try:
        if not _admit(fleet, agent_id, spec, fence):
            return None
        run = AgentRun(fleet, rec, spec, worker, holder, fence)
        set_agent_context(agent_id, spec.task_id)
        try:
            return run.run()
        finally:
            set_agent_context(None, None)
            fleet.budget.release_slot(agent_id)
    except StaleFence:
        log.warning("agent %s: lease lost to a newer run; this worker writes nothing more", agent_id)
        return None
    finally:
        # Only once the lease is free may this agent (handed back, or just parked) be delivered again.
        fleet.leases.release(agent_id, holder, fence)
        if run is not None and run.handed_back:
            from orchestrator.ops import requeue  # ops builds on this module

            requeue(fleet, agent_id)
        wake_waiters(fleet)


def finish_unstarted(fleet: Fleet, rec: dict[str, Any], status: State, error: str) -> AgentResult:
    """Give an agent that never ran its final result (killed while queued or held)."""
    now = iso(utcnow())
    result = AgentResult(agent_id=rec["agent_id"], task_id=rec.get("task_id"), status=status, branch=rec.get("branch"),
                         error=error, started_at=now, finished_at=now,
                         metadata=(rec.get("spec") or {}).get("metadata") or {})
    fleet.store.finish(rec["agent_id"], result)
    fleet.r.zrem(fleet.keys.held, rec["agent_id"])
    fleet.r.zrem(fleet.keys.waiting, rec["agent_id"])
    return result


def _admit(fleet: Fleet, agent_id: str, spec: AgentSpec, fence: int) -> bool:
    """Take a concurrency slot; in hard mode with none free, park the agent until one frees."""
    budget = fleet.budget
    if budget.acquire_slot(agent_id):
        return True
    if not budget.hard:
        budget.acquire_slot(agent_id, force=True)
        fleet.store.add_event(agent_id, "warning", "concurrency limit passed (soft mode: running anyway)")
        log.warning("agent %s runs past the concurrency limit (soft mode)", agent_id)
        return True
    fleet.r.zadd(fleet.keys.waiting, {agent_id: -spec.priority * 1e10 + time.time()})
    fleet.store.update(agent_id, fence, state=State.QUEUED.value)
    fleet.store.add_event(agent_id, "waiting", "no free concurrency slot: waiting in the queue")
    return False  # execute() wakes waiters after releasing the lease, so a slot freed meanwhile is not lost


def wake_waiters(fleet: Fleet) -> int:
    """Enqueue waiting agents for the free slots (highest priority first); returns how many."""
    free = fleet.settings.max_concurrent_agents - fleet.budget.running()
    woken = 0
    while free > 0:
        popped = fleet.r.zpopmin(fleet.keys.waiting, 1)
        if not popped:
            break
        fleet.enqueue(str(popped[0][0]))
        woken += 1
        free -= 1
    return woken


class AgentRun:
    """State of one run in this process: the stop signal, the ledger, the model and tools in use."""

    def __init__(self, fleet: Fleet, rec: dict[str, Any], spec: AgentSpec, worker: str, holder: str,
                 fence: int) -> None:
        self.fleet = fleet
        self.s = fleet.settings
        self.rec = rec
        self.spec = spec
        self.agent_id: str = rec["agent_id"]
        self.worker = worker
        self.holder = holder
        self.fence = fence
        self.stop = StopSignal()
        self.model_name = spec.model or self.s.model
        self.agent_limit = min(self.s.agent_token_limit, spec.token_limit or self.s.agent_token_limit)
        self.warnings: list[str] = []
        self.ledger = AgentLedger(fleet.budget, self.agent_id, self.agent_limit, self.model_name, self.warn,
                                  guard=self.check_fence)
        self.model: ModelClient | None = None
        self.toolbox: Toolbox | None = None
        self.checkpoint: Checkpoint | None = None
        self.handed_back = False
        self.last_progress = time.time()
        self.stuck_flagged = False

    # -- callbacks from the supervisor thread -----------------------------------------------------------
    def warn(self, message: str) -> None:
        """Record a warning in the agent's events and the log."""
        self.warnings.append(message)
        log.warning("agent %s: %s", self.agent_id, message)
        self.fleet.store.add_event(self.agent_id, "warning", message)

    def check_fence(self) -> None:
        """Raise StaleFence if a newer run owns the agent (checked before every model call and commit)."""
        if self.fleet.r.get(self.fleet.keys.fence(self.agent_id)) != str(self.fence):
            raise StaleFence(f"agent {self.agent_id}: a newer run owns it")

    def stuck(self, reason: str) -> None:
        """An agent that loops or makes no progress: flag it, and stop it if the settings say so."""
        if not self.stuck_flagged:
            self.stuck_flagged = True
            log.warning("agent %s looks stuck: %s", self.agent_id, reason)
            self.fleet.store.update(self.agent_id, self.fence, stuck=reason)
            self.fleet.store.add_event(self.agent_id, "stuck", reason)
        if self.s.stuck_action == "stop":
            raise StopRun(State.FAILED, f"stuck: {reason}")

    def request_stop(self, status: State, reason: str) -> None:
        """Stop now: cut the model call and kill the shell command in flight."""
        if not self.stop.request(status, reason):
            return
        log.warning("agent %s stopping: %s (%s)", self.agent_id, status.value, reason)
        if self.model is not None:
            self.model.cancel()
        if self.toolbox is not None:
            self.toolbox.kill_running()

    def beat(self) -> bool:
        """Heartbeat: renew the lease, the slot and the open reservation; publish progress."""
        if not self.fleet.leases.renew(self.agent_id, self.holder, self.fence, self.s.heartbeat_timeout_seconds):
            return False
        now = time.time()
        cp = self.checkpoint
        fields: dict[str, Any] = {"heartbeat_at": iso(utcnow())}
        if cp is not None:
            fields.update(turns=cp.turns, usage=cp.usage.model_dump(), last_tool=cp.last_tool)
        self.fleet.store.update(self.agent_id, self.fence, **fields)
        self.fleet.r.zadd(self.fleet.keys.heartbeats, {self.agent_id: now})
        self.fleet.budget.acquire_slot(self.agent_id, force=True)
        if self.ledger.open is not None:
            self.fleet.budget.renew(self.ledger.open.id)
        idle = now - self.last_progress
        if idle > self.s.stuck_no_progress_minutes * 60:
            try:
                self.stuck(f"no progress for {idle / 60:.0f} minutes")
            except StopRun as stop:
                self.request_stop(stop.status, stop.reason)
        return True

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> AgentResult | None:
        """Run to a result (None when handed back); the work so far is committed whatever ends the run."""
        started_at: str = self.rec.get("started_at") or iso(utcnow()) or ""
        duration = min(self.s.max_task_duration_minutes, self.spec.max_duration_minutes or 10**9)
        deadline = datetime.fromisoformat(started_at).timestamp() + duration * 60
        self.fleet.store.update(self.agent_id, self.fence, state=State.RUNNING.value, worker=self.worker,
                                started_at=started_at, heartbeat_at=iso(utcnow()))
        self.fleet.r.zadd(self.fleet.keys.heartbeats, {self.agent_id: time.time()})
        self.fleet.r.zadd(self.fleet.keys.deadlines, {self.agent_id: deadline})
        if not price_for(self.model_name)[1]:
            self.warn(f"model {self.model_name!r} has no price in the table: its cost is estimated at the fallback "
                      "(most expensive) tier")
        supervisor = Supervisor(
            self.fleet.r, self.fleet.keys, self.agent_id, interval=self.s.heartbeat_interval_seconds,
            beat=self.beat, stop=self.request_stop, deadline=deadline,
            hard_deadline=self.fleet.budget.hard, on_warning=self.warn,
        ).start()
        status, error, commit, wt = State.COMPLETED, None, None, None
        gates: list[GateResult] = []
        try:
            supervisor.check_persisted_stop()
            wt = self.fleet.workspace.prepare(self.agent_id, self.spec.repo, self.spec.base_branch,
                                              self.rec["branch"])
            self.fleet.store.update(self.agent_id, self.fence, worktree=str(wt.path))
            status, error, gates = self._drive(wt)
        except StopRun as stop:
            status, error = stop.status, stop.reason
            self.handed_back = stop.status == State.RECOVERING
        except StaleFence:
            raise
        except WorkspaceError as exc:
            status, error = State.FAILED, str(exc)
        except Exception as exc:  # an unexpected error still ends in a result, never a lost agent
            log.exception("agent %s failed", self.agent_id)
            status, error = State.FAILED, redact_text(f"{type(exc).__name__}: {exc}")
        finally:
            self.ledger.release_open()
            supervisor.close()
        if wt is not None:
            commit, push_error = self._commit_and_push(wt, status, gates)
            error = error or push_error
        if self.handed_back:
            self._hand_back(error or "handed back")
            return None
        return self._finish(status, error, gates, commit, started_at)

    def _hand_back(self, reason: str) -> None:
        """The worker is shutting down: leave the agent to resume from its checkpoint on another worker."""
        self.check_fence()
        self.fleet.store.update(self.agent_id, self.fence, state=State.RECOVERING.value)
        self.fleet.store.add_event(self.agent_id, "recovering", f"{reason} (worker {self.worker})")
        self.fleet.r.zrem(self.fleet.keys.heartbeats, self.agent_id)
        log.warning("agent %s handed back: %s", self.agent_id, reason)

    def _drive(self, wt: Worktree) -> tuple[State, str | None, list[GateResult]]:
        toolbox = Toolbox(wt.path, shell_timeout=self.s.shell_timeout_seconds, output_limit=self.s.tool_output_limit)
        self.toolbox = toolbox
        model = ModelClient(self.fleet.anthropic_factory(), self.model_name, SYSTEM_PROMPT.format(path=wt.path),
                            TOOL_DEFINITIONS, user_id=self.agent_id)
        self.model = model
        if self.stop.is_set():
            model.cancel()
        saved = self.fleet.store.load_checkpoint(self.agent_id)
        cp = Checkpoint.from_json(saved) if saved else Checkpoint(messages=[{"role": "user",
                                                                            "content": self.spec.prompt}])
        self.checkpoint = cp
        max_turns = self.spec.max_turns or self.s.max_turns
        config = LoopConfig(max_turns=max_turns, max_tokens_per_turn=self.s.max_tokens_per_turn,
                            stuck_repeats=self.s.stuck_repeat_limit)
        loop = AgentLoop(model, toolbox, self.ledger, self.stop, config, on_checkpoint=self._save_checkpoint,
                         on_progress=self._progress, on_stuck=self.stuck)
        gates: list[GateResult] = []
        for attempt in range(1, self.spec.max_gate_attempts + 1):
            cp = loop.run(cp)
            if not self.spec.quality_gates:
                return State.COMPLETED, None, gates
            round_results = run_gates(self.spec.quality_gates, wt.path, attempt, self.stop)
            gates.extend(round_results)
            self.fleet.store.update(self.agent_id, self.fence, gates=[g.model_dump() for g in gates])
            if all(g.passed for g in round_results):
                return State.COMPLETED, None, gates
            if attempt < self.spec.max_gate_attempts:
                self._commit(wt, f"round {attempt}")
                cp.messages.append({"role": "user", "content": gate_feedback(round_results)})
                cp.stop_reason = None
                self._save_checkpoint(cp)
        failed = ", ".join(g.name for g in gates[-len(self.spec.quality_gates):] if not g.passed)
        error = f"quality gates failed after {self.spec.max_gate_attempts} attempt(s): {failed}"
        return State.GATES_FAILED, error, gates

    def _save_checkpoint(self, cp: Checkpoint) -> None:
        self.checkpoint = cp
        self.last_progress = time.time()
        self.fleet.store.save_checkpoint(self.agent_id, cp.to_json(), self.fence, turns=cp.turns,
                                         usage=cp.usage.model_dump())

    def _progress(self, cp: Checkpoint) -> None:
        self.checkpoint = cp
        self.last_progress = time.time()
        self.fleet.store.update(self.agent_id, self.fence, turns=cp.turns, usage=cp.usage.model_dump(),
                                last_tool=cp.last_tool, heartbeat_at=iso(utcnow()))

    def _commit(self, wt: Worktree, note: str) -> str | None:
        self.check_fence()
        message = f"{self.spec.task_id}: agent {self.agent_id} ({note})\n\n{self.spec.prompt[:500]}"
        return self.fleet.workspace.commit(wt, message, f"agent-{self.agent_id}",
                                           f"{self.agent_id}@agents.orchestrator", self.spec.base_branch)

    def _commit_and_push(self, wt: Worktree, status: State,
                         gates: list[GateResult]) -> tuple[str | None, str | None]:
        try:
            commit = self._commit(wt, status.value)
        except WorkspaceError as exc:
            return None, f"commit failed: {exc}"
        if self.spec.push and status == State.COMPLETED and commit is not None:
            try:
                self.fleet.workspace.push(wt)
            except WorkspaceError as exc:
                return commit, f"push failed (the commit stays local): {exc}"
        return commit, None

    def _finish(self, status: State, error: str | None, gates: list[GateResult], commit: str | None,
                started_at: str) -> AgentResult:
        cp = self.checkpoint
        result = AgentResult(
            agent_id=self.agent_id, task_id=self.spec.task_id, status=status, worker=self.worker,
            branch=self.rec["branch"], commit=commit, turns=cp.turns if cp else 0,
            usage=cp.usage if cp else Usage(), gates=gates, error=error, started_at=started_at,
            finished_at=iso(utcnow()), metadata=self.spec.metadata, stop_reason=cp.stop_reason if cp else None,
            warnings=self.warnings,
        )
        self.fleet.store.finish(self.agent_id, result, self.fence)
        pipe = self.fleet.r.pipeline()
        for gate in gates:
            pipe.hincrby(self.fleet.keys.stats, "gates_passed" if gate.passed else "gates_failed", 1)
        pipe.execute()
        if status == State.KILLED:
            Killswitch(self.fleet.r, self.fleet.keys).record_stop(self.agent_id, error or "")
        log.info("agent %s finished: %s", self.agent_id, status.value)
        return result
