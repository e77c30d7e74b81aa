"""Offline stand-in for the Anthropic Messages API.

:class:`OfflineModel` is a small local HTTP server (stdlib ``ThreadingHTTPServer``) that speaks enough of
the Messages API for the real ``anthropic`` SDK to talk to it through ``base_url`` /
``ANTHROPIC_BASE_URL``: ``POST /v1/messages`` (JSON or SSE streaming), ``POST /v1/messages/count_tokens``
and a few ``/_offline/*`` introspection routes.

The "model" answers from :class:`Script` s of :class:`Turn` s. The script is chosen per request by a
``[[script:NAME]]`` marker in the first user message (else the server's default script) and the turn is
chosen *statelessly*: it is the number of assistant messages already in the request, so a conversation
resumed from a checkpoint continues where it left off.

Usage numbers are deterministic estimates (about four characters of canonical JSON per token), see
:func:`estimate_input_tokens` and :func:`estimate_output_tokens`.

Run it as a separate process with ``python -m orchestrator.testing.offline_model --port 8765``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "BUILTIN_SCRIPTS",
    "DONE_TEXT",
    "EDITOR_TOOL",
    "PING_INTERVAL",
    "OfflineModel",
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
_STOP_REASONS = ("end_turn", "tool_use", "max_tokens", "stop_sequence", "pause_turn", "refusal")


# --------------------------------------------------------------------------------------------- scripts


@dataclass
class Turn:
    """One scripted assistant response.

    ``content`` holds ``{"type": "text", "text": ...}`` and ``{"type": "tool_use", "name": ...,
    "input": {...}}`` blocks (the server fills in tool_use ids). ``stop_reason`` defaults to ``"tool_use"``
    when there is a tool_use block, else ``"end_turn"``. ``delay`` is waited before the response (for
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
class _Plan:
    """A turn materialised for one request."""

    content: list[dict[str, Any]]
    stop_reason: str
    usage: dict[str, int]  # the four API usage fields


def _plan(turn: Turn, body: Mapping[str, Any], max_tokens: int) -> _Plan:
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
    usage = {
        "input_tokens": estimate_input_tokens(body),
        "output_tokens": estimate_output_tokens(content),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    if turn.usage:
        usage.update(turn.usage)
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
    return _Plan(content=content, stop_reason=stop_reason, usage=usage)


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
    ``"client_closed"`` (client disconnected before the end) or ``"error"`` (rejected request, server
    error or server stopped). ``usage`` is what was billed: zero until the response starts (for streams:
    ``message_start`` sent; input tokens and 1 output token), the full usage once ``message_delta`` / the
    JSON response was sent. ``total_tokens`` is the sum of the four API usage fields.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (as served by ``GET /_offline/calls``)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- server


class _ClientGone(Exception):
    """The client closed the connection."""


class _Stopping(Exception):
    """The server is being stopped."""


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


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

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", _new_id("req_"))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_error_json(self, status: int, kind: str, message: str) -> None:
        self._send_json(status, _error_body(kind, message))

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
        else:
            self._send_error_json(404, "not_found_error", f"Not found: {self.command} {path}")

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
        owner = self.server.owner
        try:
            body = self._parse(raw)
            owner._wait_latency(self)
        except _BadRequest as exc:
            self._send_error_json(400, "invalid_request_error", exc.message)
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
            if not isinstance(model_name, str) or not model_name:
                raise _BadRequest("model: field required")
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise _BadRequest("max_tokens: field required (an integer >= 1)")
            script = owner._script(script_name)
            if script is None:
                raise _BadRequest(f"unknown offline model script {script_name!r}")
            turn = script.turn_at(call.turn)
            plan = _plan(turn, body, max_tokens)
            owner._wait_latency(self)
            if call.stream:
                self._stream(call, model_name, turn, plan)
            else:
                self._wait(turn.delay, ping=False)
                # Logged as completed before the last byte goes out, so a client that has its answer never
                # sees the call still "open" in the log (a failed write below turns it into client_closed).
                owner._update(call, usage=_with_total(plan.usage), status="completed", finished_at=time.time())
                message = self._message(model_name, plan.content, plan.stop_reason, plan.usage)
                try:
                    self._send_json(200, message)
                except OSError as exc:
                    raise (_Stopping() if owner.stopping else _ClientGone()) from exc
            status = "completed"
        except _BadRequest as exc:
            owner._update(call, status="error", finished_at=time.time())  # logged before the client can read it
            self._send_error_json(400, "invalid_request_error", exc.message)
        except _ClientGone:
            status = "client_closed"
            self.close_connection = True
        except _Stopping:
            self.close_connection = True
        except Exception as exc:
            self.close_connection = True
            owner._update(call, status="error", finished_at=time.time())
            self._try_report(exc)
        finally:
            owner._update(call, status=status, finished_at=time.time())

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
        model: str, content: list[dict[str, Any]], stop_reason: str | None, usage: Mapping[str, int]
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
            self.end_headers()
        except OSError as exc:
            raise (_Stopping() if owner.stopping else _ClientGone()) from exc
        self._stream_started = True
        start_usage = dict(plan.usage, output_tokens=1)
        owner._update(call, usage=_with_total(start_usage))  # billed from here on
        self._send_event(
            "message_start", {"type": "message_start", "message": self._message(model, [], None, start_usage)}
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
    ``latency`` (seconds) is waited before every API response.
    """

    def __init__(
        self,
        scripts: Mapping[str, Script] | None = None,
        *,
        default_script: str = "fix_failing_test",
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
    ) -> None:
        self._scripts: dict[str, Script] = dict(BUILTIN_SCRIPTS)
        if scripts:
            self._scripts.update(scripts)
        self.default_script = default_script
        self.host = host
        self.port = port
        self.latency = latency
        self._lock = threading.Lock()
        self._calls: list[ServedCall] = []
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
        """Forget all logged calls."""
        with self._lock:
            self._calls.clear()

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
    args = parser.parse_args(argv)

    scripts = load_scripts(args.script_file) if args.script_file else None
    model = OfflineModel(
        scripts, default_script=args.default_script, host=args.host, port=args.port, latency=args.latency
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
