"""Clearing old tool results to fit the context window: what goes, what stays, and the placeholders."""

from __future__ import annotations

import copy
import json
from typing import Any

from orchestrator.agent.context import PLACEHOLDER_PREFIX, clear_old_tool_results, clearable, is_cleared
from orchestrator.agent.model import request_messages


def transcript(outputs: list[str]) -> list[dict[str, Any]]:
    """A prompt, then one bash call per output and its result."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "do the work"}]
    for i, out in enumerate(outputs):
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": f"step {i}"},
            {"type": "tool_use", "id": f"toolu_{i}", "name": "bash", "input": {"command": f"cat big-{i}.log"}}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": out, "is_error": i == 1}]})
    return messages


def results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for m in messages if m["role"] == "user" and isinstance(m["content"], list) for b in m["content"]]


def test_oldest_results_go_first_and_the_most_recent_stay() -> None:
    before = transcript([f"{i}" * 4000 for i in range(6)])
    original = copy.deepcopy(before)
    out = clear_old_tool_results(before, keep=3)
    assert before == original  # the input is not changed
    blocks = results(out.messages)
    assert [is_cleared(b) for b in blocks] == [True, True, True, False, False, False]
    assert out.cleared == 3 and out.chars == sum(4000 - len(b["content"]) for b in blocks[:3])
    for i, block in enumerate(blocks[:3]):
        assert block["content"].startswith(PLACEHOLDER_PREFIX)
        assert "bash" in block["content"] and f"cat big-{i}.log" in block["content"] and "4,000 characters" in \
            block["content"]
        assert block["tool_use_id"] == f"toolu_{i}" and block["is_error"] == (i == 1)  # the block stays valid
    assert [b["content"] for b in blocks[3:]] == ["3" * 4000, "4" * 4000, "5" * 4000]
    assert out.messages[1:] != before[1:] and out.messages[0] is before[0]


def test_only_as_much_as_asked_is_cleared() -> None:
    messages = transcript(["a" * 4000, "b" * 4000, "c" * 4000, "d" * 4000, "e" * 4000])
    out = clear_old_tool_results(messages, keep=1, free_tokens=900)  # ~3,600 characters: one result is enough
    assert [is_cleared(b) for b in results(out.messages)] == [True, False, False, False, False]
    out = clear_old_tool_results(messages, keep=1, free_tokens=1100)  # a little more: two
    assert [is_cleared(b) for b in results(out.messages)] == [True, True, False, False, False]
    assert clear_old_tool_results(messages, keep=1, free_tokens=0).cleared == 0


def test_clearing_is_idempotent() -> None:
    once = clear_old_tool_results(transcript(["x" * 3000] * 5), keep=2).messages
    twice = clear_old_tool_results(once, keep=2)
    assert twice.cleared == 0 and twice.messages == once
    assert clearable(once, keep=2) == 0 and clearable(once, keep=0) == 2


def test_small_results_and_list_content() -> None:
    messages = transcript(["ok", "y" * 5000, "z" * 5000])
    messages[6]["content"][0]["content"] = [{"type": "text", "text": "w" * 5000}]  # a result given as blocks
    out = clear_old_tool_results(messages, keep=0)
    blocks = results(out.messages)
    assert blocks[0]["content"] == "ok"  # shorter than any placeholder: clearing it frees nothing
    assert is_cleared(blocks[1]) and is_cleared(blocks[2])
    assert f"{len(json.dumps([{'type': 'text', 'text': 'w' * 5000}])):,} characters" in blocks[2]["content"]


def test_breakpoints_stay_out_of_the_transcript() -> None:
    messages = transcript(["a" * 100, "b" * 100])
    original = copy.deepcopy(messages)
    sent = request_messages(messages)
    assert messages == original  # marks only in the request
    marked = [(i, j) for i, m in enumerate(sent) for j, b in enumerate(m["content"]) if "cache_control" in b]
    # the end of this request, and the end of the previous one (just before the latest reply)
    assert marked == [(2, 0), (4, 0)]
    assert sent[0]["content"] == [{"type": "text", "text": "do the work"}]  # strings sent as blocks, always
    assert all("cache_control" not in b for b in request_messages(messages, caching=False)[-1]["content"])


def test_context_window_per_model_and_setting() -> None:
    from orchestrator.pricing import context_window_for

    assert context_window_for("claude-sonnet-5-5") == 200_000 == context_window_for("claude-haiku-4-5-20251001")
    assert context_window_for("claude-sonnet-5-5", 8_000) == 8_000  # ORCHESTRATOR_CONTEXT_WINDOW_TOKENS wins
