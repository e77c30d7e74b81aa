"""The fleet's one settings object, read from ``ORCHESTRATOR_*`` environment variables (or ``.env``)."""

from __future__ import annotations

import sys
import zoneinfo
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.redaction import redact, register_secret, register_settings_secrets

ENV_PREFIX = "ORCHESTRATOR_"
RESULT_DB = 1  # default database of the result backend on the broker's server
STATE_DB = 2  # default database of the fleet's own state on the broker's server
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
    valkey_retry_seconds: float = Field(300, ge=0)

    shell_timeout_seconds: float = Field(300, gt=0)
    tool_output_limit: int = Field(30_000, ge=1000)
    worktree_retention_hours: float = Field(24, ge=0)

    # Containment (CONTRACT section 6): where agent commands and gates run.
    sandbox: Literal["bwrap", "off"] = "bwrap"
    sandbox_network: Literal["none", "host"] = "none"
    sandbox_memory_mb: int = Field(4096, ge=64)
    sandbox_max_processes: int = Field(512, ge=8)
    sandbox_max_file_mb: int = Field(1024, ge=1)
    git_credentials_file: Path | None = None
    git_timeout_seconds: float = Field(300, gt=0)
    snapshot_max_mb: int = Field(64, ge=1)

    # Model traffic (CONTRACT section 7).
    rate_limit_max_wait_seconds: float = Field(900, ge=0)
    context_window_tokens: int | None = Field(None, ge=1024)
    context_keep_tool_results: int = Field(3, ge=0)

    # Scale-out: Valkey Sentinel (docs/scale-out.md).
    sentinel_master: str = Field("mymaster", min_length=1)
    sentinel_password: SecretStr | None = None  # unset: the URL's password; empty: the sentinels need none
    state_wait_replicas: int = Field(0, ge=0)  # WAIT for this many replicas after the writes that matter; 0: off
    state_wait_timeout_ms: int = Field(100, ge=1, le=60_000)

    webhook_secret: SecretStr | None = None
    webhook_allowed_hosts: str = ""
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
        if value is None:
            return None
        if urlsplit(value.split(";", 1)[0]).scheme not in {"redis", "rediss", "unix", "sentinel"}:
            raise ValueError("must be a redis://, rediss://, unix:// or sentinel:// URL (kombu has no valkey:// "
                             "transport)")
        if urlsplit(value.split(";", 1)[0]).scheme == "sentinel" or ";" in value:
            return normalise_sentinel_url(value)
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
        """Where fleet state lives: ``state_url``, or else the broker's server in its own database (2).

        Broker queues are keys named after their queue; keeping fleet state in another database means no queue
        name, whatever it is, can ever collide with (or be pushed into) a key of the fleet's own.
        """
        return self.state_url or _with_db(self.broker_url, STATE_DB)

    @property
    def result_backend_url(self) -> str:
        """The Celery result backend: set explicitly, or the broker's server with database 1."""
        return self.result_backend or _with_db(self.broker_url, RESULT_DB)

    def sentinel_transport_options(self, url: str) -> dict[str, Any]:
        """What kombu's and Celery's Sentinel support need besides ``url``: ``master_name`` and ``sentinel_kwargs``
        (the URL's password reaches only the master; the sentinels get ``sentinel_password``, else the URL's).
        Empty for a URL that is not a Sentinel list."""
        target = parse_sentinel_url(url)
        if target is None:
            return {}
        return {"master_name": self.sentinel_master, "sentinel_kwargs": self.sentinel_kwargs(target)}

    def sentinel_kwargs(self, target: SentinelTarget) -> dict[str, Any]:
        """Connection arguments for the sentinels themselves (not the master): password and timeouts."""
        kwargs: dict[str, Any] = {"socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT,
                                  "socket_timeout": SENTINEL_SOCKET_TIMEOUT}
        password = self.sentinel_password.get_secret_value() if self.sentinel_password is not None else target.password
        if password:
            kwargs["password"] = password
        return kwargs


# --- Valkey URLs ----------------------------------------------------------------------------------------------

SENTINEL_PORT = 26379
SENTINEL_SOCKET_TIMEOUT = 5.0  # seconds: a sentinel that does not answer is skipped, the next one asked
_ENCODE_HINT = ("a '#' (or '/', '?', '@') in a password must be percent-encoded in the URL: # -> %23, / -> %2F, "
                "? -> %3F, @ -> %40")


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``sentinel://`` list: the sentinels, and the master's credentials and database."""

    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


def _entries(url: str) -> list[str]:
    return url.split(";")


