"""The agent loop: fit the context, wait out rate limits, reserve budget, call the model, settle, run tools,
checkpoint; until done or stopped.

A run ends by returning (the model ended its turn, or ``max_turns``) or by raising a typed ``StopRun``
(killed, budget, time, error). The transcript is checkpointed after every model reply and after its tool
results, so a resumed run never asks the model again for a turn it already answered.

Every ``stop_reason`` is handled: ``tool_use`` runs the tools; ``end_turn`` / ``stop_sequence`` end the run;
``max_tokens`` goes on (a tool call in a cut-off reply is never run: it is answered with an error result);
``pause_turn`` sends the conversation back as it is; ``refusal`` fails the run with the refusal as its error;
``model_context_window_exceeded`` goes on like ``max_tokens`` after clearing old tool results.

Failed calls go to the rate limiter (``orchestrator.ratelimit``): 429/529/5xx/connection errors wait and retry
(fleet-wide for 429/529), a spend limit or a wait past the limit fails the run. A call that would not fit the
context window (or a 400 saying the prompt is too long) first clears the oldest tool results
(``orchestrator.agent.context``); only a conversation that still does not fit fails, ``context window exhausted``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import anthropic

from orchestrator.agent.context import CLEAR_TARGET, clear_old_tool_results
from orchestrator.agent.model import CallInterrupted, ModelCallError, ModelClient, ModelReply
from orchestrator.agent.tools import Toolbox
from orchestrator.errors import StopRun
from orchestrator.models import Usage
from orchestrator.ratelimit import RateLimiter
from orchestrator.states import State

__all__ = ["AgentLoop", "Checkpoint", "LoopConfig", "StopRun", "StopSignal"]

log = logging.getLogger(__name__)

INPUT_MARGIN_TOKENS = 64  # per call: message framing the byte bound does not see
MIN_OUTPUT_TOKENS = 1024  # a call whose output would have to be smaller than this does not fit the window
DEFAULT_MAX_WAIT_SECONDS = 900.0
CONTINUE_PROMPT = "Your reply was cut off by the token limit. Continue where you stopped."
CUT_OFF_RESULT = ("Not run: your reply was cut off by the output token limit before this tool call was complete. "
                  "Send the call again if you still need it.")
DONE_REASONS = ("end_turn", "stop_sequence")
GO_ON_REASONS = ("max_tokens", "pause_turn", "model_context_window_exceeded")
_TOO_LONG = re.compile(r"prompt is too long|exceed context limit|context window|context length", re.IGNORECASE)
_LIMIT = re.compile(r">\s*([\d,]+)")


@dataclass
class Checkpoint:
    """Everything needed to continue a run: transcript, turns done, tokens used."""

    messages: list[dict[str, Any]]
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    last_call_tokens: int | None = None  # exact tokens of messages[:last_call_messages] (last call, or a recount)
    last_call_messages: int = 0  # transcript length those tokens cover
    last_tool: str | None = None
    stop_reason: str | None = None
    # message id -> (message, its JSON): each message is encoded once per run (messages never change in place;
    # clearing old tool results copies the ones it changes)
    _encoded: dict[int, tuple[dict[str, Any], str]] = field(default_factory=dict, repr=False, compare=False)

    def dumps(self) -> str:
        """``to_json()`` as JSON text, encoding only the messages added since the last call."""
        parts: list[str] = []
        known, seen = self._encoded, {}
        for message in self.messages:
            hit = known.get(id(message))
            if hit is None or hit[0] is not message:
                hit = (message, json.dumps(message))
            seen[id(message)] = hit
            parts.append(hit[1])
        self._encoded = seen
        rest = self.to_json()
        del rest["messages"]
        return '{"messages": [' + ", ".join(parts) + "], " + json.dumps(rest)[1:]

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
    """The budget: reserve before a call, settle after (see ``orchestrator.budget``).

    A ledger that ``carries_checkpoints`` writes the checkpoint it is given in the same step as the reservation or
    settlement (fenced; the loop then makes no write of its own for it). Otherwise the loop hands the checkpoint
    to ``on_checkpoint`` right after.
    """

    @property
    def carries_checkpoints(self) -> bool:
        """Whether ``reserve`` and ``settle`` write the checkpoint they are given."""
        ...

    def reserve(self, input_bound: int, max_output: int, checkpoint: Checkpoint | None = None) -> Reservation:
        """Set tokens aside, or raise StopRun(BUDGET_EXCEEDED) (a carried checkpoint is written either way)."""
        ...

    def settle(self, reservation: Reservation, usage: Usage, checkpoint: Checkpoint | None = None) -> None:
        """Replace the reservation with what the call really used."""
        ...


class Traffic(Protocol):
    """The rate limiter as the loop sees it (``orchestrator.ratelimit.RateLimiter``)."""

    def wait_if_paused(self, before_wait: Callable[[], None] | None = None) -> None:
        """Wait while the fleet is paused on this model (calling ``before_wait`` first if it has to wait)."""
        ...

    def before_call(self, input_tokens: int, output_tokens: int,
                    before_wait: Callable[[], None] | None = None) -> None:
        """Wait until the call can go out (calling ``before_wait`` first if it has to wait)."""
        ...

    def on_response(self, headers: Mapping[str, str]) -> None:
        """A call was accepted."""
        ...

    def on_failure(self, exc: BaseException) -> bool:
        """A call failed: wait and return True to retry, False when waiting cannot help."""
        ...

    def close(self) -> None:
        """The run ends."""
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
    stuck_repeats: int = 5  # the same tool call with the same result this many times in a row is "stuck"
    context_window: int | None = None  # input + max_tokens of one call; None: learnt from the API's refusals
    keep_tool_results: int = 3  # the most recent tool results are never cleared


def context_overflow(exc: BaseException) -> tuple[bool, int | None]:
    """Whether the API refused a call as too long for the context window, and the window it named."""
    if not isinstance(exc, anthropic.BadRequestError):
        return False, None
    text = f"{exc.api_message or ''} {exc}"
    if not _TOO_LONG.search(text):
        return False, None
    limits = _LIMIT.findall(text)
    return True, int(limits[-1].replace(",", "")) if limits else None


def refusal_reason(reply: ModelReply) -> str:
    """The error of a run the model refused: its category, explanation and text, as far as the API gave them."""
    details = reply.stop_details or {}
    parts = [f"category {details['category']}"] if details.get("category") else []
    if details.get("explanation"):
        parts.append(str(details["explanation"]))
    text = " ".join(str(b.get("text", "")) for b in reply.content if b.get("type") == "text").strip()
    if text:
        parts.append(f"reply: {text[:500]}")
    return "the model refused to continue (stop_reason refusal)" + (": " + "; ".join(parts) if parts else "")


def _bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


class AgentLoop:
    """Drives one agent's conversation until it ends or is stopped."""

    def __init__(self, model: ModelClient, toolbox: Toolbox, ledger: Ledger, stop: StopSignal,
                 config: LoopConfig, on_checkpoint: Callable[[Checkpoint], None],
                 on_progress: Callable[[Checkpoint], None] | None = None,
                 on_stuck: Callable[[str], None] | None = None, limiter: Traffic | None = None) -> None:
        self.model = model
        self.toolbox = toolbox
        self.ledger = ledger
        self.stop = stop
        self.config = config
        self.on_checkpoint = on_checkpoint
        self.on_progress = on_progress or (lambda cp: None)
        self.on_stuck = on_stuck or (lambda reason: None)
        self.limiter: Traffic = limiter or RateLimiter(None, None, model.model, stop,
                                                       max_wait=DEFAULT_MAX_WAIT_SECONDS)
        self._last_call: tuple[str, str] | None = None
        self._repeats = 0
        self._window = config.context_window
        self._squeeze: str | None = None  # "learnt" / "refused": clear on the next call even if it seems to fit
        self._cached = 0  # input tokens of the last call, cached for the next one (its prefix)
        self.cleared = 0  # tool results this loop cleared
        # A checkpoint (after a turn's tools) that goes out with the next reservation, in the same script. It is
        # written on its own first whenever anything could come between: a wait, a token count, the end of the run.
        self._unsaved: Checkpoint | None = None

    def run(self, cp: Checkpoint) -> Checkpoint:
        """Run from ``cp`` (fresh or resumed) until the model ends its turn or ``max_turns``."""
        try:
            self._run_pending_tools(cp)
            while True:
                self.stop.check()
                if cp.turns >= self.config.max_turns:
                    cp.stop_reason = "max_turns"
                    self._save(cp)
                    return cp
                reply, reservation = self._turn(cp)
                reason = self._take(cp, reply, reservation)
                if reason == "refusal":
                    raise StopRun(State.FAILED, refusal_reason(reply))
                if reason in GO_ON_REASONS:
                    continue
                if reason != "tool_use" or not self._pending_tool_uses(cp):
                    cp.stop_reason = reason
                    self._save(cp)
                    return cp
                self._run_pending_tools(cp)
        except BaseException:
            self._flush_quietly()
            raise
        finally:
            self.limiter.close()

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _save(self, cp: Checkpoint) -> None:
        """Write the checkpoint now (it supersedes one still waiting for the next reservation, which stays waiting
        if this write fails)."""
        self.on_checkpoint(cp)
        self._unsaved = None

    def _flush(self) -> None:
        """Write the checkpoint that waits for the next reservation, now (something may come between)."""
        if self._unsaved is not None:
            self._save(self._unsaved)

    def _flush_quietly(self) -> None:
        """The run is ending with an exception: write what waits, without hiding that exception."""
        try:
            self._flush()
        except Exception as exc:  # the run's own exception is the one that matters
            log.warning("could not write the last checkpoint as the run ends: %s", exc)

    def input_bound(self, cp: Checkpoint) -> int:
        """An upper bound on the next call's input tokens: exact count plus the bytes added since."""
        if cp.last_call_tokens is None:
            self._flush()
            return self.model.count_tokens(cp.messages)
        added = cp.messages[cp.last_call_messages:]
        return cp.last_call_tokens + sum(_bytes(m) for m in added) + INPUT_MARGIN_TOKENS

    # -- one call ---------------------------------------------------------------------------------------------
    def _turn(self, cp: Checkpoint) -> tuple[ModelReply, Reservation]:
        """Make the next call, waiting and retrying as the traffic rules say: the reply and its reservation, which
        ``_take`` settles together with the checkpoint of the reply."""
        while True:
            self.stop.check()
            try:
                self.limiter.wait_if_paused(before_wait=self._flush)
                input_bound, max_tokens = self._fit(cp)
                self.limiter.before_call(max(0, input_bound - self._cached), max_tokens, before_wait=self._flush)
            except ModelCallError as err:
                self._failed(err)
                continue
            if self.ledger.carries_checkpoints:
                reservation = self.ledger.reserve(input_bound, max_tokens, checkpoint=self._unsaved)
                self._unsaved = None
            else:
                self._flush()
                reservation = self.ledger.reserve(input_bound, max_tokens)
            try:
                reply = self.model.call(cp.messages, reservation.max_tokens, on_event=self.stop.check,
                                        on_response=self.limiter.on_response)
            except (ModelCallError, CallInterrupted) as exc:
                # The interrupt can land outside the SDK's own handling: a stop, nothing billed. A refused call
                # has zero usage: settling it releases the reservation.
                failure = exc if isinstance(exc, ModelCallError) else ModelCallError(exc)
                self.ledger.settle(reservation, failure.usage)
                cp.usage = cp.usage.add(failure.usage)
                self._failed(failure)
                continue
            return reply, reservation

    def _failed(self, err: ModelCallError) -> None:
        """Decide about a failed call: return to retry (after any wait), or raise the StopRun that ends the run."""
        if self.stop.is_set() or isinstance(err.cause, StopRun | CallInterrupted):
            self.stop.check()
            if isinstance(err.cause, StopRun):
                raise err.cause from None
            raise StopRun(State.KILLED, "stopped") from None
        overflow, limit = context_overflow(err.cause)
        if overflow:
            learnt = limit is not None and (self._window is None or limit < self._window)
            if learnt:
                self._window = limit
            log.warning("model refused the call as too long for its context window (%s); clearing old tool results",
                        f"limit {limit}" if limit else "limit not given")
            self._squeeze = "learnt" if learnt else "refused"
            return
        if not self.limiter.on_failure(err.cause):
            raise StopRun(State.FAILED, f"model call failed: {err}") from None

    def _take(self, cp: Checkpoint, reply: ModelReply, reservation: Reservation) -> str:
        """Add a reply to the transcript (answering any cut-off tool call), then settle its reservation and write
        the checkpoint in one step; its stop reason."""
        reason = reply.stop_reason or "end_turn"
        cp.usage = cp.usage.add(reply.usage)
        cp.turns += 1
        if reply.content:
            cp.messages.append({"role": "assistant", "content": reply.content})
        cp.last_call_tokens = reply.usage.total_tokens
        cp.last_call_messages = len(cp.messages)
        u = reply.usage
        self._cached = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens \
            if self.model.caching else 0
        if reason in ("max_tokens", "model_context_window_exceeded"):
            cut = [b for b in reply.content if b.get("type") == "tool_use"]
            if cut:  # never run a call that was cut off; answer it so the transcript stays valid
                results: list[dict[str, Any]] = [{"type": "tool_result", "tool_use_id": b["id"], "is_error": True,
                                                  "content": CUT_OFF_RESULT} for b in cut]
                cp.messages.append({"role": "user", "content": [*results, {"type": "text", "text": CONTINUE_PROMPT}]})
            else:
                cp.messages.append({"role": "user", "content": CONTINUE_PROMPT})
        if reason == "model_context_window_exceeded":  # this call filled the model's window: that is its size
            self._window = min(self._window or u.total_tokens, u.total_tokens)
            self._squeeze = "learnt"
        if reason == "refusal":
            cp.stop_reason = reason
        if self.ledger.carries_checkpoints:
            self.ledger.settle(reservation, reply.usage, checkpoint=cp)
        else:
            self.ledger.settle(reservation, reply.usage)
            self.on_checkpoint(cp)
        return reason

    # -- the context window -----------------------------------------------------------------------------------
    def _recount(self, cp: Checkpoint) -> int:
        self._flush()  # a count is a call of its own (it may wait and retry): nothing waits across it
        exact = self.model.count_tokens(cp.messages)
        cp.last_call_tokens, cp.last_call_messages = exact, len(cp.messages)
        return exact

    def _fit(self, cp: Checkpoint) -> tuple[int, int]:
        """(input bound, max_tokens) of the next call, clearing old tool results if it would not fit the window."""
        wanted = self.config.max_tokens_per_turn
        squeeze = self._squeeze  # kept until this succeeds: a count refused by a rate limit is tried again
        bound = self.input_bound(cp)
        if not squeeze and (self._window is None or bound + wanted <= self._window):
            return bound, wanted
        exact = bound if cp.last_call_tokens is None else self._recount(cp)
        self._squeeze = None
        if squeeze == "refused":  # the API said no, though we thought it fits: the window is smaller than we know
            self._window = min(self._window or exact + wanted, exact + wanted - 1)
        window = self._window if self._window is not None else exact + wanted
        if not squeeze and exact + wanted <= window:
            return exact, wanted
        goal = int(window * CLEAR_TARGET) - wanted
        cleared = 0
        while exact > goal:
            step = clear_old_tool_results(cp.messages, self.config.keep_tool_results, exact - goal)
            if not step.cleared:
                break
            cp.messages = step.messages
            cleared += step.cleared
            exact = self._recount(cp)
        if cleared:
            self.cleared += cleared
            self._cached = 0  # the prefix after the first cleared result is new to the cache
            log.info("cleared %d old tool results to fit the %d-token context window: %d input tokens now",
                     cleared, window, exact)
            self._save(cp)  # the cleared transcript is what a resumed run sends
        floor = min(wanted, MIN_OUTPUT_TOKENS)
        if exact + floor > window or (squeeze == "refused" and not cleared):
            raise StopRun(State.FAILED, f"context window exhausted: {exact:,} input tokens after clearing old tool "
                          f"results (the last {self.config.keep_tool_results} kept) leave too little room for output "
                          f"in the {window:,}-token context window")
        return exact, min(wanted, window - exact)

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
        self._unsaved = cp  # written with the next reservation (or on its own, first, if anything comes between)
