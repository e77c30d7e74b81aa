"""Offline stand-in for the Anthropic Messages API.

:class:`OfflineModel` is a small local HTTP server (stdlib ``ThreadingHTTPServer``) that speaks enough of
the Messages API for the real ``anthropic`` SDK to talk to it through ``base_url`` /
``ANTHROPIC_BASE_URL``: ``POST /v1/messages`` (JSON or SSE streaming), ``POST /v1/messages/count_tokens``
and a few ``/_offline/*`` introspection routes.

The "model" answers from :class:`Script` s of :class:`Turn` s. The script is chosen per request by a
``[[script:NAME]]`` marker in the first user message (else the server's default script) and the turn is
chosen *statelessly*: it is the number of assistant messages already in the request, so a conversation
resumed from a checkpoint continues where it left off (also after ``pause_turn`` / ``max_tokens``
continuations and with tool results cleared: neither changes the count).

Usage numbers are deterministic estimates (about four characters of canonical JSON per token), see
:func:`estimate_input_tokens` and :func:`estimate_output_tokens`.

Like the real API it can refuse traffic: scripted rate-limit / overload windows
(:meth:`OfflineModel.rate_limit_window`), per-model token-bucket limits (:class:`RateLimits`, reported in
``anthropic-ratelimit-*`` headers on every ``/v1/messages`` response) and a context window.

Prompt caching follows the API's rules. The prefix runs tools -> system -> messages, block by block; a block
with ``cache_control`` (at most 4 per request) is a breakpoint, and the prefix up to it is keyed by model and
the hash of its blocks without their ``cache_control``. Breakpoints whose prefix is under ``min_cache_tokens``
are ignored. ``cache_read_input_tokens`` is the longest live prefix found at a breakpoint or up to 20 blocks
before one; ``cache_creation_input_tokens`` runs from there to the last breakpoint (every breakpoint is
written); ``input_tokens`` is the rest, so the three always sum to :func:`estimate_input_tokens`. A prefix's
tokens are ``ceil(chars / 4)`` of its blocks' canonical JSON. Entries live ``cache_ttl`` seconds (``"1h"``:
``cache_ttl_1h``), refreshed on each hit. ``count_tokens`` ignores caching.

Introspection and control routes (for a model run as a separate process): ``GET /_offline/health``,
``GET /_offline/calls``, ``POST /_offline/reset``, ``GET|POST|DELETE /_offline/rate_limit`` (the POST body holds
:meth:`OfflineModel.rate_limit_window`'s arguments; GET lists the windows and refusal counts),
``POST /_offline/limits`` (:class:`RateLimits` fields; ``{}`` = unlimited) and ``GET|DELETE /_offline/cache``.

Run it as a separate process with ``python -m orchestrator.testing.offline_model --port 8765``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import re
import secrets
import select
import signal
import socket
import socketserver
import string
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, MappingProxyType, TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "BUILTIN_SCRIPTS",
    "DONE_TEXT",
    "EDITOR_TOOL",
    "PING_INTERVAL",
    "RATE_LIMIT_HEADERS",
    "OfflineModel",
    "RateLimits",
    "Script",
    "ServedCall",
    "Turn",
    "bash",
    "canonical_json",
    "edit",
    "estimate_input_tokens",
    "estimate_output_tokens",
    "load_scripts",
    "main",
    "text_turn",
    "tool_turn",
]

#: Seconds between ``ping`` SSE frames while a stream waits in a delay.
PING_INTERVAL = 0.2
#: Name of the text-editor tool used by :func:`edit`.
EDITOR_TOOL = "str_replace_based_edit_tool"
#: Text of the turn served when a (non repeating) script has run out of turns.
DONE_TEXT = "Done."

_POLL_INTERVAL = 0.05
_MARKER_RE = re.compile(r"\[\[script:([^\[\]\s]+)\]\]")
_ID_ALPHABET = string.ascii_letters + string.digits
_USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_STOP_REASONS = (
    "end_turn",
    "tool_use",
    "max_tokens",
    "stop_sequence",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
)
#: Names of the rate-limit headers sent on every ``/v1/messages`` response (resets are RFC 3339 timestamps).
RATE_LIMIT_HEADERS = tuple(
    f"anthropic-ratelimit-{kind}-{field}"
    for kind in ("requests", "input-tokens", "output-tokens", "tokens")
    for field in ("limit", "remaining", "reset")
)
_UNLIMITED = 1_000_000_000  # limit / remaining reported for a limit that is not configured
_MAX_BREAKPOINTS = 4
_CACHE_LOOKBACK = 20  # blocks before a breakpoint checked for an earlier cached prefix
_DEFAULT_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_DEFAULT_ERROR_MESSAGES = {
    "rate_limit_error": "Number of requests has exceeded your rate limit (offline model). Please try again later.",
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "timeout_error": "Request timeout",
}


# --------------------------------------------------------------------------------------------- scripts


@dataclass
class Turn:
    """One scripted assistant response.

    ``content`` holds ``{"type": "text", "text": ...}`` and ``{"type": "tool_use", "name": ...,
    "input": {...}}`` blocks (the server fills in tool_use ids). ``stop_reason`` defaults to ``"tool_use"``
    when there is a tool_use block, else ``"end_turn"``. Any API stop reason may be scripted and the content is
    served as given: ``"max_tokens"`` with a last tool_use block stands for a call cut off mid-way (the client must
    not run it), ``"pause_turn"`` asks the client to send the conversation back to continue, ``"refusal"`` may have
    empty content. ``delay`` is waited before the response (for
    streams: after ``message_start``, sending pings, before the first content block); ``chunk_delay`` is
    waited before each SSE event after ``message_start``. ``usage`` overrides the estimated usage fields.
    """

    content: list[dict[str, Any]]
    stop_reason: str | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    usage: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.content, list):
            raise TypeError("Turn.content must be a list of content blocks")
        for block in self.content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise ValueError(f"text block needs a string 'text': {block!r}")
            elif kind == "tool_use":
                if not isinstance(block.get("name"), str) or not block["name"]:
                    raise ValueError(f"tool_use block needs a 'name': {block!r}")
                if not isinstance(block.get("input", {}), dict):
                    raise ValueError(f"tool_use block 'input' must be an object: {block!r}")
            else:
                raise ValueError(f"unsupported content block (only text and tool_use): {block!r}")
        if self.stop_reason is not None and self.stop_reason not in _STOP_REASONS:
            raise ValueError(f"unknown stop_reason {self.stop_reason!r}")
        if self.delay < 0 or self.chunk_delay < 0:
            raise ValueError("delay and chunk_delay must be >= 0")
        if self.usage is not None:
            unknown = set(self.usage) - set(_USAGE_KEYS)
            if unknown:
                raise ValueError(f"unknown usage fields {sorted(unknown)}; allowed: {list(_USAGE_KEYS)}")

    @property
    def resolved_stop_reason(self) -> str:
        """The stop reason served for this turn (explicit, else derived from the content)."""
        if self.stop_reason is not None:
            return self.stop_reason
        return "tool_use" if any(b.get("type") == "tool_use" for b in self.content) else "end_turn"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Turn:
        """Build a turn from its JSON form (the dataclass fields)."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Turn fields {sorted(unknown)}")
        usage = data.get("usage")
        return cls(
            content=[dict(b) for b in data.get("content", [])],
            stop_reason=data.get("stop_reason"),
            delay=float(data.get("delay", 0.0)),
            chunk_delay=float(data.get("chunk_delay", 0.0)),
            usage={str(k): int(v) for k, v in usage.items()} if usage is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this turn (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)


@dataclass
class Script:
    """An ordered list of turns; ``repeat_last`` serves the last turn forever once the script has run out."""

    turns: list[Turn]
    repeat_last: bool = False

    def turn_at(self, index: int) -> Turn:
        """The turn served when the request already holds ``index`` assistant messages."""
        if index < len(self.turns):
            return self.turns[index]
        if self.repeat_last and self.turns:
            return self.turns[-1]
        return text_turn(DONE_TEXT)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Script:
        """Build a script from ``{"turns": [...], "repeat_last": bool}``."""
        unknown = set(data) - {"turns", "repeat_last"}
        if unknown:
            raise ValueError(f"unknown Script fields {sorted(unknown)}")
        return cls(
            turns=[Turn.from_dict(t) for t in data.get("turns", [])],
            repeat_last=bool(data.get("repeat_last", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this script (inverse of :meth:`from_dict`)."""
        return {"turns": [t.to_dict() for t in self.turns], "repeat_last": self.repeat_last}


def text_turn(text: str) -> Turn:
    """A turn answering with plain text (``end_turn``)."""
    return Turn(content=[{"type": "text", "text": text}])


def tool_turn(name: str, input: dict[str, Any], text: str | None = None) -> Turn:
    """A turn calling tool ``name`` with ``input``, optionally preceded by a text block."""
    content: list[dict[str, Any]] = []
    if text is not None:
        content.append({"type": "text", "text": text})
    content.append({"type": "tool_use", "name": name, "input": dict(input)})
    return Turn(content=content)


def bash(command: str) -> Turn:
    """A turn running ``command`` with the ``bash`` tool."""
    return tool_turn("bash", {"command": command})


def edit(**input: Any) -> Turn:
    """A turn calling the text-editor tool (``str_replace_based_edit_tool``) with the keyword arguments."""
    return tool_turn(EDITOR_TOOL, dict(input))


def load_scripts(path: str | Path) -> dict[str, Script]:
    """Load a JSON file mapping script name -> ``{"turns": [...], "repeat_last": bool}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping script names to scripts")
    return {str(name): Script.from_dict(spec) for name, spec in data.items()}


#: Scripts every :class:`OfflineModel` knows. ``fix_failing_test`` (the default) fixes the demo sample
#: repository whose ``calc.py`` subtracts in ``add()``.
BUILTIN_SCRIPTS: dict[str, Script] = {
    "fix_failing_test": Script(
        turns=[
            bash("python -m pytest -q"),
            edit(command="view", path="calc.py"),
            edit(command="str_replace", path="calc.py", old_str="return a - b", new_str="return a + b"),
            bash("python -m pytest -q"),
            text_turn("The failing test is fixed: add() now adds."),
        ]
    ),
}


# ----------------------------------------------------------------------------------------------- usage


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the text token estimates are computed from."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _estimate(value: Any) -> int:
    return max(1, math.ceil(len(canonical_json(value)) / 4))


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """Input tokens of a request: ``ceil(len(canonical_json({system, messages, tools})) / 4)``, at least 1.

    Missing keys count as ``null``.
    """
    return _estimate({"system": body.get("system"), "messages": body.get("messages"), "tools": body.get("tools")})


def estimate_output_tokens(content: Sequence[Mapping[str, Any]]) -> int:
    """Output tokens of response content blocks: ``ceil(len(canonical_json(content)) / 4)``, at least 1."""
    return _estimate(list(content))


def _zero_usage() -> dict[str, int]:
    return {key: 0 for key in (*_USAGE_KEYS, "total_tokens")}


def _with_total(usage: Mapping[str, int]) -> dict[str, int]:
    out = {key: int(usage.get(key, 0)) for key in _USAGE_KEYS}
    out["total_tokens"] = sum(out.values())
    return out


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class _Block:
    """One block of a request's cacheable prefix (tools, then system, then message content)."""

    key: str  # canonical JSON of the block (cache_control removed) and its place in the request
    chars: int  # len(canonical_json(block without cache_control))
    ttl: str | None  # "5m" / "1h" when the block is a cache breakpoint, else None


def _without_marker(block: Any) -> tuple[Any, Any]:
    """``(block without its cache_control, the cache_control or None)``."""
    if not isinstance(block, dict) or block.get("cache_control") is None:
        return block, None
    return {k: v for k, v in block.items() if k != "cache_control"}, block["cache_control"]


def _check_marker(path: str, marker: Any) -> str:
    """Validate a ``cache_control`` value; returns its ttl."""
    if not isinstance(marker, dict) or marker.get("type") != "ephemeral":
        raise _BadRequest(f"{path}.cache_control.type: Input should be 'ephemeral'")
    ttl = marker.get("ttl", "5m")
    if ttl not in ("5m", "1h"):
        raise _BadRequest(f"{path}.cache_control.ttl: Input should be '5m' or '1h'")
    return str(ttl)


def _prefix_blocks(body: Mapping[str, Any]) -> list[_Block]:
    """The request as a sequence of cacheable blocks, tools -> system -> messages; validates ``cache_control``.

    A breakpoint may sit on a tool, a system block, a message content block or a block inside a tool_result's
    content (the tool_result block then counts as the breakpoint). More than four -> :class:`_BadRequest`.
    """
    parts: list[tuple[str, list[Any], Any]] = []  # (path, place, block)
    tools, system, messages = body.get("tools"), body.get("system"), body.get("messages")
    if isinstance(tools, list):
        parts += [(f"tools.{i}", ["tools"], tool) for i, tool in enumerate(tools)]
    if isinstance(system, list):
        parts += [(f"system.{i}", ["system"], block) for i, block in enumerate(system)]
    elif system is not None:
        parts.append(("system", ["system"], system))
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else message
            if isinstance(content, list):
                parts += [(f"messages.{i}.content.{j}", ["messages", i, role], b) for j, b in enumerate(content)]
            else:
                parts.append((f"messages.{i}.content", ["messages", i, role], content))
    markers: list[tuple[str, Any]] = []
    stripped: list[tuple[list[Any], Any, Any]] = []  # (place, block without markers, its marker)
    for path, place, raw in parts:
        block, marker = _without_marker(raw)
        if marker is not None:
            markers.append((path, marker))
        if isinstance(block, dict) and block.get("type") == "tool_result" and isinstance(block.get("content"), list):
            inner = []
            for j, sub in enumerate(block["content"]):
                sub_block, sub_marker = _without_marker(sub)
                inner.append(sub_block)
                if sub_marker is not None:
                    markers.append((f"{path}.content.{j}", sub_marker))
                    marker = marker if marker is not None else sub_marker
            block = dict(block, content=inner)
        stripped.append((place, block, marker))
    if len(markers) > _MAX_BREAKPOINTS:
        raise _BadRequest(
            f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(markers)}."
        )
    if not markers:
        return []  # nothing to cache: spare the serialisation
    blocks: list[_Block] = []
    for path, marker in markers:
        _check_marker(path, marker)
    for place, block, marker in stripped:
        text = canonical_json(block)
        ttl = None if marker is None else str(marker.get("ttl", "5m"))
        blocks.append(_Block(key=canonical_json(place) + text, chars=len(text), ttl=ttl))
    return blocks


def _prefix_digests(model: str, blocks: Sequence[_Block], total: int) -> tuple[list[str], list[int]]:
    """For each block: the cache key of the prefix ending with it, and that prefix's tokens (at most ``total``)."""
    digest = hashlib.sha256(model.encode())
    keys: list[str] = []
    tokens: list[int] = []
    chars = 0
    for block in blocks:
        digest.update(block.key.encode())
        digest.update(b"\0")
        keys.append(digest.copy().hexdigest())
        chars += block.chars
        tokens.append(min(total, math.ceil(chars / 4)))
    return keys, tokens


@dataclass
class _CacheEntry:
    expires: float  # time.monotonic()
    ttl: float


@dataclass
class _CacheUse:
    """The prompt-cache accounting of one request (computed before it is admitted, committed after)."""

    read: int = 0  # cache_read_input_tokens
    creation_5m: int = 0
    creation_1h: int = 0
    breakpoints: int = 0
    hit: str | None = None  # key of the cache entry read
    writes: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (key, ttl seconds)

    @property
    def creation(self) -> int:
        """cache_creation_input_tokens."""
        return self.creation_5m + self.creation_1h


class _PromptCache:
    """Prompt-cache entries keyed by ``(model, hash of a prefix)``; not thread safe (callers hold a lock)."""

    def __init__(self) -> None:
        self.entries: dict[str, _CacheEntry] = {}
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.read_tokens = 0
        self.creation_tokens = 0

    def _purge(self, now: float) -> None:
        for key in [k for k, e in self.entries.items() if e.expires <= now]:
            del self.entries[key]

    def account(
        self,
        blocks: Sequence[_Block],
        digests: tuple[list[str], list[int]],
        now: float,
        min_tokens: int,
        ttls: Mapping[str, float],
    ) -> _CacheUse:
        """How many input tokens are read from / written to the cache (the cache is not changed).

        ``digests`` is :func:`_prefix_digests` of ``blocks``.
        """
        use = _CacheUse(breakpoints=sum(1 for b in blocks if b.ttl is not None))
        if not use.breakpoints:
            return use
        keys, tokens = digests
        eligible = [i for i, b in enumerate(blocks) if b.ttl is not None and tokens[i] >= min_tokens]
        hit = -1
        for position in eligible:
            for earlier in range(position, max(-1, position - _CACHE_LOOKBACK - 1), -1):
                if earlier <= hit:
                    break
                entry = self.entries.get(keys[earlier])
                if entry is not None and entry.expires > now:
                    hit = earlier
                    break
        if hit >= 0:
            use.read, use.hit = tokens[hit], keys[hit]
        written = use.read
        for position in eligible:
            ttl = blocks[position].ttl or "5m"
            use.writes.append((keys[position], ttls[ttl]))
            if tokens[position] > written:
                if ttl == "1h":
                    use.creation_1h += tokens[position] - written
                else:
                    use.creation_5m += tokens[position] - written
                written = tokens[position]
        return use

    def commit(self, use: _CacheUse, now: float) -> None:
        """Record a served request: refresh the entry read, write (or refresh) one entry per breakpoint."""
        self._purge(now)
        if use.hit is not None:
            entry = self.entries.get(use.hit)
            if entry is not None:
                entry.expires = max(entry.expires, now + entry.ttl)
            self.hits += 1
        elif use.writes:
            self.misses += 1
        for key, ttl in use.writes:
            entry = self.entries.get(key)
            if entry is None:
                self.entries[key] = _CacheEntry(expires=now + ttl, ttl=ttl)
                self.writes += 1
            else:
                entry.ttl = max(entry.ttl, ttl)
                entry.expires = max(entry.expires, now + entry.ttl)
        self.read_tokens += use.read
        self.creation_tokens += use.creation

    def stats(self, now: float) -> dict[str, int]:
        self._purge(now)
        return {
            "entries": len(self.entries),
            "hits": self.hits,
            "misses": self.misses,
            "writes": self.writes,
            "read_tokens": self.read_tokens,
            "creation_tokens": self.creation_tokens,
        }


@dataclass
class _Plan:
    """A turn materialised for one request."""

    content: list[dict[str, Any]]
    stop_reason: str
    usage: dict[str, int]  # the four API usage fields
    cache_creation: dict[str, int] | None = None  # the API's usage.cache_creation breakdown, when caching was asked

    def api_usage(self, **changes: int) -> dict[str, Any]:
        """The usage object as served (the four fields, plus ``cache_creation`` when the request had breakpoints)."""
        usage: dict[str, Any] = dict(self.usage, **changes)
        if self.cache_creation is not None:
            usage["cache_creation"] = dict(self.cache_creation)
        return usage


def _plan(
    turn: Turn,
    body: Mapping[str, Any],
    max_tokens: int,
    cache: _CacheUse | None = None,
    input_tokens: int | None = None,
) -> _Plan:
    """The response to serve; ``input_tokens`` is the whole input's estimate (computed when None)."""
    content: list[dict[str, Any]] = []
    for block in turn.content:
        if block["type"] == "text":
            content.append({"type": "text", "text": block["text"]})
        else:
            content.append(
                {
                    "type": "tool_use",
                    "id": block.get("id") or _new_id("toolu_"),
                    "name": block["name"],
                    "input": copy.deepcopy(block.get("input", {})),
                }
            )
    cache = cache or _CacheUse()
    usage = {
        "input_tokens": (input_tokens or estimate_input_tokens(body)) - cache.read - cache.creation,
        "output_tokens": estimate_output_tokens(content),
        "cache_creation_input_tokens": cache.creation,
        "cache_read_input_tokens": cache.read,
    }
    breakdown: dict[str, int] | None = None
    if cache.breakpoints:
        breakdown = {"ephemeral_5m_input_tokens": cache.creation_5m, "ephemeral_1h_input_tokens": cache.creation_1h}
    if turn.usage:
        usage.update(turn.usage)
        breakdown = None
    stop_reason = turn.resolved_stop_reason
    if max_tokens < usage["output_tokens"]:
        # Out of budget: only (truncated) text survives, as a real model would be cut off mid-text.
        budget = 4 * max_tokens
        truncated: list[dict[str, Any]] = []
        for block in content:
            if block["type"] != "text" or budget <= 0:
                continue
            text = block["text"][:budget]
            budget -= len(text)
            if text:
                truncated.append({"type": "text", "text": text})
        content = truncated
        usage["output_tokens"] = max_tokens
        stop_reason = "max_tokens"
    return _Plan(content=content, stop_reason=stop_reason, usage=usage, cache_creation=breakdown)


def _split(text: str, parts: int = 3) -> list[str]:
    """Split ``text`` into at most ``parts`` non-empty chunks (one empty chunk for empty text)."""
    if not text:
        return [""]
    size = max(1, math.ceil(len(text) / parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


# ------------------------------------------------------------------------------------------ call log


@dataclass
class ServedCall:
    """One ``POST /v1/messages`` request as seen by the server.

    ``status`` is ``"open"`` while in progress, then ``"completed"`` (whole response written),
    ``"client_closed"`` (client disconnected before the end), ``"rejected"`` (refused by a rate-limit /
    overload window or by the :class:`RateLimits`: 429, 529, 5xx...) or ``"error"`` (invalid request, server
    error or server stopped). ``usage`` is what was billed: zero until the response starts (for streams:
    ``message_start`` sent; input tokens and 1 output token), the full usage once ``message_delta`` / the
    JSON response was sent; always zero for rejected and error calls. ``total_tokens`` is the sum of the four
    API usage fields. ``http_status`` is the response's status code (0 while none was sent), ``error_type`` the
    error's ``type`` and ``retry_after`` the ``retry-after`` seconds sent, if any.
    """

    agent: str | None
    script: str
    turn: int
    stream: bool
    model: str
    max_tokens: int
    usage: dict[str, int]
    status: str
    started_at: float
    finished_at: float | None = None
    http_status: int = 0
    error_type: str | None = None
    retry_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (as served by ``GET /_offline/calls``)."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class RateLimits:
    """Per-model limits, each a token bucket holding up to the limit that refills completely in ``period`` seconds.

    None = unlimited (still reported, as a large number). As on the real API, output tokens are charged up front
    from ``max_tokens`` (the unused part is given back when the call ends) and input tokens are the uncached ones
    (``input_tokens + cache_creation_input_tokens``; cache reads are free).
    """

    requests_per_minute: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    period: float = 60.0

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "input_tokens_per_minute", "output_tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, not {value!r}")
        if self.period <= 0:
            raise ValueError("period must be > 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RateLimits:
        """Build from the JSON form (the dataclass fields)."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown RateLimits fields {sorted(unknown)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(math.ceil(timestamp), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds_header(seconds: float) -> str:
    """``retry-after`` text: integral seconds as an integer, else a decimal number."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"


class _Bucket:
    """A token bucket of ``capacity`` that refills completely in ``period`` seconds."""

    def __init__(self, capacity: int, period: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.period = period
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(float(self.capacity), self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, cost: int) -> float:
        """Seconds until ``cost`` fits (``period`` when it never will); call :meth:`refill` first."""
        if cost > self.capacity:
            return self.period
        return max(0.0, (cost - self.level) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


_LIMIT_KINDS = (
    ("requests", "requests_per_minute", "requests"),
    ("input-tokens", "input_tokens_per_minute", "input tokens"),
    ("output-tokens", "output_tokens_per_minute", "output tokens"),
)


class _Limiter:
    """The :class:`RateLimits` buckets of each model; not thread safe (callers hold a lock)."""

    def __init__(self, limits: RateLimits | None) -> None:
        self.limits = limits
        self.buckets: dict[str, dict[str, _Bucket]] = {}

    def _buckets(self, model: str, now: float) -> dict[str, _Bucket]:
        buckets = self.buckets.get(model)
        if buckets is None:
            buckets = {}
            if self.limits is not None:
                for kind, field, _ in _LIMIT_KINDS:
                    limit = getattr(self.limits, field)
                    if limit is not None:
                        buckets[kind] = _Bucket(limit, self.limits.period, now)
            self.buckets[model] = buckets
        for bucket in buckets.values():
            bucket.refill(now)
        return buckets

    def admit(self, model: str, input_tokens: int, output_tokens: int, now: float) -> tuple[float, str | None]:
        """Charge one request; ``(0, None)`` when admitted, else ``(seconds to wait, message)`` (nothing charged)."""
        buckets = self._buckets(model, now)
        costs = {"requests": 1, "input-tokens": input_tokens, "output-tokens": output_tokens}
        worst: tuple[float, str] | None = None
        for kind, _, unit in _LIMIT_KINDS:
            bucket = buckets.get(kind)
            if bucket is None:
                continue
            wait = bucket.wait(costs[kind])
            if wait > 0 and (worst is None or wait > worst[0]):
                per = "per minute" if bucket.period == 60 else f"per {bucket.period:g} seconds"
                worst = (
                    wait,
                    f"This request would exceed your organization's rate limit of {bucket.capacity:,} {unit} {per} "
                    f"(org: offline, model: {model}). For details, refer to: https://docs.claude.com/en/api/rate-limits."
                    " You can see the response headers for current usage. Please reduce the prompt length or the"
                    " maximum tokens requested, or try again later.",
                )
        if worst is not None:
            return worst
        for kind, bucket in buckets.items():
            bucket.level -= costs[kind]
        return 0.0, None

    def refund(self, model: str, input_tokens: int, output_tokens: int, now: float) -> None:
        buckets = self._buckets(model, now)
        for kind, amount in (("input-tokens", input_tokens), ("output-tokens", output_tokens)):
            bucket = buckets.get(kind)
            if bucket is not None and amount > 0:
                bucket.level = min(float(bucket.capacity), bucket.level + amount)

    def headers(self, model: str, now: float, wall: float) -> dict[str, str]:
        """The ``anthropic-ratelimit-*`` headers for ``model`` as of now."""
        buckets = self._buckets(model, now)
        values: dict[str, tuple[int, int, float]] = {}  # kind -> (limit, remaining, reset)
        for kind, _, _ in _LIMIT_KINDS:
            bucket = buckets.get(kind)
            if bucket is None:
                values[kind] = (_UNLIMITED, _UNLIMITED, wall)
            else:
                values[kind] = (bucket.capacity, max(0, math.floor(bucket.level)), wall + bucket.until_full())
        # "tokens": the most restrictive of the input and output token limits.
        values["tokens"] = min(values["input-tokens"], values["output-tokens"], key=lambda v: (v[1], v[0]))
        headers: dict[str, str] = {}
        for kind, (limit, remaining, reset) in values.items():
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = str(remaining)
            headers[f"anthropic-ratelimit-{kind}-reset"] = _rfc3339(reset)
        return headers


@dataclass
class _Window:
    """A scripted rate-limit / overload window."""

    status: int
    error_type: str
    message: str
    retry_after: float | None
    error_code: str | None
    model: str | None
    count_tokens: bool
    starts: float  # time.monotonic()
    ends: float
    calls_left: int | None

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "status": self.status,
            "error_type": self.error_type,
            "message": self.message,
            "retry_after": self.retry_after,
            "error_code": self.error_code,
            "model": self.model,
            "count_tokens": self.count_tokens,
            "starts_in": max(0.0, self.starts - now),
            "ends_in": max(0.0, self.ends - now),
            "calls_left": self.calls_left,
        }


# --------------------------------------------------------------------------------------------- server


class _ClientGone(Exception):
    """The client closed the connection."""


class _Stopping(Exception):
    """The server is being stopped."""


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Rejected(Exception):
    """Refuse the request with an error status (rate limit, overload...)."""

    def __init__(
        self, status: int, kind: str, message: str, retry_after: float | None = None, error_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.error_code = error_code


def _error_body(kind: str, message: str, error_code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message}
    if error_code is not None:
        error["details"] = {"error_code": error_code}
    return {"type": "error", "error": error}


def _first_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(
                b["text"]
                for b in content
                if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
            )
        return ""
    return ""


def _assistant_count(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``sock`` to be readable (poll: no FD_SETSIZE limit)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(math.ceil(timeout * 1000)))
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # many agents may connect at once

    def __init__(self, address: tuple[str, int], owner: OfflineModel) -> None:
        self.owner = owner
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS lookup of the host (slow without a resolver)."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        assert isinstance(request, socket.socket)
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            daemon=True,
            name="offline-model-conn",
        )
        with self._conn_lock:
            self._conns[request] = thread
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(request, None)

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client going away is not worth a traceback
        super().handle_error(request, client_address)

    def close_connections(self, timeout: float) -> None:
        """Shut every open connection down and wait (up to ``timeout``) for its handler thread."""
        with self._conn_lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every streamed event waits ~40 ms for a delayed ACK
    server_version = "OfflineModel/1.0"
    server: _HTTPServer
    _stream_started = False  # whether the current response is an SSE stream that already began
    _extra_headers: Mapping[str, str] = MappingProxyType({})  # sent with this request's response (rate limits)

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None, request_id: str | None = None
    ) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", request_id or _new_id("req_"))
        for name, value in {**self._extra_headers, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error_json(
        self,
        status: int,
        kind: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        error_code: str | None = None,
    ) -> None:
        request_id = _new_id("req_")
        body = dict(_error_body(kind, message, error_code), request_id=request_id)
        self._send_json(status, body, headers, request_id)

    def _send_rejection(self, exc: _Rejected) -> None:
        headers = {}
        if exc.retry_after is not None:
            headers["retry-after"] = _seconds_header(exc.retry_after)
        if exc.error_code is None:
            headers["x-should-retry"] = "true"
        self._send_error_json(exc.status, exc.kind, exc.message, headers, exc.error_code)

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            raise (_Stopping() if self.server.owner.stopping else _ClientGone()) from exc

    def _send_event(self, event: str, payload: Mapping[str, Any]) -> None:
        frame = f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()
        self._write(b"%x\r\n%s\r\n" % (len(frame), frame))  # HTTP/1.1 chunked transfer encoding

    def _peer_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the client to close its end; True if it did."""
        sock: socket.socket = self.connection
        try:
            if not _readable(sock, timeout):
                return False
        except (OSError, ValueError):
            return True
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if data:  # a pipelined request, not a close: just sleep
            self.server.owner._stop_event.wait(timeout)
            return False
        return True

    def _wait(self, seconds: float, *, ping: bool) -> None:
        """Sleep ``seconds``, noticing a closing client or server; optionally send pings meanwhile."""
        owner = self.server.owner
        now = time.monotonic()
        deadline = now + seconds
        next_ping = now + PING_INTERVAL
        while True:
            if owner.stopping:
                raise _Stopping()
            now = time.monotonic()
            if now >= deadline:
                return
            step = min(deadline - now, _POLL_INTERVAL)
            if ping:
                step = max(0.0, min(step, next_ping - now))
            if self._peer_closed(step):
                raise _Stopping() if owner.stopping else _ClientGone()
            now = time.monotonic()
            if ping and next_ping <= now < deadline:
                self._send_event("ping", {"type": "ping"})
                next_ping = now + PING_INTERVAL

    # ------------------------------------------------------------------ routes

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        raw = self._read_body()
        owner = self.server.owner
        route = (self.command, path)
        self._extra_headers = {}
        if route == ("POST", "/v1/messages"):
            self._messages(raw)
        elif route == ("POST", "/v1/messages/count_tokens"):
            self._count_tokens(raw)
        elif route == ("GET", "/_offline/health"):
            self._send_json(200, {"ok": True})
        elif route == ("GET", "/_offline/calls"):
            self._send_json(200, [c.to_dict() for c in owner.calls()])
        elif route == ("POST", "/_offline/reset"):
            owner.reset()
            self._send_json(200, {"ok": True})
        elif route == ("GET", "/_offline/cache"):
            self._send_json(200, owner.cache_stats())
        elif route == ("DELETE", "/_offline/cache"):
            owner.clear_cache()
            self._send_json(200, {"ok": True})
        elif route == ("GET", "/_offline/rate_limit"):
            self._send_json(200, owner._rate_limit_state())
        elif route == ("POST", "/_offline/rate_limit"):
            self._control(raw, lambda spec: owner.rate_limit_window(**spec))
        elif route == ("DELETE", "/_offline/rate_limit"):
            owner.clear_rate_limits()
            self._send_json(200, {"ok": True})
        elif route == ("POST", "/_offline/limits"):
            self._control(raw, lambda spec: owner.set_limits(RateLimits.from_dict(spec) if spec else None))
        else:
            self._send_error_json(404, "not_found_error", f"Not found: {self.command} {path}")

    def _control(self, raw: bytes, apply: Callable[[dict[str, Any]], None]) -> None:
        """Apply a JSON object body to the model (an ``/_offline/*`` control route)."""
        try:
            spec = json.loads(raw or b"{}")
            if not isinstance(spec, dict):
                raise ValueError("body must be a JSON object")
            apply(spec)
        except (TypeError, ValueError) as exc:
            self._send_error_json(400, "invalid_request_error", str(exc))
            return
        self._send_json(200, {"ok": True})

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        if not isinstance(body.get("messages"), list):
            raise _BadRequest("messages: field required (a list of messages)")
        return body

    def _count_tokens(self, raw: bytes) -> None:
        """Count input tokens: the whole request (caching and the context window do not apply)."""
        owner = self.server.owner
        try:
            body = self._parse(raw)
            model = body.get("model")
            owner._check_window(model if isinstance(model, str) else "", count_tokens=True)
            owner._wait_latency(self)
        except _BadRequest as exc:
            self._send_error_json(400, "invalid_request_error", exc.message)
            return
        except _Rejected as exc:
            owner._count_rejection(exc.status)
            self._send_rejection(exc)
            return
        except (_ClientGone, _Stopping):
            self.close_connection = True
            return
        self._send_json(200, {"input_tokens": estimate_input_tokens(body)})

    def _messages(self, raw: bytes) -> None:
        owner = self.server.owner
        call = ServedCall(
            agent=None,
            script="",
            turn=0,
            stream=False,
            model="",
            max_tokens=0,
            usage=_zero_usage(),
            status="open",
            started_at=time.time(),
        )
        owner._record(call)
        self._stream_started = False
        status = "error"
        charged: tuple[str, int, int] | None = None  # (model, input, output) charged to the rate limits
        try:
            body = self._parse(raw)
            messages = body["messages"]
            metadata = body.get("metadata")
            user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
            model_name = body.get("model")
            max_tokens = body.get("max_tokens")
            marker = _MARKER_RE.search(_first_user_text(messages))
            script_name = marker.group(1) if marker else owner.default_script
            owner._update(
                call,
                agent=user_id if isinstance(user_id, str) else None,
                script=script_name,
                turn=_assistant_count(messages),
                stream=body.get("stream") is True,
                model=model_name if isinstance(model_name, str) else "",
                max_tokens=max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 0,
            )
            self._extra_headers = owner._rate_limit_headers(call.model)
            if not isinstance(model_name, str) or not model_name:
                raise _BadRequest("model: field required")
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise _BadRequest("max_tokens: field required (an integer >= 1)")
            owner._check_window(model_name, count_tokens=False)
            blocks = _prefix_blocks(body)
            input_tokens = estimate_input_tokens(body)
            owner._check_context_window(model_name, input_tokens, max_tokens)
            script = owner._script(script_name)
            if script is None:
                raise _BadRequest(f"unknown offline model script {script_name!r}")
            turn = script.turn_at(call.turn)
            plan = owner._admit(model_name, turn, body, blocks, input_tokens, max_tokens)  # may raise a 429
            charged = (model_name, plan.usage["input_tokens"] + plan.usage["cache_creation_input_tokens"], max_tokens)
            self._extra_headers = owner._rate_limit_headers(model_name)
            owner._wait_latency(self)
            if call.stream:
                self._stream(call, model_name, turn, plan)
            else:
                self._wait(turn.delay, ping=False)
                # Logged as completed before the last byte goes out, so a client that has its answer never
                # sees the call still "open" in the log (a failed write below turns it into client_closed).
                owner._update(
                    call, usage=_with_total(plan.usage), status="completed", finished_at=time.time(), http_status=200
                )
                message = self._message(model_name, plan.content, plan.stop_reason, plan.api_usage())
                try:
                    self._send_json(200, message)
                except OSError as exc:
                    raise (_Stopping() if owner.stopping else _ClientGone()) from exc
            status = "completed"
        except _BadRequest as exc:
            # Logged before the client can read it.
            owner._update(
                call, status="error", finished_at=time.time(), http_status=400, error_type="invalid_request_error"
            )
            self._send_error_json(400, "invalid_request_error", exc.message)
        except _Rejected as exc:
            status = "rejected"
            owner._update(
                call,
                status=status,
                finished_at=time.time(),
                http_status=exc.status,
                error_type=exc.kind,
                retry_after=exc.retry_after,
            )
            self._send_rejection(exc)
        except _ClientGone:
            status = "client_closed"
            self.close_connection = True
        except _Stopping:
            self.close_connection = True
        except Exception as exc:
            self.close_connection = True
            owner._update(call, status="error", finished_at=time.time())
            if not self._stream_started:
                owner._update(call, http_status=500, error_type="api_error")
            self._try_report(exc)
        finally:
            owner._update(call, status=status, finished_at=time.time())
            if charged is not None:
                owner._release(charged, call)

    def _try_report(self, exc: Exception) -> None:
        """Best effort: tell the client about an unexpected server error."""
        try:
            if self._stream_started:
                self._send_event("error", _error_body("api_error", f"offline model error: {exc!r}"))
            else:
                self._send_error_json(500, "api_error", f"offline model error: {exc!r}")
        except Exception:
            pass

    @staticmethod
    def _message(
        model: str, content: list[dict[str, Any]], stop_reason: str | None, usage: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": dict(usage),
        }

    def _stream(self, call: ServedCall, model: str, turn: Turn, plan: _Plan) -> None:
        owner = self.server.owner
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("request-id", _new_id("req_"))
            for name, value in self._extra_headers.items():
                self.send_header(name, value)
            self.end_headers()
        except OSError as exc:
            raise (_Stopping() if owner.stopping else _ClientGone()) from exc
        self._stream_started = True
        start_usage = dict(plan.usage, output_tokens=1)
        owner._update(call, usage=_with_total(start_usage), http_status=200)  # billed from here on
        self._send_event(
            "message_start",
            {"type": "message_start", "message": self._message(model, [], None, plan.api_usage(output_tokens=1))},
        )
        self._wait(turn.delay, ping=True)

        def send(event: str, payload: dict[str, Any]) -> None:
            self._wait(turn.chunk_delay, ping=True)
            self._send_event(event, {"type": event, **payload})

        for index, block in enumerate(plan.content):
            if block["type"] == "text":
                send("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                for piece in _split(block["text"]):
                    send(
                        "content_block_delta",
                        {"index": index, "delta": {"type": "text_delta", "text": piece}},
                    )
            else:
                start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                send("content_block_start", {"index": index, "content_block": start})
                for piece in _split(json.dumps(block["input"])):
                    send(
                        "content_block_delta",
                        {"index": index, "delta": {"type": "input_json_delta", "partial_json": piece}},
                    )
            send("content_block_stop", {"index": index})
        send(
            "message_delta",
            {
                "delta": {"stop_reason": plan.stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": plan.usage["output_tokens"]},
            },
        )
        owner._update(call, usage=_with_total(plan.usage), status="completed", finished_at=time.time())
        send("message_stop", {})
        self._write(b"0\r\n\r\n")  # end of the chunked body


class OfflineModel:
    """A local, scripted Anthropic Messages API server for tests, demos and benchmarks.

    Use it as a context manager (``with OfflineModel() as model: ...``) or call :meth:`start` /
    :meth:`stop`; point the SDK at :attr:`url`. ``scripts`` are added to :data:`BUILTIN_SCRIPTS`;
    ``latency`` (seconds) is waited before every successful API response.

    ``limits`` rate-limits each model (see :class:`RateLimits`; None = unlimited). ``context_window`` (or per
    model ``context_windows``) rejects over-long requests with a 400 like the real API; None = no window.
    Prompt caching: a prefix shorter than ``min_cache_tokens`` is not cached; entries live ``cache_ttl``
    seconds (``cache_control.ttl`` "5m", the default) or ``cache_ttl_1h`` ("1h"), refreshed on each hit.
    """

    def __init__(
        self,
        scripts: Mapping[str, Script] | None = None,
        *,
        default_script: str = "fix_failing_test",
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        limits: RateLimits | None = None,
        context_window: int | None = None,
        context_windows: Mapping[str, int] | None = None,
        min_cache_tokens: int = 1024,
        cache_ttl: float = 300.0,
        cache_ttl_1h: float = 3600.0,
    ) -> None:
        self._scripts: dict[str, Script] = dict(BUILTIN_SCRIPTS)
        if scripts:
            self._scripts.update(scripts)
        self.default_script = default_script
        self.host = host
        self.port = port
        self.latency = latency
        self.context_window = context_window
        self.context_windows: dict[str, int] = dict(context_windows or {})
        self.min_cache_tokens = min_cache_tokens
        self.cache_ttl = cache_ttl
        self.cache_ttl_1h = cache_ttl_1h
        self._lock = threading.Lock()
        self._calls: list[ServedCall] = []
        self._limiter = _Limiter(limits)
        self._windows: list[_Window] = []
        self._count_tokens_rejections: dict[int, int] = {}
        self._cache = _PromptCache()
        self._stop_event = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> OfflineModel:
        """Bind and serve in a daemon thread (no-op when already running); returns self."""
        if self._httpd is not None:
            return self
        self._stop_event.clear()
        httpd = _HTTPServer((self.host, self.port), self)
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="offline-model"
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: close open streams and connections, then the listening socket."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._stop_event.set()
        httpd.shutdown()
        if thread is not None:
            thread.join(timeout)
        httpd.close_connections(timeout)
        httpd.server_close()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> OfflineModel:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._httpd is not None

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` is in progress."""
        return self._stop_event.is_set()

    @property
    def url(self) -> str:
        """Base URL for the SDK, e.g. ``http://127.0.0.1:54321``."""
        if self._httpd is None:
            raise RuntimeError("OfflineModel is not started")
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ scripts

    def add_script(self, name: str, script: Script) -> None:
        """Register (or replace) a script under ``name``."""
        if not isinstance(script, Script):
            raise TypeError("script must be a Script")
        with self._lock:
            self._scripts[name] = script

    def _script(self, name: str) -> Script | None:
        with self._lock:
            return self._scripts.get(name)

    # ------------------------------------------------------------------ log

    def calls(self) -> list[ServedCall]:
        """A snapshot (copies) of every ``/v1/messages`` call served so far, oldest first."""
        with self._lock:
            return [dataclasses.replace(c, usage=dict(c.usage)) for c in self._calls]

    def usage_for(self, agent: str | None = None) -> dict[str, int]:
        """Summed usage of the calls for ``agent`` (all calls when None).

        Like the real API, a call is billed as soon as its response started (``message_start`` sent), also
        when the client later disconnected; see :class:`ServedCall` for what ``usage`` holds.
        """
        total = _zero_usage()
        with self._lock:
            for call in self._calls:
                if agent is None or call.agent == agent:
                    for key in total:
                        total[key] += call.usage.get(key, 0)
        return total

    def open_streams(self) -> int:
        """Number of streaming calls currently in progress."""
        with self._lock:
            return sum(1 for c in self._calls if c.stream and c.status == "open")

    def reset(self) -> None:
        """Forget all logged calls (and count_tokens rejections); windows, limits and the cache stay."""
        with self._lock:
            self._calls.clear()
            self._count_tokens_rejections.clear()

    # ------------------------------------------------------------------ rate limits

    @property
    def limits(self) -> RateLimits | None:
        """The per-model rate limits (None = unlimited)."""
        return self._limiter.limits

    def set_limits(self, limits: RateLimits | None) -> None:
        """Replace the rate limits; every bucket starts full again."""
        with self._lock:
            self._limiter = _Limiter(limits)

    def rate_limit_window(
        self,
        seconds: float,
        *,
        status: int = 429,
        retry_after: float | None = 5,
        error_type: str | None = None,
        model: str | None = None,
        message: str | None = None,
        error_code: str | None = None,
        count_tokens: bool = False,
        delay: float = 0.0,
        calls: int | None = None,
    ) -> None:
        """Refuse every ``POST /v1/messages`` (only for ``model`` if given) for the next ``seconds``.

        The response has HTTP ``status`` and an error body of ``error_type`` (default from the status: 429
        ``rate_limit_error``, 529 ``overloaded_error``, 504 ``timeout_error``, other 5xx ``api_error``, 400
        ``invalid_request_error``...) with ``message``, and the headers ``retry-after`` (when given),
        ``request-id``, ``x-should-retry: true`` and the rate-limit ones. ``error_code`` goes to
        ``error.details.error_code`` (e.g. ``"enforced_spend_limit_reached"``: the SDK raises its subclass) and
        drops ``x-should-retry``. ``count_tokens`` refuses ``/v1/messages/count_tokens`` too. The window starts
        ``delay`` seconds from now, and ends early after ``calls`` refusals if given. Windows queue: a request is
        refused by the oldest window in force for it. Refused calls are logged with status ``"rejected"``.
        """
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), not {status}")
        if seconds <= 0 or delay < 0:
            raise ValueError("seconds must be > 0 and delay >= 0")
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after must be >= 0 or None")
        if calls is not None and calls < 1:
            raise ValueError("calls must be >= 1 or None")
        kind = error_type or _DEFAULT_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        starts = time.monotonic() + delay
        window = _Window(
            status=int(status),
            error_type=kind,
            message=message or _DEFAULT_ERROR_MESSAGES.get(kind, f"Offline model refused the request ({status})."),
            retry_after=float(retry_after) if retry_after is not None else None,
            error_code=error_code,
            model=model,
            count_tokens=bool(count_tokens),
            starts=starts,
            ends=starts + seconds,
            calls_left=calls,
        )
        with self._lock:
            self._windows.append(window)

    def clear_rate_limits(self) -> None:
        """Drop every rate-limit window (the :class:`RateLimits` buckets stay)."""
        with self._lock:
            self._windows.clear()

    def rejections(self, model: str | None = None) -> list[ServedCall]:
        """The ``/v1/messages`` calls refused so far (status ``"rejected"``), for ``model`` if given."""
        return [c for c in self.calls() if c.status == "rejected" and (model is None or c.model == model)]

    def rejection_counts(self, route: str = "messages") -> dict[int, int]:
        """Refusals per HTTP status, e.g. ``{429: 3, 529: 1}``; ``route`` is ``"messages"`` or ``"count_tokens"``."""
        if route == "count_tokens":
            with self._lock:
                return dict(self._count_tokens_rejections)
        if route != "messages":
            raise ValueError(f"unknown route {route!r}")
        counts: dict[int, int] = {}
        for call in self.rejections():
            counts[call.http_status] = counts.get(call.http_status, 0) + 1
        return counts

    def _check_window(self, model: str, *, count_tokens: bool) -> None:
        """Raise :class:`_Rejected` when a window refuses this request."""
        now = time.monotonic()
        with self._lock:
            self._windows = [w for w in self._windows if w.ends > now and w.calls_left != 0]
            for window in self._windows:
                if window.starts > now or (window.model is not None and window.model != model):
                    continue
                if count_tokens and not window.count_tokens:
                    continue
                if window.calls_left is not None:
                    window.calls_left -= 1
                raise _Rejected(window.status, window.error_type, window.message, window.retry_after, window.error_code)

    def _count_rejection(self, status: int) -> None:
        with self._lock:
            self._count_tokens_rejections[status] = self._count_tokens_rejections.get(status, 0) + 1

    def _rate_limit_headers(self, model: str) -> dict[str, str]:
        with self._lock:
            return self._limiter.headers(model, time.monotonic(), time.time())

    def _rate_limit_state(self) -> dict[str, Any]:
        """What ``GET /_offline/rate_limit`` serves."""
        now = time.monotonic()
        with self._lock:
            windows = [w.to_dict(now) for w in self._windows if w.ends > now and w.calls_left != 0]
            limits = self._limiter.limits
            ct = {str(k): v for k, v in self._count_tokens_rejections.items()}
        return {
            "windows": windows,
            "limits": limits.to_dict() if limits is not None else None,
            "rejections": {str(k): v for k, v in self.rejection_counts().items()},
            "count_tokens_rejections": ct,
        }

    # ------------------------------------------------------------------ context window and caching

    def context_window_for(self, model: str) -> int | None:
        """The context window enforced for ``model`` (None = none)."""
        return self.context_windows.get(model, self.context_window)

    def _check_context_window(self, model: str, input_tokens: int, max_tokens: int) -> None:
        window = self.context_window_for(model)
        if window is None:
            return
        if input_tokens > window:
            raise _BadRequest(f"prompt is too long: {input_tokens} tokens > {window} maximum")
        if input_tokens + max_tokens > window:
            raise _BadRequest(
                f"input length and `max_tokens` exceed context limit: {input_tokens} + {max_tokens} > {window}, "
                "decrease input length or `max_tokens` and try again"
            )

    def cache_stats(self) -> dict[str, int]:
        """Prompt-cache counters: live ``entries``; requests with a cache ``hits`` / with breakpoints but no hit
        ``misses``; new entries ``writes``; summed ``read_tokens`` / ``creation_tokens``.
        """
        with self._lock:
            return self._cache.stats(time.monotonic())

    def clear_cache(self) -> None:
        """Forget every prompt-cache entry and counter."""
        with self._lock:
            self._cache = _PromptCache()

    def _admit(
        self,
        model: str,
        turn: Turn,
        body: Mapping[str, Any],
        blocks: Sequence[_Block],
        input_tokens: int,
        max_tokens: int,
    ) -> _Plan:
        """Plan the response with its cache accounting and charge it to the rate limits (or raise a 429)."""
        digests = _prefix_digests(model, blocks, input_tokens)
        ttls = {"5m": self.cache_ttl, "1h": self.cache_ttl_1h}
        with self._lock:
            now = time.monotonic()
            use = self._cache.account(blocks, digests, now, self.min_cache_tokens, ttls)
            plan = _plan(turn, body, max_tokens, use, input_tokens)
            uncached = plan.usage["input_tokens"] + plan.usage["cache_creation_input_tokens"]
            wait, message = self._limiter.admit(model, uncached, max_tokens, now)
            if message is not None:
                raise _Rejected(429, "rate_limit_error", message, retry_after=max(1, math.ceil(wait)))
            self._cache.commit(use, now)
        return plan

    def _release(self, charged: tuple[str, int, int], call: ServedCall) -> None:
        """Give back to the rate limits what was charged up front but not billed."""
        model, input_charged, output_charged = charged
        with self._lock:
            billed = call.usage["total_tokens"] > 0  # the response started: its input was used
            unused_input = 0 if billed else input_charged
            self._limiter.refund(model, unused_input, output_charged - call.usage["output_tokens"], time.monotonic())

    def _record(self, call: ServedCall) -> None:
        with self._lock:
            self._calls.append(call)

    def _update(self, call: ServedCall, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(call, key, value)

    def _wait_latency(self, handler: _Handler) -> None:
        if self.latency > 0:
            handler._wait(self.latency, ping=False)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Run the offline model in the foreground until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.testing.offline_model",
        description="Offline, scripted stand-in for the Anthropic Messages API.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--script-file", type=Path, help="JSON: name -> {turns: [...], repeat_last: bool}")
    parser.add_argument("--default-script", default="fix_failing_test")
    parser.add_argument("--latency", type=float, default=0.0, help="extra seconds before each response")
    parser.add_argument("--context-window", type=int, help="reject longer requests with a 400 (default: none)")
    parser.add_argument("--min-cache-tokens", type=int, default=1024, help="shortest cacheable prefix")
    parser.add_argument("--cache-ttl", type=float, default=300.0, help="seconds a 5m prompt-cache entry lives")
    parser.add_argument("--requests-per-minute", type=int, help="rate limit per model (default: none)")
    parser.add_argument("--input-tokens-per-minute", type=int, help="rate limit per model (default: none)")
    parser.add_argument("--output-tokens-per-minute", type=int, help="rate limit per model (default: none)")
    args = parser.parse_args(argv)

    scripts = load_scripts(args.script_file) if args.script_file else None
    per_minute = (args.requests_per_minute, args.input_tokens_per_minute, args.output_tokens_per_minute)
    model = OfflineModel(
        scripts,
        default_script=args.default_script,
        host=args.host,
        port=args.port,
        latency=args.latency,
        limits=RateLimits(*per_minute) if any(v is not None for v in per_minute) else None,
        context_window=args.context_window,
        min_cache_tokens=args.min_cache_tokens,
        cache_ttl=args.cache_ttl,
    )
    if model._script(args.default_script) is None:
        parser.error(f"unknown default script {args.default_script!r}")

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with model:
        print(f"offline model listening on {model.url}", flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
