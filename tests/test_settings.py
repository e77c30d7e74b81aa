"""Settings: defaults of the contract, and an invalid value stops the process naming the variable."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError
from redis.connection import parse_url

from orchestrator.settings import (
    DEFAULT_MODEL,
    SentinelTarget,
    Settings,
    format_validation_error,
    parse_sentinel_url,
    redact_url,
)
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


def test_redact_url_handles_any_password_characters() -> None:
    assert redact_url("redis://:p#a/s@s@host:6379/0") == "redis://***@host:6379/0"
    assert redact_url("rediss://user:a/b#c?d@host/0") == "rediss://user:***@host/0"


def test_invalid_settings_never_print_a_password_or_secret() -> None:
    env = {**env_without_fleet(), "ORCHESTRATOR_DAILY_TOKEN_LIMIT": "lots",
           "ORCHESTRATOR_BROKER_URL": "valkey://:hunter2#x/y@valkey:6379/0",
           "ORCHESTRATOR_STATE_URL": "redis://:state-pass-9@valkey:6379/2",
           "ORCHESTRATOR_WEBHOOK_SECRET": "hook-secret-value", "ORCHESTRATOR_TIMEZONE": "Mars/Base"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "agents"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "ORCHESTRATOR_BROKER_URL" in proc.stderr and "ORCHESTRATOR_DAILY_TOKEN_LIMIT" in proc.stderr
    assert "'valkey://***@valkey:6379/0'" in proc.stderr  # echoed, redacted
    output = proc.stdout + proc.stderr
    for secret in ("hunter2", "#x/y", "state-pass-9", "hook-secret-value"):
        assert secret not in output, output


def test_format_validation_error_redacts_every_echo() -> None:
    try:
        Settings(broker_url="valkey://u:pa55word@vk/0", max_turns="https://t0ken@x.example",  # type: ignore[arg-type]
                 _env_file=None)  # type: ignore[call-arg]
    except ValidationError as exc:
        text = format_validation_error(exc)
    else:
        raise AssertionError("invalid settings were accepted")
    assert "pa55word" not in text and "t0ken" not in text
    assert "ORCHESTRATOR_BROKER_URL" in text and "ORCHESTRATOR_MAX_TURNS" in text


# --- Valkey URLs: derived databases, Sentinel lists, passwords ---------------------------------------------------


def urls(broker: str, **values: Any) -> Settings:
    return Settings(broker_url=broker, _env_file=None, **values)  # type: ignore[call-arg]


def test_state_and_results_get_their_own_database_on_the_brokers_server() -> None:
    s = urls("redis://:p%23w%2Fx%3F@valkey:6379/0?socket_timeout=3")
    assert s.state_redis_url == "redis://:p%23w%2Fx%3F@valkey:6379/2?socket_timeout=3"
    assert s.result_backend_url == "redis://:p%23w%2Fx%3F@valkey:6379/1?socket_timeout=3"
    kwargs = parse_url(s.state_redis_url)
    assert (kwargs["password"], kwargs["db"], kwargs["host"]) == ("p#w/x?", 2, "valkey")  # decoded by redis-py
    assert urls("unix:///run/valkey.sock?db=0&x=1").state_redis_url == "unix:///run/valkey.sock?x=1&db=2"
    assert urls("redis://h:6379/0", state_url="redis://other:6379/5").state_redis_url == "redis://other:6379/5"


def test_a_sentinel_list_gets_the_database_and_credentials_on_every_entry() -> None:
    s = urls("sentinel://:p%23w%2F1@s1:26379;sentinel://s2:26380;sentinel://s3")
    entries = [
        "sentinel://:p%23w%2F1@s1:26379", "sentinel://:p%23w%2F1@s2:26380", "sentinel://:p%23w%2F1@s3:26379"]
    assert s.broker_url == ";".join(entries)  # kombu and Celery read the password from the first entry only
    assert s.state_redis_url == ";".join(f"{e}/2" for e in entries)
    assert s.result_backend_url == ";".join(f"{e}/1" for e in entries)
    target = parse_sentinel_url(s.state_redis_url)
    assert target == SentinelTarget((("s1", 26379), ("s2", 26380), ("s3", 26379)), None, "p#w/1", 2)
    # A database given on any one entry holds for the whole list.
    assert urls("sentinel://s1:26379;sentinel://s2:26379/4").broker_url == "sentinel://s1:26379/4;sentinel://s2:26379/4"
    assert urls("sentinel://u%40x:pw@s1").broker_url == "sentinel://u%40x:pw@s1:26379"
    assert parse_sentinel_url("sentinel://u%40x:pw@s1") == SentinelTarget((("s1", 26379),), "u@x", "pw", 0)


def test_the_sentinel_transport_options_carry_the_master_name_and_the_sentinels_password() -> None:
    s = urls("sentinel://:p%23w@s1:26379;sentinel://:p%23w@s2:26379", sentinel_master="fleet")
    opts = s.sentinel_transport_options(s.result_backend_url)
    assert opts["master_name"] == "fleet" and opts["sentinel_kwargs"]["password"] == "p#w"
    assert s.sentinel_transport_options("redis://localhost:6379/0") == {}
    bare = urls("sentinel://:p%23w@s1:26379", sentinel_password="")
    assert "password" not in bare.sentinel_transport_options(bare.broker_url)["sentinel_kwargs"]
    own = urls("sentinel://:p%23w@s1:26379", sentinel_password="sent-only")
    assert own.sentinel_transport_options(own.broker_url)["sentinel_kwargs"]["password"] == "sent-only"


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://s1:26379;sentinel://s2:26379;", "empty entry"),
    ("sentinel://s1:26379;;sentinel://s2:26379", "empty entry"),
    ("sentinel://s1:26379;redis://s2:6379/0", "every entry"),
    ("redis://h1:6379/0;redis://h2:6379/0", "sentinel://"),
    ("sentinel://:a@s1;sentinel://:b@s2", "different credentials"),
    ("sentinel://s1/1;sentinel://s2/2", "different databases"),
    ("sentinel://:p#w@s1:26379", "percent-encoded"),
    ("sentinel://:p/w@s1:26379", "percent-encoded"),
    ("sentinel://s1:26379/zero", "must be a number"),
    ("sentinel://s1:26379/0?ssl=1", "no query"),
])
def test_a_bad_valkey_url_is_refused_naming_the_variable(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as info:
        urls(url)
    text = format_validation_error(info.value)
    assert "ORCHESTRATOR_BROKER_URL" in text and says in text, text
    assert "p#w" not in text and ":a@" not in text  # never echoes a password


def test_a_sentinel_state_url_is_checked_too() -> None:
    with pytest.raises(ValidationError) as info:
        urls("redis://h:6379/0", state_url="sentinel://s1;")
    assert "ORCHESTRATOR_STATE_URL" in format_validation_error(info.value)


def test_the_state_client_pool_holds_a_hundred_agents_listeners() -> None:
    from orchestrator.store import state_client

    # Each running agent keeps a pub/sub connection open: redis-py's default cap (100) failed the 100th agent of a
    # threads-pool worker with MaxConnectionsError.
    client = state_client(Settings(_env_file=None))  # type: ignore[call-arg]
    assert client.connection_pool.max_connections >= 1000
