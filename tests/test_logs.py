"""Logs: every line of an agent's run carries its ids, JSON on request, credentials never printed."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from orchestrator.logs import AgentContextFilter, JsonFormatter, TextFormatter, set_agent_context
from orchestrator.redaction import forget_secrets, register_secret


def render(formatter: logging.Formatter, message: str) -> str:
    record = logging.LogRecord("orchestrator.test", logging.WARNING, __file__, 1, message, None, None)
    AgentContextFilter().filter(record)
    return formatter.format(record)


@pytest.fixture(autouse=True)
def _clear() -> None:
    set_agent_context(None, None)


def test_json_lines_carry_agent_and_task_ids() -> None:
    set_agent_context("a1", "T-9")
    doc = json.loads(render(JsonFormatter(), "turn 3 done"))
    assert doc["agent_id"] == "a1" and doc["task_id"] == "T-9" and doc["message"] == "turn 3 done"
    set_agent_context(None, None)
    assert "agent_id" not in json.loads(render(JsonFormatter(), "idle"))


def test_text_lines_name_the_agent() -> None:
    set_agent_context("a2", "T-1")
    assert render(TextFormatter("%(message)s"), "hello").endswith("[agent=a2 task=T-1]")


def test_credentials_in_urls_are_redacted() -> None:
    for fmt in (JsonFormatter(), TextFormatter("%(message)s")):
        line = render(fmt, "push to https://bot:ghp_secret@github.com/o/r.git failed; broker redis://:pw1@vk:6379/0")
        assert "ghp_secret" not in line and "pw1" not in line and "github.com/o/r.git" in line


def _raise_with_secrets() -> None:
    url = "redis://:p#a/s@s@valkey:6379/0"
    token = "registered-token-123"
    raise RuntimeError(f"cannot reach {url} with {token}")


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter("%(message)s")], ids=["json", "text"])
def test_tracebacks_and_stacks_are_redacted(formatter: logging.Formatter) -> None:
    forget_secrets()
    register_secret("registered-token-123")
    try:
        _raise_with_secrets()
    except RuntimeError:
        record = logging.LogRecord("orchestrator.test", logging.ERROR, __file__, 1,
                                   "failed for https://bot:ghp_tok@github.com/o/r", None, sys.exc_info(),
                                   sinfo="Stack (most recent call last):\n  token registered-token-123 here")
    try:
        line = formatter.format(record)
    finally:
        forget_secrets()
    for secret in ("p#a", "a/s@s", "registered-token-123", "ghp_tok"):
        assert secret not in line, line
    assert "RuntimeError: cannot reach redis://***@valkey:6379/0 with ***" in line  # the traceback is still there
    assert "_raise_with_secrets" in line and "token *** here" in line
    if isinstance(formatter, JsonFormatter):
        doc = json.loads(line)
        assert "Traceback" in doc["exc"] and "***" in doc["stack"] and doc["message"].endswith("***@github.com/o/r")
