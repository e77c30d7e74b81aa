"""Fitting a long run into the model's context window: clear the oldest tool results, keep the most recent.

A cleared ``tool_result`` keeps its block (``tool_use_id``, ``is_error``) so the transcript stays valid for the API;
only its content becomes a short placeholder naming the tool, its input and how many characters went. Clearing is
deterministic and idempotent (a cleared result is never cleared again), and the cleared transcript is what the
checkpoint keeps, so a resumed run sends exactly the same prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

PLACEHOLDER_PREFIX = "[cleared to fit the context window:"
CHARS_PER_TOKEN = 4.0  # estimate of what clearing frees; the caller recounts exactly afterwards
CLEAR_TARGET = 0.65  # clear down to this share of the window (large steps: the cached prefix survives longer)


@dataclass
class Cleared:
    """What one clearing step did: the new transcript, how many results it cleared and their characters."""

    messages: list[dict[str, Any]]
    cleared: int = 0
    chars: int = 0


def content_chars(content: Any) -> int:
    """Characters of a tool result's content (a string, or a list of blocks as JSON)."""
    return len(content) if isinstance(content, str) else len(json.dumps(content, ensure_ascii=False))


def is_cleared(block: dict[str, Any]) -> bool:
    """Whether a tool_result block already holds a placeholder."""
    content = block.get("content")
    return isinstance(content, str) and content.startswith(PLACEHOLDER_PREFIX)


def placeholder(tool: str, tool_input: Any, chars: int) -> str:
    """The text that replaces a cleared result: which tool, with what input, how many characters."""
    if isinstance(tool_input, dict) and isinstance(tool_input.get("command"), str):
        what = f"{tool_input['command']} {tool_input.get('path', '')}".strip()
    else:
        what = json.dumps(tool_input, ensure_ascii=False, sort_keys=True)
    what = " ".join(what.split())
    if len(what) > 80:
        what = what[:77] + "..."
    return f"{PLACEHOLDER_PREFIX} the {tool} result of `{what}` ({chars:,} characters) was removed]"


def _tool_uses(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    uses: dict[str, dict[str, Any]] = {}
    for message in messages:
        if message.get("role") == "assistant" and isinstance(message.get("content"), list):
            for block in message["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    uses[str(block.get("id"))] = block
    return uses


def tool_result_positions(messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(message, block) indexes of every tool_result block, oldest first."""
    return [(i, j) for i, m in enumerate(messages) if m.get("role") == "user" and isinstance(m.get("content"), list)
            for j, b in enumerate(m["content"]) if isinstance(b, dict) and b.get("type") == "tool_result"]


def clear_old_tool_results(messages: list[dict[str, Any]], keep: int, free_tokens: int | None = None) -> Cleared:
    """Clear the oldest tool results (never the ``keep`` most recent) until about ``free_tokens`` are freed.

    ``free_tokens`` None clears every result it may. A result no longer than its placeholder is left alone. The
    input is not changed: changed messages are copied.
    """
    if free_tokens is not None and free_tokens <= 0:
        return Cleared(list(messages))
    positions = tool_result_positions(messages)
    candidates = positions[:max(0, len(positions) - keep)]
    uses = _tool_uses(messages)
    out = list(messages)
    copied: set[int] = set()
    report = Cleared(out)
    goal = None if free_tokens is None else math.ceil(free_tokens * CHARS_PER_TOKEN)
    for i, j in candidates:
        if goal is not None and report.chars >= goal:
            break
        block = out[i]["content"][j]
        if is_cleared(block):
            continue
        chars = content_chars(block.get("content", ""))
        use = uses.get(str(block.get("tool_use_id")), {})
        text = placeholder(str(use.get("name", "tool")), use.get("input", {}), chars)
        if chars <= len(text):
            continue
        if i not in copied:
            out[i] = dict(out[i], content=list(out[i]["content"]))
            copied.add(i)
        out[i]["content"][j] = dict(block, content=text)
        report.cleared += 1
        report.chars += chars - len(text)
    return report


def clearable(messages: list[dict[str, Any]], keep: int) -> int:
    """How many tool results clearing could still replace."""
    return clear_old_tool_results(messages, keep).cleared
