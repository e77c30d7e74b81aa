"""The operator's CLI: ``orchestrator submit|agents|show|kill|resume|killswitch|budget|rejected``.

Every listing takes ``--json``, which prints exactly one JSON document (the contract's shape) and nothing else.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import redis

from orchestrator.fleet import Fleet
from orchestrator.killswitch import Killswitch, kill, release
from orchestrator.states import RESUMABLE_STATES, State
from orchestrator.store import public_record

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


@cache
def out() -> Console:
    """Standard output for humans (rich is imported only when a command prints for a human)."""
    from rich.console import Console

    # Piped output (scripts, logs) gets wide tables instead of rich's 80-column default, so ids never wrap.
    return Console(stderr=False, width=None if sys.stdout.isatty() else 200)


@cache
def err() -> Console:
    """Standard error for humans."""
    from rich.console import Console

    return Console(stderr=True)


def _redact(text: str) -> str:
    from orchestrator.redaction import redact

    return redact(text)


def _table(title: str) -> Table:
    from rich.table import Table

    return Table(title=title)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _operator() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _settings() -> Any:
    from orchestrator.settings import get_settings

    # An operator's command should say at once that Valkey is down, not retry for minutes like a worker does.
    return get_settings().model_copy(update={"valkey_retry_seconds": 1.0})


def _fleet() -> Fleet:
    fleet = Fleet.create(_settings())

    def enqueue(agent_id: str) -> None:
        from orchestrator.celery import enqueue_run  # Celery only for the commands that send a run message

        enqueue_run(fleet.store, agent_id)

    fleet.enqueue = enqueue
    return fleet


def _tokens(rec: dict[str, Any]) -> int:
    return int((rec.get("usage") or {}).get("total_tokens") or 0)


def describe_state(rec: dict[str, Any], now: float | None = None) -> str:
    """The state as an operator reads it: ``running (waiting: rate limited, 14 s)`` while a run waits."""
    state = str(rec.get("state"))
    waiting = rec.get("waiting")
    if state == State.RUNNING.value and isinstance(waiting, dict) and waiting.get("until"):
        left = float(waiting["until"]) - (now if now is not None else time.time())
        if left > 0:
            return f"{state} (waiting: {waiting.get('reason') or 'paused'}, {left:.0f} s)"
    return state


def _agents_table(records: Sequence[dict[str, Any]]) -> Table:
    table = _table(f"{len(records)} agent(s)")
    for col in ("agent", "task", "state", "worker", "turns", "tokens", "heartbeat", "branch"):
        table.add_column(col, no_wrap=True)
    table.add_column("error", overflow="fold")
    for rec in records:
        age = rec.get("heartbeat_age_seconds")
        table.add_row(rec["agent_id"], str(rec.get("task_id")), describe_state(rec), str(rec.get("worker") or "-"),
                      str(rec.get("turns") or 0), f"{_tokens(rec):,}", f"{age:.0f}s ago" if age is not None else "-",
                      str(rec.get("branch") or "-"), str(rec.get("error") or ""))
    return table


def cmd_agents(args: argparse.Namespace) -> int:
    """List agents (live ones, or all with ``--all``)."""
    fleet = _fleet()
    records = [public_record(r) for r in fleet.store.list_agents(include_finished=args.all)]
    if args.json:
        _print_json(records)
        return 0
    if args.watch:
        from rich.live import Live

        with Live(_agents_table(records), console=out(), refresh_per_second=2) as live:
            while True:
                time.sleep(args.watch)
                fresh = fleet.store.list_agents(include_finished=args.all)
                live.update(_agents_table([public_record(r) for r in fresh]))
    out().print(_agents_table(records))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """One agent's record, result and events."""
    fleet = _fleet()
    rec = fleet.store.get(args.agent_id) or fleet.store.get(fleet.store.agent_for_task(args.agent_id) or "")
    if rec is None:
        err().print(f"no agent {args.agent_id!r}")
        return 1
    doc = {**public_record(rec), "spec": rec.get("spec"), "result": rec.get("result"),
           "events": fleet.store.events(rec["agent_id"]), "worktree": rec.get("worktree"),
           "last_tool": rec.get("last_tool"), "gates": rec.get("gates")}
    if args.json:
        _print_json(doc)
    else:
        out().print_json(json.dumps(doc, default=str))
    return 0


