"""The contract's shapes: the agent spec, usage, gate results, the result and the agent record.

``validate_spec`` is the fleet's edge for untrusted input (CONTRACT sections 1 and 7): it names every bad field at once,
never echoes a credential, and keeps a bounded, redacted copy of what it rejected.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.redaction import redact, userinfo_spans
from orchestrator.states import State
from orchestrator.webhooks import Allowlist, is_public, parse_ip

TASK_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # callback task and queue names
GATE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
MODEL_RE = re.compile(r"^[A-Za-z0-9._:@/-]{1,200}$")
HOST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")  # a DNS name (IPs are parsed)
SSH_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
SCP_RE = re.compile(r"^git@(?P<host>[^:/\s]+):(?P<path>.+)$")
REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
MAX_PROMPT_CHARS = 200_000
MAX_GATES = 20
MAX_BRANCH_CHARS = 200
MAX_METADATA_BYTES = 16 * 1024
MAX_STORED_SPEC_CHARS = 64 * 1024
MAX_STORED_STRING_CHARS = 10_000
MAX_FIELD_ERRORS = 50
FLEET_QUEUES = frozenset({"agents", "ops"})
BROKER_KEY_NAMES = frozenset({"unacked", "unacked_index", "unacked_mutex", "unacked_restore_lock"})
BROKER_KEY_PREFIXES = ("_kombu", "celeryev", "celery-task-meta", "celery-taskset-meta", "celery-chord",
                       "chord-unlock")
CREDENTIALS_IN_REPO = ("must not contain credentials: give the fleet its git credentials in "
                       "ORCHESTRATOR_GIT_CREDENTIALS_FILE (git-credential-store format) instead")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 text of a datetime, or None."""
    return dt.isoformat() if dt else None


def branch_problem(name: str) -> str | None:
    """Why ``name`` is not a branch name the fleet accepts, or None: the rules of ``git check-ref-format --branch``,
    plus no leading ``-``, not ``HEAD`` or ``@``, printable characters only, at most 200 characters."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_BRANCH_CHARS:
        return f"must be at most {MAX_BRANCH_CHARS} characters"
    if name.startswith("-"):
        return "must not start with '-'"
    if name in {"HEAD", "@"}:
        return f"must not be {name!r}"
    if REF_FORBIDDEN_RE.search(name) or not name.isprintable():
        return "must not contain spaces, control characters or any of ~ ^ : ? * [ \\"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "must not start or end with '/' or contain '//'"
    if ".." in name or "@{" in name:
        return "must not contain '..' or '@{'"
    if name.endswith("."):
        return "must not end with '.'"
    if any(part.startswith(".") or part.endswith(".lock") for part in name.split("/")):
        return "no part between slashes may start with '.' or end with '.lock'"
    return None


def queue_problem(name: str, key_prefix: str = "orch:") -> str | None:
    """Why a callback queue name is refused, or None: strict characters, and never a key the fleet, kombu or
    Celery use in the broker's database (a queue is a Valkey list key)."""
    if not NAME_RE.match(name):
        return "must be 1-200 characters of A-Z a-z 0-9 _ . -"
    lowered = name.lower()
    own = key_prefix.rstrip(":").lower()
    if lowered in FLEET_QUEUES or (own and lowered.startswith(own)):
        return "must not be one of the fleet's own queues or keys"
    if lowered in BROKER_KEY_NAMES or lowered.startswith(BROKER_KEY_PREFIXES) or "pidbox" in lowered:
        return "must not be a key of Celery or kombu"
    return None


def task_name_problem(name: str) -> str | None:
    """Why a callback task name is refused, or None: strict characters, not a task of the fleet or of Celery."""
    if not NAME_RE.match(name):
        return "must be 1-200 characters of A-Z a-z 0-9 _ . -"
    lowered = name.lower()
    if lowered == "orchestrator" or lowered.startswith(("orchestrator.", "celery.")):
        return "must not be a task of the fleet or of Celery"
    return None


