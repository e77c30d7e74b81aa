"""Prometheus metrics: a real metrics process scraped over HTTP after real runs, and the collector on fakeredis."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.callbacks import Outbox
from orchestrator.fleet import Fleet
from orchestrator.killswitch import Killswitch
from orchestrator.metrics import render
from orchestrator.models import AgentSpec, Usage
from orchestrator.runner import new_record
from orchestrator.settings import Settings
from orchestrator.testing.cluster import Proc, free_port
from orchestrator.testing.offline_model import OfflineModel, Script, bash, text_turn
from tests.conftest import REPO_ROOT, Cluster

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample as {(name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


class MetricsEndpoint:
    """``python -m orchestrator.metrics`` as a real process on a free port."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}/metrics"
        port = self.url.rsplit(":", 1)[1].split("/")[0]
        self.proc = Proc([sys.executable, "-m", "orchestrator.metrics", "--port", port], env=cluster.env(),
                         log_path=tmp / "metrics.log", cwd=REPO_ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.scrape()
                return
            except (urllib.error.URLError, ConnectionError):
                if not self.proc.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"metrics endpoint did not come up:\n{self.proc.log()[-3000:]}") from None
                time.sleep(0.1)

    def scrape(self) -> Samples:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return parse(response.read().decode())


@pytest.fixture
def metrics(cluster: Cluster, tmp_path: Path) -> Iterator[MetricsEndpoint]:
    endpoint = MetricsEndpoint(cluster, tmp_path)
    yield endpoint
    endpoint.proc.stop()


def test_metrics_endpoint_reports_a_real_run(cluster: Cluster, sample_repo: Path, offline: OfflineModel,
                                             metrics: MetricsEndpoint) -> None:
    cluster.worker()
    result = cluster.submit({"task_id": "metrics-1", "prompt": "Fix the failing test.",
                             "repo": str(sample_repo)}).get(timeout=90)
    assert result["status"] == "completed", result
    usage = result["usage"]
    assert usage["total_tokens"] > 0

    m = metrics.scrape()
    day = cluster.cli_json("budget")["date"]
    assert value(m, "orchestrator_valkey_up") == 1
    assert labelled(m, "orchestrator_tokens_used_total") == {frozenset({("day", day)}): usage["total_tokens"]}
    assert value(m, "orchestrator_tokens_reserved", day=day) == 0
    assert value(m, "orchestrator_cost_usd_total", day=day) == pytest.approx(usage["cost_usd"], abs=1e-6)
    assert value(m, "orchestrator_agents", state="completed") == 1
    assert value(m, "orchestrator_agents_finished_total", status="completed") == 1
    for state in ("queued", "running", "held", "recovering", "failed", "killed"):
        assert value(m, "orchestrator_agents", state=state) == 0, state
    assert value(m, "orchestrator_budget_status", scope="daily", status="within_budget") == 1
    assert value(m, "orchestrator_budget_status", scope="daily", status="at_limit") == 0
    assert value(m, "orchestrator_daily_token_limit") == 10_000_000
    assert value(m, "orchestrator_concurrency_running") == 0
    assert value(m, "orchestrator_concurrency_limit") == 10
    assert labelled(m, "orchestrator_agent_tokens_used") == {}  # nothing live any more
    assert labelled(m, "orchestrator_heartbeat_age_seconds") == {}
    assert value(m, "orchestrator_killswitch_engaged") == 0
    assert value(m, "orchestrator_killswitch_held") == 0
    assert value(m, "orchestrator_callbacks_pending") == 0

    cluster.cli("killswitch", "engage", "--reason", "x")
    assert value(metrics.scrape(), "orchestrator_killswitch_engaged") == 1
    cluster.cli("killswitch", "release")
    assert value(metrics.scrape(), "orchestrator_killswitch_engaged") == 0


def test_metrics_show_a_running_agent(cluster: Cluster, sample_repo: Path, offline: OfflineModel,
                                      metrics: MetricsEndpoint) -> None:
    offline.add_script("slow", Script([bash("sleep 6"), text_turn("done")]))
    cluster.worker()
    pending = cluster.submit({"task_id": "metrics-live", "prompt": "[[script:slow]] go", "repo": str(sample_repo)})
    agent_id = cluster.agent_for("metrics-live")

    def running() -> Samples | None:
        m = metrics.scrape()
        tokens = labelled(m, "orchestrator_agent_tokens_used")
        return m if tokens.get(frozenset({("agent_id", agent_id), ("task_id", "metrics-live")}), 0) > 0 else None

    m = cluster.wait_for(running, timeout=30, what="the agent's first call settled")
    assert value(m, "orchestrator_agents", state="running") == 1
    assert value(m, "orchestrator_concurrency_running") == 1
    assert 0 <= value(m, "orchestrator_heartbeat_age_seconds", agent_id=agent_id) < 5  # heartbeat every second
    assert pending.get(timeout=60)["status"] == "completed"
    m = metrics.scrape()
    assert labelled(m, "orchestrator_heartbeat_age_seconds") == {}
    assert value(m, "orchestrator_agents", state="running") == 0