def cmd_rejected(args: argparse.Namespace) -> int:
    """Specs that were rejected, with why."""
    items = _fleet().store.rejected()
    if args.json:
        _print_json(items)
        return 0
    table = _table(f"{len(items)} rejected spec(s)")
    for col in ("rejected at", "task", "why"):
        table.add_column(col, overflow="fold")
    for item in items:
        why = "; ".join(f"{e['field']}: {e['message']}" for e in item["errors"])
        table.add_row(item["rejected_at"], str(item.get("task_id")), why)
    out().print(table)
    return 0


def cmd_callbacks(args: argparse.Namespace) -> int:
    """Result deliveries still pending, and those given up on."""
    from orchestrator.ops import outbox

    doc = outbox(_fleet()).listing()
    if args.json:
        _print_json(doc)
        return 0
    table = _table(f"{len(doc['pending'])} pending, {len(doc['dead'])} undeliverable callback(s)")
    for col in ("agent", "target", "attempts", "last error", "state"):
        table.add_column(col, overflow="fold")
    for state, items in (("pending", doc["pending"]), ("undeliverable", doc["dead"])):
        for item in items:
            cb = item["callback"]
            target = _redact(cb["url"]) if cb.get("url") else f"{cb.get('task')} on {cb.get('queue')}"
            table.add_row(item["agent_id"], target, str(item["attempts"]), str(item["last_error"] or ""), state)
    out().print(table)
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    """The usage summary of today."""
    fleet = _fleet()
    ids = set(fleet.budget.day_agent_ids()) | {r["agent_id"] for r in fleet.store.list_agents()}
    summary = fleet.budget.summary(fleet.store.get_many(sorted(ids)))
    if args.json:
        _print_json(summary)
        return 0
    table = _table(f"Budget {summary['date']} ({summary['timezone']}, {summary['enforcement']} enforcement), "
                   f"cost ${summary['cost_usd']:.4f}")
    for col in ("scope", "used", "limit", "percent", "status"):
        table.add_column(col)
    d, c = summary["daily"], summary["concurrency"]
    table.add_row("daily tokens", f"{d['used']:,}", f"{d['limit']:,}", f"{d['percent']}%", d["status"])
    table.add_row("concurrent agents", str(c["running"]), str(c["limit"]), f"{c['percent']}%", c["status"])
    for a in summary["agents"]:
        table.add_row(f"agent {a['agent_id']}", f"{a['used']:,}", f"{a['limit']:,}", f"{a['percent']}%", a["status"])
    out().print(table)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    """Stop one agent wherever it runs."""
    outcome = kill(_fleet(), args.agent_id, args.reason)
    if outcome == "unknown":
        err().print(f"no agent {args.agent_id!r}")
        return 1
    messages = {"stopping": "kill requested: its run stops and commits its work",
                "finished": "it was not running: finished as killed", "final": "it had already finished"}
    out().print(f"agent {args.agent_id}: {messages[outcome]}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a killed, failed, timed-out or held agent from its checkpoint, with a fresh duration window."""
    fleet = _fleet()
    rec = fleet.store.get(args.agent_id)
    if rec is None:
        err().print(f"no agent {args.agent_id!r}")
        return 1
    resumed, previous, score = fleet.lifecycle.resume(args.agent_id, rec.get("task_id"), _operator())
    if not resumed:
        allowed = ", ".join(s.value for s in RESUMABLE_STATES)
        err().print(f"agent {args.agent_id} is {previous}: only {allowed} agents resume")
        return 1
    fleet.dispatch(args.agent_id, score)
    out().print(f"agent {args.agent_id} ({previous}) queued to resume from its checkpoint")
    return 0


def cmd_killswitch(args: argparse.Namespace) -> int:
    """Engage, release or show the fleet killswitch."""
    fleet = _fleet()
    switch = Killswitch(fleet.r, fleet.keys)
    if args.action == "engage":
        started = time.monotonic()
        running = fleet.budget.running()
        doc = switch.engage(args.reason, by=_operator(), running=running)
        print(f"killswitch ENGAGED: {args.reason}", flush=True)
        if args.wait > 0 and running:
            _report_stops(fleet, switch, running, started, args.wait)
        return 0 if doc["engaged"] else 1
    if args.action == "release":
        doc = release(fleet, by=_operator(), resume=args.resume)
        out().print(f"killswitch released; {doc['resumed']} held agent(s) re-enqueued")
        return 0
    if args.action == "audit":
        events = switch.audit()
        if args.json:
            _print_json(events)
        else:
            for event in events:
                out().print(json.dumps(event), markup=False, highlight=False)
        return 0
    status = switch.status()
    if args.json:
        _print_json(status)
    else:
        state = "ENGAGED" if status["engaged"] else "released"
        print(f"killswitch {state} reason={status['reason']} since={status['engaged_at']} held={status['held']}")
    return 0


def _report_stops(fleet: Fleet, switch: Killswitch, running: int, started: float, wait: float) -> None:
    """Wait (up to ``wait`` s) for the running agents to stop, then say how many did and how fast."""
    deadline = started + wait
    while time.monotonic() < deadline and fleet.budget.running() > 0:
        time.sleep(0.05)
    status = switch.status()
    left = fleet.budget.running()
    print(f"{status['stopped']} of {running} running agent(s) stopped, the slowest "
          f"{status['slowest_stop_seconds']:.2f} s after engage (work committed, state killed)"
          + (f"; {left} still stopping" if left else ""))


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """A spec from ``submit``'s flags."""
    spec: dict[str, Any] = {"task_id": args.task_id or f"cli-{uuid.uuid4().hex[:12]}", "prompt": args.prompt,
                            "repo": args.repo, "base_branch": args.base_branch}
    if args.gate:
        spec["quality_gates"] = [{"name": f"gate-{i + 1}", "command": cmd} for i, cmd in enumerate(args.gate)]
    for name in ("model", "max_turns", "token_limit", "priority", "branch"):
        value = getattr(args, name)
        if value is not None:
            spec[name] = value
    if args.push:
        spec["push"] = True
    return spec


def cmd_submit(args: argparse.Namespace) -> int:
    """Enqueue an agent; with ``--wait``, follow it live and print its result."""
    from orchestrator.celery import AGENTS_QUEUE, SPAWN_TASK, app

    spec = build_spec(args)
    async_result = app.send_task(SPAWN_TASK, kwargs={"spec": spec}, queue=AGENTS_QUEUE)
    if not args.wait:
        doc = {"task_id": spec["task_id"], "celery_task_id": async_result.id}
        _print_json(doc) if args.json else out().print(f"submitted task {spec['task_id']} ({async_result.id})")
        return 0
    result = follow(_fleet(), spec["task_id"], async_result, quiet=args.json, timeout=args.timeout)
    if args.json:
        _print_json(result)
    else:
        out().print_json(json.dumps(result))
    return 0 if result.get("status") == State.COMPLETED.value else 3


def follow(fleet: Fleet, task_id: str, async_result: Any, quiet: bool = False,
           timeout: float = 3600) -> dict[str, Any]:
    """Show an agent's turns, tokens and tool calls live until its result arrives."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if async_result.ready():
            result: dict[str, Any] = async_result.get(timeout=10)
            return result
        agent_id = fleet.store.agent_for_task(task_id)
        rec = fleet.store.get(agent_id) if agent_id else None
        if rec is not None and not quiet:
            line = (f"[{rec['state']}] agent {agent_id} turn {rec.get('turns') or 0} "
                    f"tokens {_tokens(rec):,} {('- ' + rec['last_tool']) if rec.get('last_tool') else ''}")
            if line != last:
                err().print(line, markup=False, highlight=False, soft_wrap=True)
                last = line
        time.sleep(0.2)
    raise TimeoutError(f"no result for task {task_id} within {timeout}s")


def cmd_metrics(args: argparse.Namespace) -> int:
    """Serve Prometheus metrics of the whole fleet (read from Valkey on each scrape)."""
    from orchestrator.metrics import serve

    err().print(f"serving fleet metrics on http://{args.host}:{args.port}/metrics (Ctrl-C stops)")
    serve(args.port, args.host)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(prog="orchestrator", description="Operate the agent fleet.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="enqueue an agent")
    s.add_argument("--repo", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--task-id")
    s.add_argument("--gate", action="append", default=[], help="quality gate command (repeatable)")
    s.add_argument("--base-branch", default="main")
    s.add_argument("--branch")
    s.add_argument("--model")
    s.add_argument("--max-turns", type=int)
    s.add_argument("--token-limit", type=int)
    s.add_argument("--priority", type=int)
    s.add_argument("--push", action="store_true")
    s.add_argument("--wait", action="store_true", help="follow the agent live and print its result")
    s.add_argument("--timeout", type=float, default=3 * 3600)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_submit)

    a = sub.add_parser("agents", help="list agents")
    a.add_argument("--all", action="store_true", help="finished agents too")
    a.add_argument("--json", action="store_true")
    a.add_argument("--watch", type=float, nargs="?", const=2.0, help="refresh every N seconds")
    a.set_defaults(func=cmd_agents)

    sh = sub.add_parser("show", help="one agent's record and result")
    sh.add_argument("agent_id")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_show)

    k = sub.add_parser("kill", help="stop one agent")
    k.add_argument("agent_id")
    k.add_argument("--reason", default="killed by operator")
    k.set_defaults(func=cmd_kill)

    r = sub.add_parser("resume", help="continue a killed or held agent from its checkpoint")
    r.add_argument("agent_id")
    r.set_defaults(func=cmd_resume)

    ks = sub.add_parser("killswitch", help="emergency stop of the whole fleet")
    ks_sub = ks.add_subparsers(dest="action", required=True)
    e = ks_sub.add_parser("engage")
    e.add_argument("--reason", required=True)
    e.add_argument("--wait", type=float, default=10.0,
                   help="seconds to wait for running agents to stop before reporting (0: return at once)")
    rel = ks_sub.add_parser("release")
    rel.add_argument("--resume", action="store_true", help="enqueue held agents again")
    st = ks_sub.add_parser("status")
    st.add_argument("--json", action="store_true")
    au = ks_sub.add_parser("audit", help="who engaged and released, when, why, how many stopped and how fast")
    au.add_argument("--json", action="store_true")
    ks.set_defaults(func=cmd_killswitch)

    b = sub.add_parser("budget", help="token and concurrency usage")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_budget)

    rj = sub.add_parser("rejected", help="rejected specs")
    rj.add_argument("--json", action="store_true")
    rj.set_defaults(func=cmd_rejected)

    cb = sub.add_parser("callbacks", help="pending and undeliverable result callbacks")
    cb.add_argument("--json", action="store_true")
    cb.set_defaults(func=cmd_callbacks)

    m = sub.add_parser("metrics", help="serve Prometheus metrics of the whole fleet")
    m.add_argument("--port", type=int, default=9108)
    m.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    m.set_defaults(func=cmd_metrics)

    d = sub.add_parser("demo", help="run the whole fleet locally on a sample repository")
    d.set_defaults(func=lambda args: __import__("orchestrator.demo", fromlist=["main"]).main())
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orchestrator`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except redis.ConnectionError as exc:
        from orchestrator.settings import get_settings, redact_url

        url = redact_url(get_settings().state_redis_url)
        err().print(f"[red]cannot reach Valkey at {url}[/]: {exc}\n"
                  "Start it (e.g. `valkey-server --port 6379`) or point ORCHESTRATOR_BROKER_URL at a running server.")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