def webhook_url_problem(url: str, allowed_hosts: str | None = None) -> str | None:
    """Why a callback URL is refused, or None. ``allowed_hosts`` (the setting) is checked when given: ``http://``
    only to a listed host, and an IP-literal host must be public or listed; names are vetted at delivery."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "url must not contain spaces or control characters"
    if "://" in url and (_userinfo(url) is not None or redact(url) != url):
        return "url must not contain credentials (webhooks are signed with ORCHESTRATOR_WEBHOOK_SECRET)"
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        return "url is malformed"
    if parts.scheme not in {"https", "http"} or not host or not _valid_host(host):
        return "url must be an https:// URL with a host"
    if allowed_hosts is not None:
        allowlist = Allowlist.parse(allowed_hosts)
        ip = parse_ip(host)
        if parts.scheme == "http" and not allowlist.names_host(host):
            return "url must be https:// (http:// only to a host listed in ORCHESTRATOR_WEBHOOK_ALLOWED_HOSTS)"
        if ip is not None and not is_public(ip) and not allowlist.contains(ip):
            return ("url must not point at a private, loopback or link-local address (unless "
                    "ORCHESTRATOR_WEBHOOK_ALLOWED_HOSTS lists it)")
    return None


def _userinfo(url: str) -> str | None:
    """What precedes the host's '@' in a URL (the last '@' before the host, so a password holding '/', '#' or '@'
    is found too), or None."""
    spans = userinfo_spans(url)
    if spans:
        return url[spans[0][1]:spans[0][2]]
    authority = re.split(r"[/?#]", url.split("://", 1)[-1], maxsplit=1)[0]
    return authority.rsplit("@", 1)[0] if "@" in authority else None


def _valid_host(host: str) -> bool:
    return parse_ip(host) is not None or bool(HOST_RE.match(host))


def repo_problem(value: str, workspace_dir: Path | None = None) -> str | None:
    """Why ``repo`` is refused, or None (CONTRACT section 1): https://, ssh://, git@host:path, file:/// or an
    absolute path of a git repository; never credentials, never a path inside the fleet's workspace."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must not contain control characters"
    if "://" in value:
        return _repo_url_problem(value, workspace_dir)
    if value.startswith("git@"):
        match = SCP_RE.match(value)
        if not match or not _valid_host(match["host"]) or match["path"].startswith("-") or " " in value:
            return "a git@host:path URL needs a valid host and path"
        return None
    if value.startswith("/"):
        return _local_repo_problem(Path(value), workspace_dir)
    if "@" in value and ":" in value.split("@", 1)[0]:
        return CREDENTIALS_IN_REPO
    return "must be a git URL (https://, ssh://, git@host:path, file:///) or an absolute path to a repository"


def _repo_url_problem(value: str, workspace_dir: Path | None) -> str | None:
    scheme = value.split("://", 1)[0].lower()
    userinfo = _userinfo(value)
    if (userinfo is not None and (scheme != "ssh" or ":" in userinfo)) or redact(value) != value:
        return CREDENTIALS_IN_REPO  # user:password@, TOKEN@, or a token in the query string
    if scheme not in {"https", "ssh", "file"}:
        return "must be a git URL (https://, ssh://, git@host:path, file:///) or an absolute path to a repository"
    if any(c.isspace() for c in value):
        return "a git URL must not contain spaces"
    try:
        parts = urlsplit(value)
        host, _ = parts.hostname, parts.port
    except ValueError:
        return "is not a valid URL"
    if scheme == "file":
        if parts.netloc:
            return "a file:// URL must not name a host (file:///path)"
        return _local_repo_problem(Path(unquote(parts.path)), workspace_dir)
    if not host or not _valid_host(host):
        return "a git URL needs a valid host"
    if userinfo is not None and not SSH_USER_RE.match(userinfo):
        return "an ssh:// user name must be of A-Z a-z 0-9 . _ -"
    return None


