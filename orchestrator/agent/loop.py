"""The agent loop: reserve budget, call the model, settle, run tools, checkpoint; until done or stopped.

A run ends by returning (the model ended its turn, or ``max_turns``) or by raising a typed ``StopRun``
(killed, budget, time, error). The transcript is checkpointed after every model reply and after its tool
results, so a resumed run never asks the model again for a turn it already answered.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.agent.model import CallInterrupted, ModelCallError, ModelClient
from orchestrator.agent.tools import Toolbox
from orchestrator.models import State, Usage

INPUT_MARGIN_TOKENS = 64  # per call: message framing the byte bound does not see
CONTINUE_PROMPT = "Your reply was cut off by the token limit. Continue where you stopped."


class StopRun(Exception):
    """The run must end now with ``status``; its work so far is kept."""

    def __init__(self, status: State, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Checkpoint:
    """Everything needed to continue a run: transcript, turns done, tokens used."""

    messages: list[dict[str, Any]]
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    last_call_tokens: int | None = None  # exact tokens of the last call (input side + output)
    last_call_messages: int = 0  # transcript length right after the last reply
    last_tool: str | None = None
    stop_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "messages": self.messages, "turns": self.turns, "usage": self.usage.model_dump(),
            "last_call_tokens": self.last_call_tokens, "last_call_messages": self.last_call_messages,
            "last_tool": self.last_tool, "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        """Inverse of ``to_json``."""
        return cls(
            messages=data["messages"], turns=data.get("turns", 0), usage=Usage(**data.get("usage", {})),
            last_call_tokens=data.get("last_call_tokens"), last_call_messages=data.get("last_call_messages", 0),
            last_tool=data.get("last_tool"), stop_reason=data.get("stop_reason"),
        )


class Reservation(Protocol):
    """Tokens set aside for one call."""

    @property
    def max_tokens(self) -> int:
        """The output limit the call may use."""
        ...


class Ledger(Protocol):
    """The budget: reserve before a call, settle after (see ``orchestrator.budget``)."""

    def reserve(self, input_bound: int, max_output: int) -> Reservation:
        """Set tokens aside, or raise StopRun(BUDGET_EXCEEDED)."""
        ...

    def settle(self, reservation: Reservation, usage: Usage) -> None:
        """Replace the reservation with what the call really used."""
        ...


class StopSignal:
    """A thread-safe stop request with the status it ends the run in."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.status: State | None = None
        self.reason: str = ""

    def request(self, status: State, reason: str) -> bool:
        """Ask the run to stop; the first request wins. Returns whether this one was first."""
        if self._event.is_set():
            return False
        self.status, self.reason = status, reason
        self._event.set()
        return True

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking at once on a stop request."""
        return self._event.wait(seconds)

    def check(self) -> None:
        """Raise StopRun if a stop was requested."""
        if self._event.is_set():
            raise StopRun(self.status or State.KILLED, self.reason)


@dataclass
class LoopConfig:
    """Limits of one run."""

    max_turns: int
    max_tokens_per_turn: int
    retries: int = 3
    retry_backoff_seconds: float = 1.0
    stuck_repeats: int = 5  # the same tool call with the same result this many times in a row is "stuck"


def _bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


class AgentLoop:
    """Drives one agent's conversation until it ends or is stopped."""

    def __init__(self, model: ModelClient, toolbox: Toolbox, ledger: Ledger, stop: StopSignal,
                 config: LoopConfig, on_checkpoint: Callable[[Checkpoint], None],
                 on_progress: Callable[[Checkpoint], None] | None = None,
                 on_stuck: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.toolbox = toolbox
        self.ledger = ledger
        self.stop = stop
        self.config = config
        self.on_checkpoint = on_checkpoint
        self.on_progress = on_progress or (lambda cp: None)
        self.on_stuck = on_stuck or (lambda reason: None)
        self._last_call: tuple[str, str] | None = None
        self._repeats = 0

    def run(self, cp: Checkpoint) -> Checkpoint:
        """Run from ``cp`` (fresh or resumed) until the model ends its turn or ``max_turns``."""
        self._run_pending_tools(cp)
        while True:
            self.stop.check()
            if cp.turns >= self.config.max_turns:
                cp.stop_reason = "max_turns"
                return cp
            reply_stop = self._turn(cp)
            if reply_stop == "max_tokens" and not self._pending_tool_uses(cp):
                cp.messages.append({"role": "user", "content": CONTINUE_PROMPT})
            if reply_stop not in ("tool_use", "max_tokens"):
                cp.stop_reason = reply_stop or "end_turn"
                self.on_checkpoint(cp)
                return cp
            self._run_pending_tools(cp)

    def input_bound(self, cp: Checkpoint) -> int:
        """An upper bound on the next call's input tokens: exact count plus the bytes added since."""
        if cp.last_call_tokens is None:
            return self.model.count_tokens(cp.messages)
        added = cp.messages[cp.last_call_messages:]
        return cp.last_call_tokens + sum(_bytes(m) for m in added) + INPUT_MARGIN_TOKENS

    def _stopped_or_failed(self, err: ModelCallError, attempt: int) -> None:
        """Raise the right StopRun for a failed call unless it may be retried."""
        if self.stop.is_set() or isinstance(err.cause, StopRun | CallInterrupted):
            self.stop.check()
            raise StopRun(State.KILLED, "stopped") from None
        if not err.retryable or attempt > self.config.retries:
            raise StopRun(State.FAILED, f"model call failed: {err}") from None

    def _turn(self, cp: Checkpoint) -> str | None:
        attempt = 0
        while True:
            self.stop.check()
            try:
                input_bound = self.input_bound(cp)
            except ModelCallError as err:
                attempt += 1
                self._stopped_or_failed(err, attempt)
                self.stop.wait(self.config.retry_backoff_seconds * 2 ** (attempt - 1))
                continue
            reservation = self.ledger.reserve(input_bound, self.config.max_tokens_per_turn)
            try:
                reply = self.model.call(cp.messages, reservation.max_tokens, on_event=self.stop.check)
            except (ModelCallError, CallInterrupted) as exc:
                # The interrupt can land outside the SDK's own handling: a stop, nothing billed.
                failure = exc if isinstance(exc, ModelCallError) else ModelCallError(exc)
                self.ledger.settle(reservation, failure.usage)
                cp.usage = cp.usage.add(failure.usage)
                attempt += 1
                self._stopped_or_failed(failure, attempt)
                self.stop.wait(self.config.retry_backoff_seconds * 2 ** (attempt - 1))
                continue
            self.ledger.settle(reservation, reply.usage)
            break
        cp.usage = cp.usage.add(reply.usage)
        cp.turns += 1
        cp.messages.append({"role": "assistant", "content": reply.content})
        cp.last_call_tokens = reply.usage.total_tokens
        cp.last_call_messages = len(cp.messages)
        self.on_checkpoint(cp)
        return reply.stop_reason

    @staticmethod
    def _pending_tool_uses(cp: Checkpoint) -> list[dict[str, Any]]:
        if not cp.messages or cp.messages[-1]["role"] != "assistant":
            return []
        content = cp.messages[-1]["content"]
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]

    def _watch_for_loops(self, block: dict[str, Any], output: str) -> None:
        """Report an agent that repeats the same tool call with the same result (it may raise StopRun)."""
        signature = (f"{block['name']}:{json.dumps(block.get('input'), sort_keys=True)}", output)
        self._repeats = self._repeats + 1 if signature == self._last_call else 1
        self._last_call = signature
        if self._repeats == self.config.stuck_repeats:
            self.on_stuck(f"the same {block['name']} call returned the same result {self._repeats} times in a row")

    def _run_pending_tools(self, cp: Checkpoint) -> None:
        uses = self._pending_tool_uses(cp)
        if not uses:
            return
        results = []
        for block in uses:
            self.stop.check()
            cp.last_tool = f"{block['name']}: {json.dumps(block.get('input'))[:200]}"
            self.on_progress(cp)
            result = self.toolbox.run(block["name"], block.get("input") or {})
            results.append(result.as_block(block["id"]))
            self._watch_for_loops(block, result.content)
        self.stop.check()  # a tool cut by a stop does not count as done: it runs again on resume
        cp.messages.append({"role": "user", "content": results})
        self.on_checkpoint(cp)