def parse_sentinel_url(url: str) -> SentinelTarget | None:
    """``sentinel://[[user]:password@]host[:port][/db]`` entries joined by ``;``; None for any other URL.

    Credentials and database are those of the master (percent-decoded); the entries stating them must agree.
    """
    if urlsplit(url.split(";", 1)[0]).scheme != "sentinel":
        return None
    hosts: list[tuple[str, int]] = []
    creds: set[tuple[str | None, str | None]] = set()
    dbs: set[int] = set()
    for entry in _entries(url):
        if not entry.strip():
            raise ValueError("an empty entry in the sentinel:// list (no trailing or doubled ';')")
        parts = urlsplit(entry)
        if parts.scheme != "sentinel":
            raise ValueError(f"every entry of a Sentinel list must be sentinel://host:port, not {parts.scheme}://")
        if parts.fragment or "@" in parts.path:
            raise ValueError(_ENCODE_HINT)
        if parts.query:
            raise ValueError("a sentinel:// entry takes no query string (options come from the settings)")
        try:
            port = parts.port or SENTINEL_PORT
        except ValueError:
            raise ValueError(f"bad port in a sentinel:// entry; {_ENCODE_HINT}") from None
        if not parts.hostname:
            raise ValueError("a sentinel:// entry needs a host")
        hosts.append((parts.hostname, port))
        if parts.username or parts.password:
            creds.add((unquote(parts.username) if parts.username else None,
                       unquote(parts.password) if parts.password is not None else None))
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"the database of a sentinel:// entry must be a number, not {path!r}")
            dbs.add(int(path))
    if len(creds) > 1:
        raise ValueError("the entries of the sentinel:// list give different credentials")
    if len(dbs) > 1:
        raise ValueError("the entries of the sentinel:// list give different databases")
    username, password = creds.pop() if creds else (None, None)
    return SentinelTarget(tuple(hosts), username, password, dbs.pop() if dbs else 0)


def normalise_sentinel_url(url: str) -> str:
    """A Sentinel list with the master's credentials and database on every entry.

    kombu and Celery read them from the first entry only, so ``sentinel://s1;sentinel://:pw@s2/1`` would
    otherwise reach database 0 without a password.
    """
    target = parse_sentinel_url(url)
    if target is None:
        raise ValueError("a ';'-separated list must be sentinel:// entries")
    userinfo = ""
    if target.username is not None or target.password is not None:
        userinfo = quote(target.username or "", safe="")
        if target.password is not None:
            userinfo += ":" + quote(target.password, safe="")
        userinfo += "@"
    stated = any(urlsplit(e).path.strip("/") for e in _entries(url))
    out = []
    for host, port in target.hosts:
        shown = f"[{host}]" if ":" in host else host
        out.append(f"sentinel://{userinfo}{shown}:{port}" + (f"/{target.db}" if stated else ""))
    return ";".join(out)


def _with_db(url: str, db: int) -> str:
    """The same server (or Sentinel group) as ``url``, database ``db`` (on every entry of a Sentinel list)."""
    if ";" in url or urlsplit(url).scheme == "sentinel":
        return ";".join(_with_db_single(entry, db) for entry in _entries(url))
    return _with_db_single(url, db)


def _with_db_single(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":  # unix://[:password@]/path?db=N (built by hand: urlunsplit drops the empty host)
        query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("db="))
        return f"unix://{parts.netloc}{parts.path}?" + "&".join(filter(None, [query, f"db={db}"]))
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, each naming its environment variable; what it echoes is redacted, and a secret
    setting's value (or a whole mapping of values) is never echoed."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        line = f"{ENV_PREFIX}{field.upper()}: {redact(str(err['msg']))}"
        value = err.get("input")
        if isinstance(value, str | int | float | bool) and not _is_secret_field(field):
            shown = repr(redact(value)) if isinstance(value, str) else repr(value)
            line += f" (got {shown[:200]}{'...' if len(shown) > 200 else ''})"
        lines.append(line)
    return "invalid settings:\n  " + "\n  ".join(lines)


def _is_secret_field(field: str) -> bool:
    info = Settings.model_fields.get(field)
    annotation = info.annotation if info is not None else None
    return (annotation is SecretStr or SecretStr in get_args(annotation)
            or field.endswith(("_secret", "_password", "_api_key")))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; an invalid value stops the process with a message naming the variable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        print(format_validation_error(exc), file=sys.stderr)
        raise SystemExit(2) from None
    register_settings_secrets(settings)
    if settings.sentinel_password is not None:
        register_secret(settings.sentinel_password.get_secret_value())
    return settings


def redact_url(url: str) -> str:
    """A URL with its credentials replaced by ``***`` (a thin wrapper of ``orchestrator.redaction.redact``)."""
    return redact(url)


def redact_text(text: str) -> str:
    """Text with every credential replaced by ``***`` (a thin wrapper of ``orchestrator.redaction.redact``)."""
    return redact(text)
