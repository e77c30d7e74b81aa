"""The model call: one streamed Messages API request through the official ``anthropic`` SDK.

The SDK's own retries are off (``max_retries=0``): the agent loop and ``orchestrator.ratelimit`` are the one retry
layer, because only they know whether a failed call was cut on purpose (kill, killswitch), whether the fleet is
paused, and whether the budget still allows another try.

Prompt caching: every request marks its stable prefix with ``cache_control`` breakpoints (see ``request``): the
system block (the prefix runs tools -> system -> messages, so it covers the tools too), the end of the previous
request and the end of this one. The marks are added to the request only, never to the transcript the caller
keeps, so a resumed run sends exactly the same prefix; ``count_tokens`` sees the same request, so its count is
the exact input of the call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anthropic

from orchestrator.agent import transport
from orchestrator.models import Usage
from orchestrator.pricing import cost_micro_usd


@dataclass
class ModelReply:
    """What one model call produced."""

    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: Usage
    stop_details: dict[str, Any] | None = None  # e.g. a refusal's category and explanation


@dataclass
class ModelCallError(Exception):
    """A model call failed; ``usage`` is what the API billed before it failed (settled, not lost)."""

    cause: BaseException
    usage: Usage = field(default_factory=Usage)
    retryable: bool = False

    def __str__(self) -> str:
        return f"{type(self.cause).__name__}: {self.cause}"


def make_usage(model: str, input_tokens: int, output_tokens: int, cache_write: int, cache_read: int) -> Usage:
    """A Usage with its total and cost filled in."""
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_creation_input_tokens=cache_write,
        cache_read_input_tokens=cache_read,
        total_tokens=input_tokens + output_tokens + cache_write + cache_read,
        cost_usd=cost_micro_usd(model, input_tokens, output_tokens, cache_write, cache_read) / 1_000_000,
    )


def block_to_param(block: Any) -> dict[str, Any]:
    """An SDK content block as the dict we send back in the transcript."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    dumped: dict[str, Any] = block.model_dump(mode="json", exclude_none=True)
    return dumped


RETRYABLE = (anthropic.APIConnectionError, anthropic.RateLimitError, anthropic.InternalServerError)
EPHEMERAL: dict[str, str] = {"type": "ephemeral"}


