"""The contract's shapes: the agent spec, usage, gate results, the result and the agent record."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TASK_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BRANCH_RE = re.compile(r"^(?!/)(?!.*//)(?!.*\.\.)(?!.*@\{)[A-Za-z0-9._/-]{1,200}(?<![/.])$")
MAX_PROMPT_CHARS = 200_000
MAX_GATES = 20


class State(StrEnum):
    """Agent states: the live ones and the final statuses of CONTRACT section 2."""

    QUEUED = "queued"
    RUNNING = "running"
    HELD = "held"
    RECOVERING = "recovering"
    COMPLETED = "completed"
    GATES_FAILED = "gates_failed"
    FAILED = "failed"
    KILLED = "killed"
    BUDGET_EXCEEDED = "budget_exceeded"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"

    @property
    def final(self) -> bool:
        """Whether the agent has stopped for good (a killed agent may still be resumed by an operator)."""
        return self not in {State.QUEUED, State.RUNNING, State.HELD, State.RECOVERING}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 text of a datetime, or None."""
    return dt.isoformat() if dt else None


class GateSpec(BaseModel):
    """One quality gate: a shell command run in the worktree after the agent."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    command: str = Field(min_length=1, max_length=10_000)
    timeout_seconds: int = Field(600, ge=1, le=24 * 3600)


class CallbackSpec(BaseModel):
    """Where the result goes: a Celery task on a queue, or an HTTP(S) webhook."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = Field(None, min_length=1, max_length=200)
    queue: str | None = Field(None, min_length=1, max_length=200)
    url: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _one_kind(self) -> CallbackSpec:
        if self.url is not None:
            if self.task is not None or self.queue is not None:
                raise ValueError("give either url, or task and queue, not both")
            parts = urlsplit(self.url)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError("url must be an http:// or https:// URL with a host")
        elif self.task is None or self.queue is None:
            raise ValueError("a task callback needs both task and queue")
        return self


def _is_git_repository(path: Path) -> bool:
    return (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir())


class AgentSpec(BaseModel):
    """What the coordinator asks for (CONTRACT section 1). Unknown fields are rejected, loudly."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    task_id: str
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    repo: str = Field(min_length=1, max_length=2000)
    base_branch: str = "main"
    branch: str | None = None
    model: str | None = Field(None, min_length=1, max_length=200)
    max_turns: int | None = Field(None, ge=1, le=10_000)
    token_limit: int | None = Field(None, ge=1)
    max_duration_minutes: int | None = Field(None, ge=1)
    quality_gates: list[GateSpec] = Field(default_factory=list, max_length=MAX_GATES)
    max_gate_attempts: int = Field(1, ge=1, le=20)
    push: bool = False
    callback: CallbackSpec | None = None
    priority: int = Field(5, ge=0, le=9)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task_id")
    @classmethod
    def _task_id(cls, value: str) -> str:
        if not TASK_ID_RE.match(value):
            raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("base_branch", "branch")
    @classmethod
    def _branch(cls, value: str | None) -> str | None:
        if value is not None and not BRANCH_RE.match(value):
            raise ValueError("is not a valid git branch name")
        return value

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str) -> str:
        if value.startswith("git@") and ":" in value:
            return value
        parts = urlsplit(value)
        if parts.scheme in {"https", "http", "ssh", "git"}:
            if not parts.hostname:
                raise ValueError("git URL has no host")
            return value
        if parts.scheme == "file" or value.startswith("/"):
            path = Path(parts.path if parts.scheme == "file" else value)
            if not path.is_absolute():
                raise ValueError("local repository path must be absolute")
            if not path.is_dir() or not _is_git_repository(path):
                raise ValueError(f"{path} is not a git repository")
            return value
        raise ValueError("must be a git URL (https://, ssh://, git@, file://) or an absolute path to a repository")


class Usage(BaseModel):
    """Token usage and its cost; ``total_tokens`` is every token the API processed."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Usage) -> Usage:
        """The sum of two usages."""
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 6),
        )


class GateResult(BaseModel):
    """The outcome of one quality gate run."""

    name: str
    passed: bool
    exit_code: int | None
    duration_seconds: float
    output_tail: str = ""
    attempt: int = 1


class AgentResult(BaseModel):
    """The task's return value and every callback's body (CONTRACT section 2)."""

    agent_id: str | None
    task_id: str | None
    status: State
    worker: str | None = None
    branch: str | None = None
    commit: str | None = None
    turns: int = 0
    usage: Usage = Field(default_factory=Usage)
    gates: list[GateResult] = Field(default_factory=list)
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    stop_reason: str | None = None
    warnings: list[str] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with the status as a plain string."""
        return self.model_dump(mode="json")


class FieldError(BaseModel):
    """One bad field of a rejected spec."""

    field: str
    message: str


class Rejection(BaseModel):
    """A rejected spec, kept for inspection."""

    task_id: str | None
    errors: list[FieldError]
    spec: Any
    rejected_at: str

    def summary(self) -> str:
        """Every bad field and why, on one line."""
        return "; ".join(f"{e.field}: {e.message}" for e in self.errors)


def validate_spec(raw: Any) -> AgentSpec | Rejection:
    """Parse a coordinator's spec, or explain every bad field."""
    task_id = raw.get("task_id") if isinstance(raw, dict) else None
    task_id = task_id if isinstance(task_id, str) and TASK_ID_RE.match(task_id) else None
    if not isinstance(raw, dict):
        errors = [FieldError(field="spec", message=f"must be a JSON object, got {type(raw).__name__}")]
    else:
        try:
            return AgentSpec.model_validate(raw)
        except ValidationError as exc:
            errors = [_field_error(e) for e in exc.errors()]
    return Rejection(task_id=task_id, errors=errors, spec=_jsonable(raw), rejected_at=iso(utcnow()) or "")


def _field_error(err: Any) -> FieldError:
    loc = ".".join(str(p) for p in err["loc"]) or "spec"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required"
    return FieldError(field=loc, message=msg)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of arbitrary input, with huge strings cut so storage stays bounded."""
    if depth > 20:
        return "<too deep>"
    if isinstance(value, str):
        return value if len(value) <= 10_000 else value[:10_000] + f"... <{len(value)} chars>"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:200]}
    if isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value[:200]]
    return repr(value)[:1000]