def test_render_reads_every_part_of_the_fleet_state(fake_redis: redis.Redis, unit_settings: Settings) -> None:
    fleet = Fleet.create(unit_settings, r=fake_redis)
    k = fleet.keys
    spec = AgentSpec(task_id="t-1", prompt="p", repo="https://example.invalid/r.git")
    agent_id, _, _ = fleet.lifecycle.create(new_record(spec, None), "t-1")
    assert fleet.lifecycle.admit(agent_id, "w1", "w1", priority=5, duration_seconds=60).outcome == "started"
    first = fleet.budget.reserve(agent_id, 2_000_000, 1000, 500)
    assert first is not None
    fleet.budget.settle(first, Usage(input_tokens=900, total_tokens=900), 1234)
    assert fleet.budget.reserve(agent_id, 2_000_000, 100, 50) is not None  # in flight
    fake_redis.zadd(k.heartbeats, {agent_id: time.time() - 3})
    fake_redis.hset(k.stats, mapping={"finished:failed": 2, "sweep_runs": 7, "recoveries": 1,
                                      "recoveries_given_up": 1, "last_sweep_at": "1800000000.5", "gates_passed": 3,
                                      "gates_failed": 4})
    Killswitch(fake_redis, k).engage("test", by="me")
    held, _, _ = fleet.lifecycle.create(new_record(AgentSpec(task_id="t-2", prompt="p", repo=spec.repo), None), "t-2")
    assert fleet.lifecycle.admit(held, "w1", "w1", priority=5, duration_seconds=60).outcome == "held"
    Outbox(fake_redis, k, None).put("a1", {"url": "https://example.invalid"}, {})
    fake_redis.zadd(k.dead_letters, {"a0": 1.0})
    fake_redis.hset(k.outbox_stats, mapping={"delivered": 5, "failed_attempts": 6})

    m = parse(render(fleet).decode())
    day = fleet.budget.day()
    assert value(m, "orchestrator_agents", state="running") == 1
    assert value(m, "orchestrator_agents", state="failed") == 2
    assert value(m, "orchestrator_tokens_used_total", day=day) == 900
    assert value(m, "orchestrator_tokens_reserved", day=day) == 150
    assert value(m, "orchestrator_cost_usd_total", day=day) == pytest.approx(0.001234)
    assert value(m, "orchestrator_agent_tokens_used", agent_id=agent_id, task_id="t-1") == 900
    assert 3 <= value(m, "orchestrator_heartbeat_age_seconds", agent_id=agent_id) < 10
    assert value(m, "orchestrator_concurrency_running") == 1
    assert value(m, "orchestrator_killswitch_engaged") == 1 and value(m, "orchestrator_killswitch_held") == 1
    assert value(m, "orchestrator_sweep_runs_total") == 7 and value(m, "orchestrator_recoveries_total") == 1
    assert value(m, "orchestrator_recoveries_given_up_total") == 1
    assert value(m, "orchestrator_last_sweep_timestamp_seconds") == 1800000000.5
    assert value(m, "orchestrator_gates_total", result="passed") == 3
    assert value(m, "orchestrator_gates_total", result="failed") == 4
    assert value(m, "orchestrator_callbacks_pending") == 1 and value(m, "orchestrator_callbacks_dead_letters") == 1
    assert value(m, "orchestrator_callbacks_delivered_total") == 5
    assert value(m, "orchestrator_callback_failed_attempts_total") == 6


def test_daily_budget_status_is_a_labelled_gauge(fake_redis: redis.Redis, tmp_path: Path) -> None:
    s = Settings(workspace_dir=tmp_path, daily_token_limit=1000, _env_file=None)
    fleet = Fleet.create(s, r=fake_redis)
    res = fleet.budget.reserve("a1", 1000, 800, 16)
    assert res is not None
    fleet.budget.settle(res, Usage(input_tokens=850, total_tokens=850), 0)
    m = parse(render(fleet).decode())
    statuses = {dict(labels)["status"]: v for labels, v in labelled(m, "orchestrator_budget_status").items()
                if dict(labels)["scope"] == "daily"}
    assert statuses == {"within_budget": 0, "approaching_limit": 1, "at_limit": 0, "exceeded": 0}


def test_unreachable_valkey_still_answers_quickly(unit_settings: Settings) -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, decode_responses=True)
    started = time.monotonic()
    m = parse(render(Fleet.create(unit_settings, r=dead)).decode())
    assert time.monotonic() - started < 5
    assert value(m, "orchestrator_valkey_up") == 0
    assert not labelled(m, "orchestrator_agents")