def _local_repo_problem(path: Path, workspace_dir: Path | None) -> str | None:
    if not path.is_absolute():
        return "local repository path must be absolute"
    if workspace_dir is not None:
        real, workspace = os.path.realpath(path), os.path.realpath(workspace_dir)
        if real == workspace or real.startswith(workspace.rstrip("/") + "/"):
            return "must not be inside the fleet's workspace (ORCHESTRATOR_WORKSPACE_DIR)"
    if not path.is_dir() or not _is_git_repository(path):
        return "is not a git repository"
    return None


def _is_git_repository(path: Path) -> bool:
    return (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir())


def _context(info: ValidationInfo, name: str, default: Any = None) -> Any:
    return info.context.get(name, default) if isinstance(info.context, dict) else default


class GateSpec(BaseModel):
    """One quality gate: a shell command run in the worktree after the agent."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=GATE_NAME_RE.pattern)
    command: str = Field(min_length=1, max_length=10_000)
    timeout_seconds: int = Field(600, ge=1, le=24 * 3600)


class CallbackSpec(BaseModel):
    """Where the result goes: a Celery task on a queue, or a webhook (CONTRACT section 3)."""

    model_config = ConfigDict(extra="forbid")
    task: str | None = Field(None, min_length=1, max_length=200)
    queue: str | None = Field(None, min_length=1, max_length=200)
    url: str | None = Field(None, min_length=1, max_length=2000)

    @field_validator("task")
    @classmethod
    def _task(cls, value: str | None) -> str | None:
        problem = task_name_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str | None, info: ValidationInfo) -> str | None:
        problem = queue_problem(value, _context(info, "key_prefix", "orch:")) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        problem = webhook_url_problem(value, _context(info, "webhook_allowed_hosts")) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> CallbackSpec:
        if self.url is not None:
            if self.task is not None or self.queue is not None:
                raise ValueError("give either url, or task and queue, not both")
        elif self.task is None or self.queue is None:
            raise ValueError("a task callback needs both task and queue")
        return self


class AgentSpec(BaseModel):
    """What the coordinator asks for (CONTRACT section 1). Unknown fields are rejected, loudly."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    task_id: str
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    repo: str = Field(min_length=1, max_length=2000)
    base_branch: str = "main"
    branch: str | None = None
    model: str | None = Field(None, min_length=1, max_length=200, pattern=MODEL_RE.pattern)
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

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str, info: ValidationInfo) -> str:
        workspace = _context(info, "workspace_dir")
        problem = repo_problem(value, Path(workspace) if workspace is not None else None)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("base_branch")
    @classmethod
    def _base_branch(cls, value: str) -> str:
        problem = branch_problem(value)
        if problem:
            raise ValueError(f"is not a valid branch name: {problem}")
        return value

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A field validator, not a model validator, so this error is named even when other fields are bad too.
        if value is None:
            return value
        problem = branch_problem(value)
        if problem:
            raise ValueError(f"is not a valid branch name: {problem}")
        if value == info.data.get("base_branch"):
            raise ValueError("must differ from base_branch")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())
        except (TypeError, ValueError):
            raise ValueError("must be a JSON object") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON, got {size}")
        return value


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
    """A rejected spec, kept for inspection (redacted, and at most 64 KiB as JSON)."""

    task_id: str | None
    errors: list[FieldError]
    spec: Any
    rejected_at: str
    metadata: dict[str, Any] = Field(default_factory=dict, exclude=True)  # for the result: valid metadata, else {}

    def summary(self) -> str:
        """Every bad field and why, on one line."""
        return "; ".join(f"{e.field}: {e.message}" for e in self.errors)


