"""The model call: one streamed Messages API request through the official ``anthropic`` SDK.

The SDK's own retries are off (``max_retries=0``): the agent loop is the one retry layer, because only it knows
whether a failed call was cut on purpose (kill, killswitch) and whether the budget still allows another try.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anthropic

from orchestrator.models import Usage
from orchestrator.pricing import cost_micro_usd


@dataclass
class ModelReply:
    """What one model call produced."""

    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: Usage


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

# Cutting a call before the response headers arrive: there is no stream to close yet, and a silent server keeps
# the reader blocked. A signal to the calling thread interrupts the blocked read at once (PEP 475); the handler
# raises only while that thread is inside a call that was cancelled, so a late signal is harmless.
INTERRUPT_SIGNAL = signal.SIGUSR2
_armed: dict[int, bool] = {}


class CallInterrupted(Exception):
    """Raised in the calling thread by the interrupt signal: the call was cut on purpose."""


def _on_interrupt(signum: int, frame: Any) -> None:
    if _armed.get(threading.get_ident()):
        _armed[threading.get_ident()] = False
        raise CallInterrupted("model call cut by a stop request")


def _install_interrupt_handler() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(INTERRUPT_SIGNAL) is not _on_interrupt:
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt)
    return True


class ModelClient:
    """Streams one call at a time; ``cancel()`` from another thread cuts the call in flight."""

    def __init__(self, client: anthropic.Anthropic, model: str, system: str,
                 tools: Sequence[dict[str, Any]], user_id: str) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.tools = list(tools)
        self.user_id = user_id
        self._lock = threading.Lock()
        self._stream: Any = None
        self._cancelled = False
        self._caller: int | None = None  # thread inside call(), when it can be interrupted by a signal

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Mark this thread as inside a request that ``cancel()`` may interrupt with a signal."""
        with self._lock:
            if self._cancelled:
                raise CallInterrupted("model client was cancelled")
            if _install_interrupt_handler():
                self._caller = threading.get_ident()
        try:
            yield
        finally:
            with self._lock:
                self._stream = None
                if self._caller is not None:
                    _armed.pop(self._caller, None)
                self._caller = None

    def count_tokens(self, messages: Sequence[dict[str, Any]]) -> int:
        """Exact input tokens of a request (the API's count_tokens endpoint; free)."""
        try:
            with self._interruptible():
                result = self.client.messages.count_tokens(
                    model=self.model, system=self.system, messages=list(messages),  # type: ignore[arg-type]
                    tools=self.tools,  # type: ignore[arg-type]
                )
        except Exception as exc:
            raise ModelCallError(exc, Usage(), isinstance(exc, RETRYABLE)) from exc
        return int(result.input_tokens)

    def call(self, messages: Sequence[dict[str, Any]], max_tokens: int,
             on_event: Callable[[], None] | None = None) -> ModelReply:
        """Stream one response; raises ModelCallError carrying the usage billed so far."""
        seen = {"input": 0, "output": 0, "cw": 0, "cr": 0}
        try:
            with self._interruptible(), self.client.messages.stream(
                model=self.model, max_tokens=max_tokens, system=self.system,
                messages=list(messages), tools=self.tools,  # type: ignore[arg-type]
                metadata={"user_id": self.user_id},
            ) as stream:
                with self._lock:
                    self._stream = stream
                    if self._cancelled:
                        stream.close()
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
        return ModelReply([block_to_param(b) for b in final.content], final.stop_reason, usage)

    def cancel(self) -> None:
        """Cut the call in flight (and any later one): thread-safe."""
        with self._lock:
            self._cancelled = True
            stream = self._stream
            caller = self._caller
            if caller is not None and caller != threading.get_ident():
                _armed[caller] = True
                signal.pthread_kill(caller, INTERRUPT_SIGNAL)
        if stream is not None:
            # Closing a half-read response from another thread may raise; the reader stops anyway.
            with contextlib.suppress(Exception):
                stream.close()
