"""Settings: defaults of the contract, and an invalid value stops the process naming the variable."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.settings import DEFAULT_MODEL, Settings, redact_url
from tests.conftest import env_without_fleet


def test_contract_defaults() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.result_backend_url == "redis://localhost:6379/1"
    assert (s.daily_token_limit, s.agent_token_limit, s.max_concurrent_agents) == (10_000_000, 2_000_000, 10)
    assert (s.max_task_duration_minutes, s.budget_enforcement, s.budget_warning_percent) == (120, "hard", 80)
    assert (s.max_turns, s.max_tokens_per_turn, s.timezone) == (50, 8192, "UTC")
    assert (s.heartbeat_interval_seconds, s.heartbeat_timeout_seconds, s.health_sweep_interval_seconds) == (10, 60, 30)
    assert s.model == DEFAULT_MODEL


def test_default_model_is_not_deprecated() -> None:
    from anthropic.resources.messages.messages import DEPRECATED_MODELS

    assert DEFAULT_MODEL not in DEPRECATED_MODELS


def test_invalid_setting_stops_the_worker_naming_the_variable() -> None:
    env = {**env_without_fleet(), "ORCHESTRATOR_DAILY_TOKEN_LIMIT": "lots", "ORCHESTRATOR_TIMEZONE": "Mars/Base"}
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "orchestrator", "report"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ORCHESTRATOR_DAILY_TOKEN_LIMIT" in proc.stderr and "ORCHESTRATOR_TIMEZONE" in proc.stderr


def test_invalid_broker_scheme_is_named() -> None:
    env = {**env_without_fleet(), "ORCHESTRATOR_BROKER_URL": "valkey://localhost:6379/0"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "agents"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ORCHESTRATOR_BROKER_URL" in proc.stderr


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://:s3cret@valkey:6379/0") == "redis://***@valkey:6379/0"
    assert redact_url("https://user:tok@github.com/o/r.git") == "https://user:***@github.com/o/r.git"
    assert redact_url("https://ghp_token@github.com/o/r.git") == "https://***@github.com/o/r.git"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