def validate_spec(raw: Any, *, workspace_dir: Path | None = None, key_prefix: str = "orch:",
                  webhook_allowed_hosts: str | None = None) -> AgentSpec | Rejection:
    """Parse a coordinator's spec, or explain every bad field.

    ``workspace_dir`` (the fleet's) refuses repositories inside it, ``key_prefix`` refuses callback queues that are
    the fleet's keys, and ``webhook_allowed_hosts`` (when given) refuses http:// and private IP callback URLs up front.
    """
    task_id = raw.get("task_id") if isinstance(raw, dict) else None
    task_id = task_id if isinstance(task_id, str) and TASK_ID_RE.match(task_id) else None
    if not isinstance(raw, dict):
        errors = [FieldError(field="spec", message=f"must be a JSON object, got {type(raw).__name__}")]
    else:
        context = {"workspace_dir": workspace_dir, "key_prefix": key_prefix,
                   "webhook_allowed_hosts": webhook_allowed_hosts}
        try:
            return AgentSpec.model_validate(raw, context=context)
        except ValidationError as exc:
            details = exc.errors(include_input=False, include_url=False)
            errors = [_field_error(e) for e in details[:MAX_FIELD_ERRORS]]
            if len(details) > MAX_FIELD_ERRORS:
                errors.append(FieldError(field="spec", message=f"{len(details) - MAX_FIELD_ERRORS} more bad fields"))
    metadata = raw.get("metadata") if isinstance(raw, dict) else None
    if not isinstance(metadata, dict) or any(e.field.split(".")[0] == "metadata" for e in errors):
        metadata = {}
    return Rejection(task_id=task_id, errors=errors, spec=bounded_copy(raw), rejected_at=iso(utcnow()) or "",
                     metadata=metadata)


def _field_error(err: Any) -> FieldError:
    loc = ".".join(str(p) for p in err["loc"]) or "spec"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "string_pattern_mismatch":
        msg = "has characters that are not allowed"
    return FieldError(field=redact(_cut(loc, 200)), message=redact(_cut(msg, 500)))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def bounded_copy(value: Any, limit: int = MAX_STORED_SPEC_CHARS) -> Any:
    """A JSON-safe, redacted copy of arbitrary input, at most about ``limit`` characters as JSON in all: strings are
    cut, containers stop early and say how much was left out."""
    budget = [limit]
    return _jsonable(value, budget, 0)


def _jsonable(value: Any, budget: list[int], depth: int) -> Any:
    if depth > 20:
        return "<too deep>"
    if isinstance(value, str):
        return _bounded_string(value, budget)
    if (isinstance(value, float) and not math.isfinite(value)) or (isinstance(value, int) and value.bit_length() > 64):
        return _bounded_string(f"<{type(value).__name__}>", budget)
    if value is None or isinstance(value, bool | int | float):
        budget[0] -= len(json.dumps(value))
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for n, (key, item) in enumerate(value.items()):
            if budget[0] <= 0:
                out["..."] = f"<{len(value) - n} more keys>"
                break
            out[_bounded_string(str(key), budget)] = _jsonable(item, budget, depth + 1)
        return out
    if isinstance(value, list | tuple):
        seq: list[Any] = []
        for n, item in enumerate(value):
            if budget[0] <= 0:
                seq.append(f"<{len(value) - n} more items>")
                break
            seq.append(_jsonable(item, budget, depth + 1))
        return seq
    return _bounded_string(repr(value)[:1000], budget)


def _bounded_string(text: str, budget: list[int]) -> str:
    limit = max(0, min(MAX_STORED_STRING_CHARS, budget[0]))
    full = redact(text[:limit + 4096])  # redacted before it is cut, so no secret is split at the cut
    cut = full[:limit]
    while len(json.dumps(cut)) > max(budget[0], 16) and cut:
        cut = cut[: len(cut) // 2]
    budget[0] -= len(json.dumps(cut)) + 2
    truncated = len(cut) < len(full) or len(text) > limit + 4096
    return f"{cut}... <{len(text)} chars>" if truncated else cut