def _blocks(content: Any) -> list[Any]:
    """Message content as a list of blocks (a string becomes one text block, as the API reads it)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _marked(message: dict[str, Any]) -> dict[str, Any]:
    """A copy of a message whose last content block carries a cache breakpoint."""
    blocks = _blocks(message["content"])
    last = blocks[-1] if blocks else None
    if isinstance(last, dict) and not (last.get("type") == "text" and not last.get("text")):  # never an empty text
        blocks[-1] = dict(last, cache_control=EPHEMERAL)
    return dict(message, content=blocks)


def request_messages(messages: Sequence[dict[str, Any]], caching: bool = True) -> list[dict[str, Any]]:
    """The messages as sent: content as block lists (so a message reads the same whether or not it is marked)
    and, with ``caching``, breakpoints on the last block of the last message and of the message just before the
    latest assistant reply (where the previous request ended). The input is not changed."""
    out = [dict(m, content=_blocks(m["content"])) for m in messages]
    if not caching or not out:
        return out
    last = len(out) - 1
    marks = {last}
    replies = [i for i, m in enumerate(out) if m.get("role") == "assistant"]
    if replies and 0 < replies[-1] < last:
        marks.add(replies[-1] - 1)
    for i in marks:
        out[i] = _marked(out[i])
    return out

class CallInterrupted(Exception):
    """The call was cut on purpose (kill, killswitch, duration limit), or the client was cancelled before it."""


class ModelClient:
    """Streams one call at a time; ``cancel()`` from another thread cuts the call in flight."""

    def __init__(self, client: anthropic.Anthropic, model: str, system: str,
                 tools: Sequence[dict[str, Any]], user_id: str, caching: bool = True) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.tools = list(tools)
        self.user_id = user_id
        self.caching = caching
        self._lock = threading.Lock()
        self._stream: Any = None
        self._cancelled = False
        self._caller: int | None = None  # the thread inside a request, for cancel() to cut
        transport.install(getattr(client, "_client", None))

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Mark this thread as inside a request that ``cancel()`` may cut (see ``orchestrator.agent.transport``)."""
        with self._lock:
            if self._cancelled:
                raise CallInterrupted("model client was cancelled")
            self._caller = transport.begin()
        try:
            yield
        finally:
            with self._lock:
                self._stream = None
                transport.end(self._caller)
                self._caller = None

    def request(self, messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The request's model, system, tools and messages, with the cache breakpoints when caching is on."""
        system: dict[str, Any] = {"type": "text", "text": self.system}
        if self.caching:
            system["cache_control"] = EPHEMERAL
        return {"model": self.model, "system": [system], "tools": self.tools,
                "messages": request_messages(messages, self.caching)}

    def count_tokens(self, messages: Sequence[dict[str, Any]]) -> int:
        """Exact input tokens of the request ``call`` would send (the API's count_tokens endpoint; free)."""
        try:
            with self._interruptible():
                result = self.client.messages.count_tokens(**self.request(messages))
        except Exception as exc:
            raise ModelCallError(exc, Usage(), isinstance(exc, RETRYABLE)) from exc
        return int(result.input_tokens)

    def call(self, messages: Sequence[dict[str, Any]], max_tokens: int,
             on_event: Callable[[], None] | None = None,
             on_response: Callable[[Mapping[str, str]], None] | None = None) -> ModelReply:
        """Stream one response; raises ModelCallError carrying the usage billed so far.

        ``on_response`` gets the response headers as soon as the API accepted the call (before the first event).
        """
        seen = {"input": 0, "output": 0, "cw": 0, "cr": 0}
        try:
            with self._interruptible(), self.client.messages.stream(
                max_tokens=max_tokens, metadata={"user_id": self.user_id}, **self.request(messages),
            ) as stream:
                with self._lock:
                    self._stream = stream
                    if self._cancelled:
                        stream.close()
                if on_response is not None:
                    on_response(stream.response.headers)
                for event in stream:
                    if event.type == "message_start":
                        u = event.message.usage
                        seen["input"] = u.input_tokens
                        seen["cw"] = u.cache_creation_input_tokens or 0
                        seen["cr"] = u.cache_read_input_tokens or 0
                        seen["output"] = u.output_tokens
                    elif event.type == "message_delta":
                        seen["output"] = event.usage.output_tokens
                    if on_event is not None:
                        on_event()
                final = stream.get_final_message()
        except Exception as exc:
            usage = make_usage(self.model, seen["input"], seen["output"], seen["cw"], seen["cr"])
            raise ModelCallError(exc, usage, isinstance(exc, RETRYABLE)) from exc
        u = final.usage
        usage = make_usage(self.model, u.input_tokens, u.output_tokens,
                           u.cache_creation_input_tokens or 0, u.cache_read_input_tokens or 0)
        details = final.stop_details.model_dump(mode="json", exclude_none=True) if final.stop_details else None
        return ModelReply([block_to_param(b) for b in final.content], final.stop_reason, usage, details)

    def cancel(self) -> None:
        """Cut the call in flight (and refuse any later one): thread-safe, from any thread, at once.

        The calling thread's socket is shut down under it (before the response headers as well as mid-stream);
        that thread then closes its own stream. It is never closed from here while another thread reads it: closing
        frees the socket's file descriptor under the reader, which, woken by the shutdown, could then wait on
        whatever file reuses that number (seen as a killswitch drill agent stuck for 10 s in the threads pool).
        """
        with self._lock:
            self._cancelled = True
            stream = self._stream
            caller = self._caller
        if caller is not None and caller != threading.get_ident():
            transport.cut(caller)
            return
        if stream is not None:
            # Closing a half-read response from another thread may raise; the reader stops anyway.
            with contextlib.suppress(Exception):
                stream.close()
