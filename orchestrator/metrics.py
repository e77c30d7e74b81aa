"""Prometheus metrics of the whole fleet, read from Valkey on every scrape.

One process (``orchestrator metrics --port 9108``, or ``python -m orchestrator.metrics``) serves the fleet: the
collector holds no state of its own, so any number of workers and any restart of this process report the same.
If Valkey cannot be reached the scrape still answers, with ``orchestrator_valkey_up 0`` and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.budget import ledger_fields
from orchestrator.fleet import Fleet
from orchestrator.killswitch import Killswitch
from orchestrator.ops import outbox
from orchestrator.settings import Settings, get_settings
from orchestrator.states import State
from orchestrator.store import state_client

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
BUDGET_STATUSES = ("within_budget", "approaching_limit", "at_limit", "exceeded")
LIVE_STATES = tuple(s.value for s in State if not s.final)
FINAL_STATES = tuple(s.value for s in State if s.final)
SCRAPE_SOCKET_TIMEOUT_SECONDS = 5.0


class FleetCollector(Collector):
    """Reads agents, budget, killswitch, health and callback state from Valkey at each ``collect``."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        """Every fleet metric, or only ``orchestrator_valkey_up 0`` when Valkey is unreachable."""
        started = time.perf_counter()
        up = 1
        try:
            metrics = list(self._fleet_metrics())
        except redis.RedisError as exc:
            log.warning("metrics scrape: Valkey unreachable: %s", exc)
            up, metrics = 0, []
        yield GaugeMetricFamily("orchestrator_valkey_up", "1 if the fleet state in Valkey could be read", value=up)
        yield from metrics
        yield GaugeMetricFamily("orchestrator_scrape_duration_seconds", "Time this scrape spent reading Valkey",
                                value=time.perf_counter() - started)

    def _fleet_metrics(self) -> Iterator[Metric]:
        f = self.fleet
        now = time.time()
        stats = cast(dict[str, str], f.r.hgetall(f.keys.stats))
        records = f.store.list_agents()

        agents = GaugeMetricFamily("orchestrator_agents", "Agents by state: live ones now, final ones ever finished",
                                   labels=["state"])
        finished = CounterMetricFamily("orchestrator_agents_finished", "Agents finished, by final status",
                                       labels=["status"])
        live = dict.fromkeys(LIVE_STATES, 0)
        for rec in records:
            state = str(rec.get("state"))
            if state in live:
                live[state] += 1
        final = {s: 0 for s in FINAL_STATES} | {k.removeprefix("finished:"): int(v) for k, v in stats.items()
                                                 if k.startswith("finished:")}
        for state, count in live.items():
            agents.add_metric([state], count)
        for status, count in final.items():
            agents.add_metric([status], count)
            finished.add_metric([status], count)
        yield agents
        yield finished

        summary = f.budget.summary()
        day, daily, conc = summary["date"], summary["daily"], summary["concurrency"]
        yield _counter("orchestrator_tokens_used", "Tokens settled today (a new series per day)", daily["used"],
                       day=day)
        yield _gauge("orchestrator_tokens_reserved", "Tokens reserved by model calls in flight", daily["reserved"],
                     day=day)
        yield _gauge("orchestrator_daily_token_limit", "Fleet tokens allowed per day", daily["limit"])
        yield _counter("orchestrator_cost_usd", "Estimated spend today in USD (a new series per day)",
                       summary["cost_usd"], day=day)
        budget = GaugeMetricFamily("orchestrator_budget_status", "1 for the current status of each budget scope",
                                   labels=["scope", "status"])
        for scope, doc in (("daily", daily), ("concurrency", conc)):
            for name in BUDGET_STATUSES:
                budget.add_metric([scope, name], 1 if doc["status"] == name else 0)
        yield budget
        yield _gauge("orchestrator_concurrency_running", "Agents holding a concurrency slot", conc["running"])
        yield _gauge("orchestrator_concurrency_limit", "Agents allowed to run at once", conc["limit"])

        ids = [str(rec["agent_id"]) for rec in records]
        used = cast(list[str | None], f.r.mget([f.keys.agent_ledger(i) for i in ids])) if ids else []
        per_agent = GaugeMetricFamily("orchestrator_agent_tokens_used", "Tokens settled by each live agent",
                                      labels=["agent_id", "task_id"])
        for rec, value in zip(records, used, strict=True):
            per_agent.add_metric([str(rec["agent_id"]), str(rec.get("task_id") or "")], ledger_fields(value, 1)[0])
        yield per_agent

        beats = cast(list[tuple[str, float]], f.r.zrange(f.keys.heartbeats, 0, -1, withscores=True))
        age = GaugeMetricFamily("orchestrator_heartbeat_age_seconds", "Seconds since each running agent's heartbeat",
                                labels=["agent_id"])
        for agent_id, at in beats:
            age.add_metric([agent_id], max(0.0, now - at))
        yield age

        switch = Killswitch(f.r, f.keys).status()
        yield _gauge("orchestrator_killswitch_engaged", "1 while the killswitch is engaged", int(switch["engaged"]))
        yield _gauge("orchestrator_killswitch_held", "Agents held by the killswitch", switch["held"])

        yield _counter("orchestrator_sweep_runs", "Health sweeps run", int(stats.get("sweep_runs", 0)))
        yield _counter("orchestrator_recoveries", "Agents recovered after a lost heartbeat",
                       int(stats.get("recoveries", 0)))
        yield _counter("orchestrator_recoveries_given_up", "Agents failed after too many recoveries",
                       int(stats.get("recoveries_given_up", 0)))
        yield _gauge("orchestrator_last_sweep_timestamp_seconds", "When the last health sweep ran (0: never)",
                     float(stats.get("last_sweep_at", 0)))
        gates = CounterMetricFamily("orchestrator_gates", "Quality gate runs by result", labels=["result"])
        for result in ("passed", "failed"):
            gates.add_metric([result], int(stats.get(f"gates_{result}", 0)))
        yield gates

        box = outbox(f)
        out_stats = cast(dict[str, str], f.r.hgetall(f.keys.outbox_stats))
        yield _gauge("orchestrator_callbacks_pending", "Result callbacks waiting for delivery", box.pending())
        yield _gauge("orchestrator_callbacks_dead_letters", "Result callbacks given up on",
                     int(f.r.zcard(f.keys.dead_letters)))
        yield _counter("orchestrator_callbacks_delivered", "Result callbacks delivered",
                       int(out_stats.get("delivered", 0)))
        yield _counter("orchestrator_callback_failed_attempts", "Failed callback delivery attempts",
                       int(out_stats.get("failed_attempts", 0)))


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(name, doc, labels=list(labels))
    metric.add_metric(list(labels.values()), value)
    return metric


def _counter(name: str, doc: str, value: float, **labels: str) -> CounterMetricFamily:
    metric = CounterMetricFamily(name, doc, labels=list(labels))
    metric.add_metric(list(labels.values()), value)
    return metric


def metrics_fleet(settings: Settings | None = None) -> Fleet:
    """A fleet whose Valkey client fails fast (a scrape must not wait out the workers' long retries)."""
    s = settings or get_settings()
    client = state_client(s, retry_seconds=0, socket_connect_timeout=2, socket_timeout=SCRAPE_SOCKET_TIMEOUT_SECONDS)
    return Fleet.create(s, r=client)


def build_registry(fleet: Fleet) -> CollectorRegistry:
    """A registry holding only the fleet collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    return registry


def render(fleet: Fleet) -> bytes:
    """One scrape in the Prometheus text format."""
    return generate_latest(build_registry(fleet))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def make_metrics_server(port: int, host: str = "127.0.0.1", fleet: Fleet | None = None) -> WSGIServer:
    """A threading HTTP server answering every GET with a scrape (``port`` 0 picks a free one)."""
    app = make_wsgi_app(build_registry(fleet or metrics_fleet()))
    return make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)


def serve(port: int, host: str = "127.0.0.1", fleet: Fleet | None = None) -> None:
    """Serve ``/metrics`` until interrupted (blocking)."""
    server = make_metrics_server(port, host, fleet)
    log.info("serving fleet metrics on http://%s:%d/metrics", host, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.metrics [--port N] [--host H]``."""
    p = argparse.ArgumentParser(prog="orchestrator metrics", description="Serve fleet metrics for Prometheus.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.port, args.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
