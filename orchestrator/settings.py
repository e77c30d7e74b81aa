"""The fleet's one settings object, read from ``ORCHESTRATOR_*`` environment variables (or ``.env``)."""

from __future__ import annotations

import re
import sys
import zoneinfo
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ORCHESTRATOR_"
DEFAULT_MODEL = "claude-sonnet-5-5"


class Settings(BaseSettings):
    """Every knob of the fleet; names map to ``ORCHESTRATOR_<FIELD>`` (CONTRACT section 5)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    broker_url: str = "redis://localhost:6379/0"
    state_url: str | None = None
    result_backend: str | None = None
    workspace_dir: Path = Path.home() / ".orchestrator" / "workspace"

    model: str = DEFAULT_MODEL
    max_turns: int = Field(50, ge=1, le=10_000)
    max_tokens_per_turn: int = Field(8192, ge=1, le=1_000_000)

    daily_token_limit: int = Field(10_000_000, ge=1)
    agent_token_limit: int = Field(2_000_000, ge=1)
    max_concurrent_agents: int = Field(10, ge=1)
    max_task_duration_minutes: float = Field(120, gt=0, le=7 * 24 * 60)
    budget_enforcement: Literal["hard", "soft"] = "hard"
    budget_warning_percent: int = Field(80, ge=1, le=100)
    timezone: str = "UTC"
    reservation_lease_seconds: int = Field(600, ge=5)
    slot_lease_seconds: int = Field(120, ge=5)

    heartbeat_interval_seconds: float = Field(10, gt=0)
    heartbeat_timeout_seconds: float = Field(60, gt=0)
    health_sweep_interval_seconds: float = Field(30, gt=0)
    max_recoveries: int = Field(3, ge=0)
    stuck_repeat_limit: int = Field(5, ge=2)
    stuck_no_progress_minutes: float = Field(30, gt=0)
    stuck_action: Literal["flag", "stop"] = "flag"
    valkey_retry_seconds: float = Field(60, ge=0)

    shell_timeout_seconds: float = Field(300, gt=0)
    tool_output_limit: int = Field(30_000, ge=1000)
    worktree_retention_hours: float = Field(24, ge=0)

    webhook_secret: SecretStr | None = None
    callback_retry_base_seconds: float = Field(5, gt=0)
    callback_retry_max_seconds: float = Field(600, gt=0)
    callback_give_up_hours: float = Field(6, ge=1)
    log_json: bool = False
    flower_allow_unauthenticated: bool = False
    log_level: str = "INFO"
    key_prefix: str = Field("orch:", min_length=1)

    @field_validator("broker_url", "state_url", "result_backend")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must be a redis://, rediss:// or unix:// URL (kombu has no valkey:// transport)")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value

    @property
    def state_redis_url(self) -> str:
        """Where fleet state lives: ``state_url`` or else the broker's server and database."""
        return self.state_url or self.broker_url

    @property
    def result_backend_url(self) -> str:
        """The Celery result backend: set explicitly, or the broker's server with database 1."""
        if self.result_backend:
            return self.result_backend
        parts = urlsplit(self.broker_url)
        if parts.scheme == "unix":
            return self.broker_url
        return urlunsplit((parts.scheme, parts.netloc, "/1", parts.query, parts.fragment))


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, each naming its environment variable."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        lines.append(f"{ENV_PREFIX}{field.upper()}: {err['msg']} (got {err.get('input')!r})")
    return "invalid settings:\n  " + "\n  ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; an invalid value stops the process with a message naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        print(format_validation_error(exc), file=sys.stderr)
        raise SystemExit(2) from None


def redact_url(url: str) -> str:
    """A URL with any password (or token user) replaced by ``***`` so it can be logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and not (parts.username and parts.scheme in {"http", "https"}):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username if parts.password is not None else None
    netloc = f"{user}:***@{host}" if user else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


_URL_RE = re.compile(r"\b([a-z][a-z0-9+.-]*://[^\s'\"]+)", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Text with the credentials of every URL in it replaced by ``***``."""
    return _URL_RE.sub(lambda m: redact_url(m.group(1)), text)
