"""One agent's run from intake to result: admission, worktree, loop, gates, commit, push, result.

Plain functions over a ``Fleet``; the Celery task in ``workers/tasks.py`` only calls ``intake`` and ``execute``.
Every change of the agent's state goes through ``orchestrator.lifecycle``.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import uuid
from typing import Any

from orchestrator.agent.loop import AgentLoop, Checkpoint, LoopConfig, StopSignal
from orchestrator.agent.model import ModelClient
from orchestrator.agent.tools import TOOL_DEFINITIONS, Toolbox, safe_env
from orchestrator.budget import AgentLedger, Progress
from orchestrator.errors import StaleFence, StopRun
from orchestrator.fleet import Fleet
from orchestrator.gates import GATE_OUTPUT_LIMIT, gate_feedback, run_gates
from orchestrator.killswitch import Killswitch, parse_stop_request
from orchestrator.lifecycle import Admission, BeatReply
from orchestrator.logs import set_agent_context
from orchestrator.models import AgentResult, AgentSpec, GateResult, Rejection, Usage, iso, utcnow, validate_spec
from orchestrator.pricing import context_window_for, price_for
from orchestrator.ratelimit import RateLimiter
from orchestrator.results import callback_entry, finish_unstarted, result_fields
from orchestrator.sandbox import Sandbox, SandboxConfig
from orchestrator.settings import redact_text
from orchestrator.states import State
from orchestrator.supervisor import Supervisor
from orchestrator.workspace import Snapshot, WorkspaceError, Worktree

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """You are a software engineering agent working in a git worktree at {path}.
Use the bash tool to run commands (each command starts in the worktree) and the str_replace_based_edit_tool to view
and edit files; paths are relative to the worktree. Make the change the task asks for, run the project's tests,
and when you are done reply with a short summary of what you changed. Your changes are committed for you."""


def new_record(spec: AgentSpec, celery_task_id: str | None) -> dict[str, Any]:
    """The record of a freshly registered agent (the lifecycle fills in its id and default branch)."""
    return {
        "task_id": spec.task_id, "state": State.QUEUED.value, "worker": None, "turns": 0, "usage": None,
        "heartbeat_at": None, "started_at": None, "finished_at": None, "branch": spec.branch, "commit": None,
        "error": None, "created_at": iso(utcnow()), "celery_task_id": celery_task_id, "priority": spec.priority,
        "spec": spec.model_dump(mode="json"), "recoveries": 0, "result": None, "window_start": None,
    }


def intake(fleet: Fleet, raw: Any, celery_task_id: str | None) -> AgentResult | tuple[str, float]:
    """Validate a spec and register its agent: (agent_id, dispatch score), or a ``rejected``/``duplicate`` result.

    The dispatch score is 0 for a redelivered intake message (its agent was registered already).
    """
    s = fleet.settings
    parsed = validate_spec(raw, workspace_dir=s.workspace_dir, key_prefix=s.key_prefix,
                           webhook_allowed_hosts=s.webhook_allowed_hosts)
    now = iso(utcnow())
    if isinstance(parsed, Rejection):
        fleet.store.reject(parsed)
        fleet.r.hincrby(fleet.keys.stats, f"finished:{State.REJECTED.value}", 1)
        log.warning("rejected spec (task_id=%s): %s", parsed.task_id, parsed.summary())
        return AgentResult(agent_id=None, task_id=parsed.task_id, status=State.REJECTED, error=parsed.summary(),
                           started_at=now, finished_at=now, metadata=parsed.metadata or {})
    agent_id, created, score = fleet.lifecycle.create(new_record(parsed, celery_task_id), parsed.task_id)
    if created:
        return agent_id, score
    existing = fleet.store.get(agent_id) or {}
    if celery_task_id and existing.get("celery_task_id") == celery_task_id:
        return agent_id, 0.0  # the same message delivered again: not a new spec; admission decides who runs
    fleet.r.hincrby(fleet.keys.stats, f"finished:{State.DUPLICATE.value}", 1)
    return AgentResult(agent_id=agent_id, task_id=parsed.task_id, status=State.DUPLICATE,
                       branch=existing.get("branch"), error=f"task_id {parsed.task_id!r} already has agent {agent_id}",
                       started_at=now, finished_at=now, metadata=parsed.metadata)


def duration_seconds(fleet: Fleet, spec: AgentSpec) -> float:
    """The agent's duration limit: the fleet's, lowered (never raised) by its spec."""
    minutes = fleet.settings.max_task_duration_minutes
    if spec.max_duration_minutes:
        minutes = min(minutes, spec.max_duration_minutes)
    return float(minutes * 60)


def execute(fleet: Fleet, agent_id: str, worker: str) -> AgentResult | None:
    """Run (or resume) an agent to its result; None when this delivery must not act (held, waiting, owned)."""
    rec = fleet.store.get(agent_id)
    if rec is None:
        log.warning("agent %s has no record (expired or never registered): nothing to run", agent_id)
        return None
    spec = AgentSpec.model_validate(rec["spec"])
    holder = f"{worker}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    adm = fleet.lifecycle.admit(agent_id, holder, worker, priority=spec.priority,
                                duration_seconds=duration_seconds(fleet, spec))
    if adm.outcome == "final":  # a redelivered message of a finished agent: its stored result, nothing else
        done = fleet.store.get(agent_id) or rec
        return AgentResult.model_validate(done["result"]) if done.get("result") else None
    if adm.outcome in ("unknown", "busy"):
        log.info("agent %s: %s; this delivery does nothing", agent_id, adm.outcome)
        return None
    if adm.outcome == "held":
        fleet.store.add_event(agent_id, "held", "killswitch engaged: held until release --resume")
        return None
    if adm.outcome == "waiting":
        fleet.store.add_event(agent_id, "waiting", "no free concurrency slot: waiting in the queue")
        fleet.wake()  # a slot freed between another run's wake and this park is not lost
        return None
    if adm.outcome == "stop":
        request = Killswitch(fleet.r, fleet.keys).kill_requested(agent_id) or (State.KILLED, "killed")
        return finish_unstarted(fleet, rec, request[0], f"stopped before it started: {request[1]}", fence=adm.fence)
    if adm.outcome == "give_up":
        fleet.r.hincrby(fleet.keys.stats, "recoveries_given_up", 1)
        return finish_unstarted(fleet, rec, State.FAILED, f"worker presumed dead; gave up after "
                                f"{fleet.settings.max_recoveries} recoveries", fence=adm.fence)
    return _run_admitted(fleet, rec, spec, worker, holder, adm)


def _run_admitted(fleet: Fleet, rec: dict[str, Any], spec: AgentSpec, worker: str, holder: str,
                  adm: Admission) -> AgentResult | None:
    agent_id = rec["agent_id"]
    rec = fleet.store.get(agent_id) or rec  # as admission left it (started_at, window)
    if adm.over_limit:
        fleet.store.add_event(agent_id, "warning", "concurrency limit passed (soft mode: running anyway)")
    run = AgentRun(fleet, rec, spec, worker, holder, adm)
    set_agent_context(agent_id, spec.task_id)
    try:
        return run.run()
    except StaleFence:
        log.warning("agent %s: a newer run owns it; this worker writes nothing more", agent_id)
        return None
    finally:
        set_agent_context(None, None)
        if run.dispatch_score:
            fleet.dispatch(agent_id, run.dispatch_score)
        fleet.wake()


class AgentRun:
    """State of one run in this process: the stop signal, the ledger, the model and tools in use."""

    def __init__(self, fleet: Fleet, rec: dict[str, Any], spec: AgentSpec, worker: str, holder: str,
                 adm: Admission) -> None:
        self.fleet = fleet
        self.s = fleet.settings
        self.rec = rec
        self.spec = spec
        self.agent_id: str = rec["agent_id"]
        self.worker = worker
        self.holder = holder
        self.fence = adm.fence
        self.deadline = adm.window_start + duration_seconds(fleet, spec)
        self.stop = StopSignal()
        self.model_name = spec.model or self.s.model
        self.agent_limit = min(self.s.agent_token_limit, spec.token_limit or self.s.agent_token_limit)
        self.warnings: list[str] = []
        self.ledger = AgentLedger(fleet.budget, self.agent_id, self.agent_limit, self.model_name, self.warn,
                                  persist=self._progress_to_carry)
        self.limiter = RateLimiter(fleet.r, fleet.keys, self.model_name, self.stop,
                                   max_wait=self.s.rate_limit_max_wait_seconds, on_wait=self._waiting)
        self.model: ModelClient | None = None
        self.toolboxes: list[Toolbox] = []
        self.checkpoint: Checkpoint | None = None
        self.dispatch_score = 0.0  # set when the run hands the agent back: its message is sent after the run
        self.worktree: Worktree | None = None
        self.snapshot_key: str | None = None
        self.fingerprint: str | None = None
        self.snapshot_warned = False
        self.fingerprint_memo: dict[str, tuple[tuple[int, ...], bytes, bool]] = {}
        self.last_progress = time.time()
        self.stuck_flagged = False

    # -- callbacks from the supervisor thread -----------------------------------------------------------
    def warn(self, message: str) -> None:
        """Record a warning in the agent's events and the log."""
        self.warnings.append(message)
        log.warning("agent %s: %s", self.agent_id, message)
        self.fleet.store.add_event(self.agent_id, "warning", message)

    def stuck(self, reason: str) -> None:
        """An agent that loops or makes no progress: flag it, and stop it if the settings say so."""
        if not self.stuck_flagged:
            self.stuck_flagged = True
            log.warning("agent %s looks stuck: %s", self.agent_id, reason)
            self.fleet.lifecycle.save(self.agent_id, self.fence, stuck=reason)
            self.fleet.store.add_event(self.agent_id, "stuck", reason)
        if self.s.stuck_action == "stop":
            raise StopRun(State.FAILED, f"stuck: {reason}")

    def request_stop(self, status: State, reason: str) -> None:
        """Stop now: cut the model call and kill the shell command or gate in flight (thread-safe)."""
        if not self.stop.request(status, reason):
            return
        log.warning("agent %s stopping: %s (%s)", self.agent_id, status.value, reason)
        if self.model is not None:
            self.model.cancel()
        for box in self.toolboxes:
            box.kill_running()

    def beat(self) -> BeatReply:
        """Heartbeat: renew lease, slot and open reservation; publish progress; read the persisted stops."""
        cp = self.checkpoint
        fields: dict[str, Any] = {"heartbeat_at": iso(utcnow())}
        if cp is not None:
            fields.update(turns=cp.turns, usage=cp.usage.model_dump(), last_tool=cp.last_tool)
        res = self.ledger.open
        reply = self.fleet.lifecycle.beat(self.agent_id, self.holder, self.fence,
                                          reservation_id=res.id if res is not None else None,
                                          reservation_lease_seconds=self.s.reservation_lease_seconds, **fields)
        idle = time.time() - self.last_progress
        if reply.owned and idle > self.s.stuck_no_progress_minutes * 60:
            try:
                self.stuck(f"no progress for {idle / 60:.0f} minutes")
            except StopRun as stop:
                self.request_stop(stop.status, stop.reason)
        return reply

    def on_stop_request(self, raw: str) -> None:
        """A persisted kill for this agent (from a beat)."""
        request = parse_stop_request(raw)
        if request is not None:
            self.request_stop(*request)

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> AgentResult | None:
        """Run to a result (None when handed back); the work so far is committed whatever ends the run."""
        if not price_for(self.model_name)[1]:
            self.warn(f"model {self.model_name!r} has no price in the table: its cost is estimated at the fallback "
                      "(most expensive) tier")
        supervisor = Supervisor(
            self.agent_id, self.fleet.keys.stop_channel, self.fleet.r, interval=self.s.heartbeat_interval_seconds,
            beat=self.beat, stop=self.request_stop, on_stop_request=self.on_stop_request, deadline=self.deadline,
            hard_deadline=self.fleet.budget.hard, on_warning=self.warn, on_pause=self.limiter.on_message,
        ).start()
        status, error, wt = State.COMPLETED, None, None
        gates: list[GateResult] = []
        handed_back = False
        try:
            wt = self._prepare()
            self.fleet.lifecycle.save(self.agent_id, self.fence, worktree=str(wt.path))
            status, error, gates = self._drive(wt)
        except StopRun as stop:
            status, error = stop.status, stop.reason
            handed_back = stop.status == State.RECOVERING
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
        commit = None
        if wt is not None:
            status, error, commit = self._commit_and_push(wt, status, error)
        if handed_back:
            self.dispatch_score = self.fleet.lifecycle.hand_back(
                self.agent_id, self.holder, self.fence, f"{error or 'handed back'} (worker {self.worker})")
            log.warning("agent %s handed back: %s", self.agent_id, error)
            return None
        return self._finish(status, error, gates, commit)

    def _drive(self, wt: Worktree) -> tuple[State, str | None, list[GateResult]]:
        sandbox = self._sandbox(wt)
        agent_box = Toolbox(wt.path, shell_timeout=self.s.shell_timeout_seconds, output_limit=self.s.tool_output_limit,
                            sandbox=sandbox)
        gate_box = Toolbox(wt.path, output_limit=GATE_OUTPUT_LIMIT, sandbox=sandbox)
        self.toolboxes = [agent_box, gate_box]
        model = ModelClient(self.fleet.anthropic_factory(), self.model_name, SYSTEM_PROMPT.format(path=wt.path),
                            TOOL_DEFINITIONS, user_id=self.agent_id)
        self.model = model
        if self.stop.is_set():  # a stop that came before the model and tools existed
            model.cancel()
            for box in self.toolboxes:
                box.kill_running()
        saved = self.fleet.store.load_checkpoint(self.agent_id)
        cp = Checkpoint.from_json(saved) if saved else Checkpoint(messages=[{"role": "user",
                                                                            "content": self.spec.prompt}])
        self.checkpoint = cp
        max_turns = self.spec.max_turns or self.s.max_turns
        config = LoopConfig(max_turns=max_turns, max_tokens_per_turn=self.s.max_tokens_per_turn,
                            stuck_repeats=self.s.stuck_repeat_limit,
                            context_window=context_window_for(self.model_name, self.s.context_window_tokens),
                            keep_tool_results=self.s.context_keep_tool_results)
        loop = AgentLoop(model, agent_box, self.ledger, self.stop, config, on_checkpoint=self._save_checkpoint,
                         on_progress=self._progress, on_stuck=self.stuck, limiter=self.limiter)
        gates: list[GateResult] = []
        for attempt in range(1, self.spec.max_gate_attempts + 1):
            cp = loop.run(cp)
            if not self.spec.quality_gates:
                return State.COMPLETED, None, gates
            round_results = run_gates(self.spec.quality_gates, wt.path, attempt, self.stop, toolbox=gate_box,
                                      time_left=self._time_left)
            gates.extend(round_results)
            self.fleet.lifecycle.save(self.agent_id, self.fence, gates=[g.model_dump() for g in gates])
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

    def _sandbox(self, wt: Worktree) -> Sandbox | None:
        """Where this run's commands and gates run: bubblewrap around the worktree (CONTRACT section 6)."""
        config = SandboxConfig.from_settings(self.s)
        if config.mode == "off":
            self.warn("ORCHESTRATOR_SANDBOX=off: this agent's commands and gates ran unconfined, with the worker's "
                      "access to files and network")
            return None
        hide = [self.s.git_credentials_file] if self.s.git_credentials_file else []
        return Sandbox(config, wt.path, safe_env(), git=self.fleet.workspace.git_view(self.agent_id, self.spec.repo),
                       hide=hide)

    def _time_left(self) -> float:
        """Seconds this run has left (a gate's timeout is capped by it; unlimited in soft mode)."""
        return self.deadline - time.time() if self.fleet.budget.hard else float("inf")

    def _prepare(self) -> Worktree:
        """The worktree: rebuilt from the last checkpoint's snapshot when there is one (on any host), else the
        branch (or the base for a new agent)."""
        ws = self.fleet.workspace
        snapshot = self.fleet.store.load_snapshot(self.agent_id)
        if snapshot is not None:
            try:
                wt = ws.prepare(self.agent_id, self.spec.repo, self.spec.base_branch, self.rec["branch"], snapshot)
                self.worktree = wt
                return wt
            except WorkspaceError as exc:
                self.warn(f"the worktree could not be rebuilt from its last snapshot ({exc}); continuing from the "
                          "branch's last commit")
        wt = ws.prepare(self.agent_id, self.spec.repo, self.spec.base_branch, self.rec["branch"])
        self.worktree = wt
        return wt

    def _save_checkpoint(self, cp: Checkpoint) -> None:
        """The transcript, and with it (in the same step) the worktree's snapshot once tools may have changed it."""
        self.checkpoint = cp
        self.last_progress = time.time()
        snapshot, fingerprint = self._snapshot() if cp.messages and cp.messages[-1]["role"] == "user" else (None, None)
        self.fleet.lifecycle.save(self.agent_id, self.fence, cp.to_json(),
                                  snapshot=base64.b64encode(snapshot.bundle).decode() if snapshot else None,
                                  turns=cp.turns, usage=cp.usage.model_dump(), last_tool=cp.last_tool)
        self._snapshot_saved(snapshot, fingerprint)

    def _progress_to_carry(self, cp: Checkpoint | None) -> Progress:
        """The checkpoint (and, after tools, the worktree's snapshot) that the ledger writes with its reservation
        or settlement: the same fenced save as ``_save_checkpoint``, minus the record fields (the heartbeat
        publishes turns, usage and the last tool). Without a checkpoint: the fence alone."""
        k = self.fleet.keys
        if cp is None:
            return Progress(k.fence(self.agent_id), self.fence, k.checkpoint(self.agent_id), "",
                            k.snapshot(self.agent_id))
        self.checkpoint = cp
        self.last_progress = time.time()
        snapshot, fingerprint = self._snapshot() if cp.messages and cp.messages[-1]["role"] == "user" else (None, None)
        return Progress(k.fence(self.agent_id), self.fence, k.checkpoint(self.agent_id), cp.dumps(),
                        k.snapshot(self.agent_id), base64.b64encode(snapshot.bundle).decode() if snapshot else "",
                        on_saved=lambda: self._snapshot_saved(snapshot, fingerprint))

    def _snapshot_saved(self, snapshot: Snapshot | None, fingerprint: str | None) -> None:
        """A save carrying ``snapshot`` (or finding the worktree unchanged) went through: what the next one compares
        against. Recorded only then, so a save that failed leaves the next one to write the snapshot again."""
        if snapshot is not None:
            self.snapshot_key = snapshot.key
        if fingerprint is not None:
            self.fingerprint = fingerprint

    def _snapshot(self) -> tuple[Snapshot | None, str | None]:
        """The worktree's state for any host (None when unchanged, or too big: then a warning, once), and the
        fingerprint to record once the save carrying it succeeded (``_snapshot_saved``; None: nothing to record).

        A turn whose tools changed no file at all (by the worktree's fingerprint) costs no git call.
        """
        if self.worktree is None:
            return None, None
        fingerprint = self.fleet.workspace.fingerprint(self.worktree, self.fingerprint_memo)
        if fingerprint == self.fingerprint and self.snapshot_key is not None:
            return None, None
        try:
            return self.fleet.workspace.snapshot(self.worktree, self.agent_id, self.spec.base_branch,
                                                 previous=self.snapshot_key,
                                                 max_bytes=self.s.snapshot_max_mb << 20), fingerprint
        except WorkspaceError as exc:
            self.fingerprint = fingerprint  # the same failure would come again: look once files change
            if not self.snapshot_warned:
                self.snapshot_warned = True
                self.warn(f"no worktree snapshot ({exc}): a resume on another host would miss the uncommitted work")
            return None, None

    def _waiting(self, info: dict[str, Any] | None) -> None:
        """The record's ``waiting`` field: why and until when the run waits for the model (None: not waiting)."""
        self.fleet.lifecycle.save(self.agent_id, self.fence, waiting=info)
        if info is not None:
            self.fleet.store.add_event(self.agent_id, "waiting", f"{info['reason']} ({info.get('status') or '-'}): "
                                       f"waiting {max(0.0, info['until'] - time.time()):.0f} s")

    def _progress(self, cp: Checkpoint) -> None:
        self.checkpoint = cp
        self.last_progress = time.time()

    def _commit(self, wt: Worktree, note: str) -> str | None:
        self.fleet.lifecycle.save(self.agent_id, self.fence)  # still ours? (StaleFence otherwise)
        message = f"{self.spec.task_id}: agent {self.agent_id} ({note})\n\n{self.spec.prompt[:500]}"
        self.fingerprint = None  # a commit moves the head: the next snapshot must look again
        return self.fleet.workspace.commit(wt, message, f"agent-{self.agent_id}",
                                           f"{self.agent_id}@agents.orchestrator", self.spec.base_branch)

    def _commit_and_push(self, wt: Worktree, status: State,
                         error: str | None) -> tuple[State, str | None, str | None]:
        """Commit whatever the run left; push when it completed and asked to. (status, error, commit)."""
        try:
            commit = self._commit(wt, status.value)
        except WorkspaceError as exc:
            reason = f"commit failed, the work is not on the branch: {exc}"
            return State.FAILED, f"{error}; {reason}" if error else reason, None
        if self.spec.push and status == State.COMPLETED and commit is not None:
            try:
                self.fleet.workspace.push(wt)
            except WorkspaceError as exc:
                return State.PUSH_FAILED, f"push failed (the commit stays local): {exc}", commit
        return status, error, commit

    def _finish(self, status: State, error: str | None, gates: list[GateResult], commit: str | None) -> AgentResult:
        cp = self.checkpoint
        result = AgentResult(
            agent_id=self.agent_id, task_id=self.spec.task_id, status=status, worker=self.worker,
            branch=self.rec["branch"], commit=commit, turns=cp.turns if cp else 0,
            usage=cp.usage if cp else Usage(), gates=gates, error=error,
            started_at=self.rec.get("started_at") or iso(utcnow()), finished_at=iso(utcnow()),
            metadata=self.spec.metadata, stop_reason=cp.stop_reason if cp else None, warnings=self.warnings,
        )
        self.fleet.lifecycle.finish(
            self.agent_id, self.spec.task_id, status, result_fields(result), fence=self.fence,
            outbox=callback_entry(self.fleet, self.rec["spec"].get("callback"), result),
            event=f"{status.value}: {error}" if error else None)
        pipe = self.fleet.r.pipeline(transaction=False)
        for gate in gates:
            pipe.hincrby(self.fleet.keys.stats, "gates_passed" if gate.passed else "gates_failed", 1)
        pipe.execute()
        if status == State.KILLED:
            Killswitch(self.fleet.r, self.fleet.keys).record_stop(self.agent_id, error or "")
        log.info("agent %s finished: %s", self.agent_id, status.value)
        return result
