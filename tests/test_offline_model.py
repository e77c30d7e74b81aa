"""Tests for the offline Anthropic Messages API stand-in, driven through the real SDK over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import anthropic
import pytest
from anthropic.types import MessageParam

from orchestrator.testing.offline_model import (
    BUILTIN_SCRIPTS,
    DONE_TEXT,
    EDITOR_TOOL,
    RATE_LIMIT_HEADERS,
    OfflineModel,
    RateLimits,
    Script,
    Turn,
    bash,
    edit,
    estimate_input_tokens,
    estimate_output_tokens,
    load_scripts,
    text_turn,
    tool_turn,
)

MODEL = "claude-offline-test"
REPO_ROOT = Path(__file__).resolve().parents[1]
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 20

SCRIPTS = {
    "hello": Script([text_turn("Hello from the offline model.")]),
    "forever": Script([text_turn("first"), bash("sleep 1")], repeat_last=True),
    "two": Script([text_turn("one"), text_turn("two")]),
    "long": Script([tool_turn("bash", {"command": "ls"}, text=LONG_TEXT)]),
    "slow": Script([Turn(content=[{"type": "text", "text": LONG_TEXT}], chunk_delay=0.3)]),
    "delayed": Script([Turn(content=[{"type": "text", "text": "late"}], delay=0.5)]),
    "stuck": Script([Turn(content=[{"type": "text", "text": "never"}], delay=30.0)]),
    "custom_usage": Script([Turn(content=[{"type": "text", "text": "x"}], usage={"cache_read_input_tokens": 7})]),
    "stops": Script(
        [
            Turn(content=[{"type": "text", "text": "Searching..."}], stop_reason="pause_turn"),
            Turn(
                content=[
                    {"type": "text", "text": "Let me run"},
                    {"type": "tool_use", "name": "bash", "input": {"command": "pyt"}},
                ],
                stop_reason="max_tokens",
            ),
            bash("python -m pytest -q"),
            Turn(content=[], stop_reason="refusal"),
        ]
    ),
}
EPHEMERAL: dict[str, Any] = {"type": "ephemeral"}
BIG_SYSTEM = "You are a careful engineer who writes small, well-tested changes. " * 100  # ~1600 tokens


@pytest.fixture
def model() -> Iterator[OfflineModel]:
    with OfflineModel(SCRIPTS) as m:
        yield m


@pytest.fixture
def client(model: OfflineModel) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=model.url, api_key="offline", max_retries=0) as c:
        yield c


def user(text: str) -> MessageParam:
    return {"role": "user", "content": text}


def conversation(first: str, assistant_turns: int) -> list[MessageParam]:
    messages = [user(first)]
    for i in range(assistant_turns):
        messages += [{"role": "assistant", "content": f"reply {i}"}, user(f"next {i}")]
    return messages


def post_raw(url: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except HTTPError as err:
        with err:
            return err.code, err.read()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in body.decode().split("\n\n"):
        if not frame.strip():
            continue
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == event_line.removeprefix("event: ")
        events.append((data["type"], data))
    return events


def wait_until(predicate: Any, timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# ----------------------------------------------------------------------------------------- basics


def test_non_streaming_call(model: OfflineModel, client: anthropic.Anthropic) -> None:
    messages = [user("please fix the failing test")]
    message = client.messages.create(model=MODEL, max_tokens=1024, messages=messages, metadata={"user_id": "agent-1"})
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    [block] = message.content
    assert block.type == "tool_use"
    assert block.id.startswith("toolu_") and block.name == "bash"
    assert block.input == {"command": "python -m pytest -q"}
    assert message.usage.input_tokens == estimate_input_tokens({"messages": messages})
    assert message.usage.output_tokens == estimate_output_tokens([block.model_dump(exclude_none=True)])
    assert message.usage.cache_creation_input_tokens == 0 and message.usage.cache_read_input_tokens == 0

    [call] = model.calls()
    assert (call.agent, call.script, call.turn, call.stream) == ("agent-1", "fix_failing_test", 0, False)
    assert (call.model, call.max_tokens, call.status) == (MODEL, 1024, "completed")
    assert call.finished_at is not None and call.finished_at >= call.started_at


def test_streaming_final_message_has_parsed_tool_input(model: OfflineModel, client: anthropic.Anthropic) -> None:
    # Two assistant messages so far -> third turn of fix_failing_test: the str_replace edit.
    with client.messages.stream(model=MODEL, max_tokens=1024, messages=conversation("fix it", 2)) as stream:
        event_types = [event.type for event in stream]
        final = stream.get_final_message()
    assert event_types[0] == "message_start" and event_types[-1] == "message_stop"
    assert "input_json" in event_types and "message_delta" in event_types
    assert final.stop_reason == "tool_use"
    [block] = final.content
    assert block.type == "tool_use" and block.name == EDITOR_TOOL and block.id.startswith("toolu_")
    assert block.input == {
        "command": "str_replace",
        "path": "calc.py",
        "old_str": "return a - b",
        "new_str": "return a + b",
    }
    assert final.usage.output_tokens > 1
    [call] = model.calls()
    assert call.stream and call.turn == 2 and call.status == "completed"
    assert model.open_streams() == 0


def test_streaming_text_in_chunks(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=1024, messages=[user("[[script:hello]]")]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == "Hello from the offline model."
    assert final.content[0].type == "text" and final.content[0].text == "Hello from the offline model."
    assert final.stop_reason == "end_turn"


def test_raw_sse_wire_format_with_pings(model: OfflineModel) -> None:
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": [user("[[script:delayed]]")]}
    status, raw = post_raw(model.url + "/v1/messages", json.dumps(body).encode())
    assert status == 200
    events = sse_events(raw)
    types = [t for t, _ in events]
    assert types[0] == "message_start"
    assert "ping" in types
    without_pings = [t for t in types if t != "ping"]
    assert without_pings[0:2] == ["message_start", "content_block_start"]
    assert without_pings[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["stop_sequence"] is None
    assert start["usage"] == {
        "input_tokens": estimate_input_tokens(body),
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    delta = next(d for t, d in events if t == "message_delta")
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert set(delta["usage"]) == {"output_tokens"}


# ------------------------------------------------------------------------------------- scripting


def test_turn_index_is_the_number_of_assistant_messages(model: OfflineModel, client: anthropic.Anthropic) -> None:
    messages: list[Any] = [user("fix the failing test")]
    seen: list[str] = []
    for _ in range(5):
        message = client.messages.create(model=MODEL, max_tokens=1024, messages=messages)
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]})
        tool_uses = [b for b in message.content if b.type == "tool_use"]
        if not tool_uses:
            seen.append("text")
            break
        seen.append(tool_uses[0].name)
        results = [{"type": "tool_result", "tool_use_id": t.id, "content": "ok"} for t in tool_uses]
        messages.append({"role": "user", "content": results})
    assert seen == ["bash", EDITOR_TOOL, EDITOR_TOOL, "bash", "text"]
    assert [c.turn for c in model.calls()] == [0, 1, 2, 3, 4]

    # Stateless: replaying a conversation prefix serves the same turn again.
    again = client.messages.create(model=MODEL, max_tokens=1024, messages=conversation("fix", 1))
    assert again.content[0].type == "tool_use" and again.content[0].input == {"command": "view", "path": "calc.py"}

    # Past the end of a non-repeating script: "Done."
    done = client.messages.create(model=MODEL, max_tokens=1024, messages=conversation("fix", 7))
    assert done.stop_reason == "end_turn"
    assert done.content[0].type == "text" and done.content[0].text == DONE_TEXT


def test_script_marker_selection(model: OfflineModel, client: anthropic.Anthropic) -> None:
    as_string = client.messages.create(model=MODEL, max_tokens=100, messages=[user("Say hi. [[script:hello]] thanks")])
    assert as_string.content[0].type == "text"
    assert as_string.content[0].text == "Hello from the offline model."

    as_blocks = client.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "task"}, {"type": "text", "text": "[[script:two]]"}],
            },
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "and? [[script:hello]]"},  # only the first user message counts
        ],
    )
    assert as_blocks.content[0].type == "text" and as_blocks.content[0].text == "two"

    default = client.messages.create(model=MODEL, max_tokens=100, messages=[user("no marker")])
    assert default.content[0].type == "tool_use"
    assert [c.script for c in model.calls()] == ["hello", "two", "fix_failing_test"]


def test_add_script_and_default_script() -> None:
    with (
        OfflineModel(default_script="mine") as model,
        anthropic.Anthropic(base_url=model.url, api_key="offline", max_retries=0) as client,
    ):
        model.add_script("mine", Script([edit(command="view", path="README.md")]))
        message = client.messages.create(model=MODEL, max_tokens=100, messages=[user("go")])
        assert message.content[0].type == "tool_use"
        assert message.content[0].name == EDITOR_TOOL
        assert message.content[0].input == {"command": "view", "path": "README.md"}


def test_repeat_last(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model=MODEL, max_tokens=100, messages=conversation("[[script:forever]]", 0))
    assert first.content[0].type == "text" and first.content[0].text == "first"
    for turns in (1, 2, 10):
        message = client.messages.create(
            model=MODEL, max_tokens=100, messages=conversation("[[script:forever]]", turns)
        )
        assert message.stop_reason == "tool_use"
        assert message.content[0].type == "tool_use" and message.content[0].input == {"command": "sleep 1"}


def test_unknown_script_is_a_bad_request(model: OfflineModel, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        client.messages.create(model=MODEL, max_tokens=100, messages=[user("[[script:no_such_script]]")])
    assert "no_such_script" in str(excinfo.value)
    body = excinfo.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    [call] = model.calls()
    assert call.status == "error" and call.script == "no_such_script"
    assert call.usage["total_tokens"] == 0


# ----------------------------------------------------------------------------------------- usage


def test_max_tokens_truncates(model: OfflineModel, client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=5, messages=[user("[[script:long]]")])
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 5
    assert all(b.type == "text" for b in message.content)
    [block] = message.content
    assert block.type == "text"
    assert 0 < len(block.text) <= 20 and LONG_TEXT.startswith(block.text)

    with client.messages.stream(model=MODEL, max_tokens=5, messages=[user("[[script:long]]")]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    assert [b.type for b in final.content] == ["text"]

    # With enough budget the full turn is served.
    full = client.messages.create(model=MODEL, max_tokens=4096, messages=[user("[[script:long]]")])
    assert full.stop_reason == "tool_use" and [b.type for b in full.content] == ["text", "tool_use"]
    assert [c.max_tokens for c in model.calls()] == [5, 5, 4096]


def test_count_tokens_matches_input_usage(client: anthropic.Anthropic) -> None:
    messages = conversation("count me", 2)
    system = "You are a careful engineer."
    tools: list[Any] = [{"name": "bash", "description": "Run a command", "input_schema": {"type": "object"}}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, system=system, tools=tools)
    assert counted.input_tokens == estimate_input_tokens({"system": system, "messages": messages, "tools": tools})
    message = client.messages.create(model=MODEL, max_tokens=100, messages=messages, system=system, tools=tools)
    assert message.usage.input_tokens == counted.input_tokens


def test_usage_override(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=100, messages=[user("[[script:custom_usage]]")])
    assert message.usage.cache_read_input_tokens == 7


def test_usage_for_sums_sdk_reported_usage(model: OfflineModel, client: anthropic.Anthropic) -> None:
    reported: dict[str, list[int]] = {"a": [0, 0], "b": [0, 0]}
    for i, agent in enumerate(["a", "b", "a", "b", "a"]):
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 1024,
            "messages": conversation("fix it", i),
            "metadata": {"user_id": agent},
        }
        if i % 2:
            with client.messages.stream(**kwargs) as stream:
                usage = stream.get_final_message().usage
        else:
            usage = client.messages.create(**kwargs).usage
        reported[agent][0] += usage.input_tokens
        reported[agent][1] += usage.output_tokens

    for agent, (inp, out) in reported.items():
        summed = model.usage_for(agent)
        assert summed == {
            "input_tokens": inp,
            "output_tokens": out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "total_tokens": inp + out,
        }
    everything = model.usage_for()
    assert everything["total_tokens"] == sum(inp + out for inp, out in reported.values())
    assert model.usage_for("nobody")["total_tokens"] == 0

    model.reset()
    assert model.calls() == [] and model.usage_for()["total_tokens"] == 0


# ---------------------------------------------------------------------------------- connections


def test_client_closing_a_slow_stream(model: OfflineModel, client: anthropic.Anthropic) -> None:
    messages = [user("[[script:slow]]")]
    with client.messages.stream(
        model=MODEL, max_tokens=4096, messages=messages, metadata={"user_id": "quitter"}
    ) as stream:
        for event in stream:
            if event.type == "text":
                break
        assert model.open_streams() == 1
    closed_at = time.monotonic()
    assert wait_until(lambda: model.open_streams() == 0, timeout=1.0)
    assert time.monotonic() - closed_at < 1.0
    [call] = model.calls()
    assert call.status == "client_closed" and call.finished_at is not None
    # Billed from message_start on: the input tokens and the one output token reported there.
    assert model.usage_for("quitter") == {
        "input_tokens": estimate_input_tokens({"messages": messages}),
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "total_tokens": estimate_input_tokens({"messages": messages}) + 1,
    }


def test_stop_closes_open_streams() -> None:
    model = OfflineModel(SCRIPTS).start()
    errors: list[BaseException] = []

    def consume() -> None:
        with anthropic.Anthropic(base_url=model.url, api_key="offline", max_retries=0) as client:
            try:
                with client.messages.stream(model=MODEL, max_tokens=100, messages=[user("[[script:stuck]]")]) as stream:
                    stream.get_final_message()
            except Exception as exc:
                errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        assert wait_until(lambda: model.open_streams() == 1, timeout=5.0)
    finally:
        started = time.monotonic()
        model.stop()
        thread.join(5.0)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0
    assert errors, "the client should see its stream end abnormally"
    assert model.open_streams() == 0
    [call] = model.calls()
    assert call.status == "error"


def test_latency() -> None:
    with (
        OfflineModel(SCRIPTS, latency=0.2) as model,
        anthropic.Anthropic(base_url=model.url, api_key="offline", max_retries=0) as client,
    ):
        started = time.monotonic()
        client.messages.create(model=MODEL, max_tokens=100, messages=[user("[[script:hello]]")])
        assert time.monotonic() - started >= 0.2


def test_not_found_and_malformed_json(model: OfflineModel) -> None:
    status, raw = post_raw(model.url + "/v1/nothing", b"{}")
    assert status == 404
    assert json.loads(raw)["error"]["type"] == "not_found_error"
    assert json.loads(raw)["type"] == "error"

    status, raw = post_raw(model.url + "/v1/messages", b"{not json")
    assert status == 400
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    [call] = model.calls()
    assert call.status == "error"

    assert get_json(model.url + "/_offline/health") == {"ok": True}
    [logged] = get_json(model.url + "/_offline/calls")
    assert logged["status"] == "error"


def test_not_found_through_sdk(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-offline-test")


# --------------------------------------------------------------------------------------- scripts


def test_turn_defaults_and_validation() -> None:
    assert text_turn("x").resolved_stop_reason == "end_turn"
    assert bash("ls").resolved_stop_reason == "tool_use"
    assert bash("ls").content == [{"type": "tool_use", "name": "bash", "input": {"command": "ls"}}]
    assert tool_turn("t", {"a": 1}, text="why").content[0] == {"type": "text", "text": "why"}
    assert edit(command="view", path="a.py").content[0]["name"] == EDITOR_TOOL
    with pytest.raises(ValueError):
        Turn(content=[{"type": "image"}])
    with pytest.raises(ValueError):
        Turn(content=[{"type": "tool_use", "input": {}}])
    with pytest.raises(ValueError):
        Turn(content=[], usage={"bogus": 1})
    [first, *_, last] = BUILTIN_SCRIPTS["fix_failing_test"].turns
    assert first == bash("python -m pytest -q")
    assert last == text_turn("The failing test is fixed: add() now adds.")


def test_script_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "scripts.json"
    path.write_text(json.dumps({name: script.to_dict() for name, script in SCRIPTS.items()}))
    assert load_scripts(path) == SCRIPTS


def test_separate_process_mode(tmp_path: Path) -> None:
    script_file = tmp_path / "scripts.json"
    script_file.write_text(json.dumps({"greet": {"turns": [{"content": [{"type": "text", "text": "hi"}]}]}}))
    command = [
        sys.executable,
        "-m",
        "orchestrator.testing.offline_model",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--script-file",
        str(script_file),
        "--default-script",
        "greet",
    ]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("offline model listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            assert get_json(url + "/_offline/health") == {"ok": True}
            with anthropic.Anthropic(base_url=url, api_key="offline", max_retries=0) as client:
                message = client.messages.create(
                    model=MODEL, max_tokens=100, messages=[user("hello")], metadata={"user_id": "remote"}
                )
            assert message.content[0].type == "text" and message.content[0].text == "hi"
            [call] = get_json(url + "/_offline/calls")
            assert (call["agent"], call["script"], call["status"]) == ("remote", "greet", "completed")
            assert call["usage"]["total_tokens"] == message.usage.input_tokens + message.usage.output_tokens
        finally:
            proc.terminate()
            returncode = proc.wait(timeout=10)
    assert returncode == 0


# ----------------------------------------------------------------------- rate limits and overload


def test_rate_limit_window_429(model: OfflineModel, client: anthropic.Anthropic) -> None:
    window_ends = time.monotonic() + 1.5
    model.rate_limit_window(1.5, retry_after=2)
    for _ in range(2):
        with pytest.raises(anthropic.RateLimitError) as excinfo:
            client.messages.create(model=MODEL, max_tokens=100, messages=[user("[[script:hello]]")])
    error = excinfo.value
    assert error.status_code == 429 and error.type == "rate_limit_error"
    assert error.response.headers["retry-after"] == "2"
    assert error.response.headers["x-should-retry"] == "true"
    assert error.request_id is not None and error.request_id.startswith("req_")
    assert isinstance(error.body, dict) and error.body["request_id"] == error.request_id
    assert all(name in error.response.headers for name in RATE_LIMIT_HEADERS)
    with (
        pytest.raises(anthropic.RateLimitError),  # streams are refused before the stream starts
        client.messages.stream(model=MODEL, max_tokens=100, messages=[user("[[script:hello]]")]) as stream,
    ):
        stream.get_final_message()
    # count_tokens is not limited by default.
    assert client.messages.count_tokens(model=MODEL, messages=[user("hi")]).input_tokens > 0

    time.sleep(max(0.0, window_ends + 0.1 - time.monotonic()))  # the window is over
    message = client.messages.create(model=MODEL, max_tokens=100, messages=[user("[[script:hello]]")])
    assert message.content[0].type == "text"

    assert [c.status for c in model.calls()] == ["rejected"] * 3 + ["completed"]
    assert model.rejection_counts() == {429: 3}
    rejected = model.rejections()
    assert len(rejected) == 3 and model.rejections("other-model") == []
    assert all(c.usage["total_tokens"] == 0 and c.http_status == 429 and c.retry_after == 2.0 for c in rejected)
    assert all(c.error_type == "rate_limit_error" and c.finished_at is not None for c in rejected)
    assert model.calls()[-1].http_status == 200
    assert model.usage_for()["total_tokens"] == message.usage.input_tokens + message.usage.output_tokens


def test_overload_and_server_error_windows(model: OfflineModel, client: anthropic.Anthropic) -> None:
    def ask() -> anthropic.types.Message:
        return client.messages.create(model=MODEL, max_tokens=100, messages=[user("[[script:hello]]")])

    # Windows queue: each ends after one refusal here, the oldest in force answers first.
    model.rate_limit_window(30, status=529, retry_after=None, calls=1)
    model.rate_limit_window(30, status=500, retry_after=1.5, calls=1)
    model.rate_limit_window(30, status=503, calls=1)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        ask()
    assert isinstance(overloaded.value, anthropic.InternalServerError)
    assert overloaded.value.type == "overloaded_error" and overloaded.value.api_message == "Overloaded"
    assert "retry-after" not in overloaded.value.response.headers
    with pytest.raises(anthropic.InternalServerError) as server_error:
        ask()
    assert server_error.value.status_code == 500 and server_error.value.type == "api_error"
    assert server_error.value.response.headers["retry-after"] == "1.5"
    with pytest.raises(anthropic.ServiceUnavailableError) as unavailable:
        ask()
    assert unavailable.value.type == "api_error" and unavailable.value.response.headers["retry-after"] == "5"
    assert ask().content[0].type == "text"
    assert model.rejection_counts() == {529: 1, 500: 1, 503: 1}

    # Only for one model; a window that has not started yet; clear_rate_limits().
    model.rate_limit_window(30, status=529, model="claude-other")
    model.rate_limit_window(30, delay=30)
    assert ask().content[0].type == "text"
    with pytest.raises(anthropic.OverloadedError):
        client.messages.create(model="claude-other", max_tokens=100, messages=[user("[[script:hello]]")])
    assert [c.model for c in model.rejections()][-1] == "claude-other"
    model.clear_rate_limits()
    client.messages.create(model="claude-other", max_tokens=100, messages=[user("[[script:hello]]")])


def test_window_error_code_and_count_tokens(model: OfflineModel, client: anthropic.Anthropic) -> None:
    model.rate_limit_window(30, error_code="enforced_spend_limit_reached", count_tokens=True, retry_after=None)
    with pytest.raises(anthropic.RateLimitError) as excinfo:
        client.messages.create(model=MODEL, max_tokens=100, messages=[user("hi")])
    assert excinfo.value.error_code == "enforced_spend_limit_reached"
    assert type(excinfo.value).__name__ == "EnforcedSpendLimitReachedError"
    assert "x-should-retry" not in excinfo.value.response.headers
    with pytest.raises(anthropic.RateLimitError):
        client.messages.count_tokens(model=MODEL, messages=[user("hi")])
    assert model.rejection_counts("count_tokens") == {429: 1}
    assert model.rejection_counts() == {429: 1}
    model.reset()
    assert model.rejection_counts("count_tokens") == {} and model.rejection_counts() == {}

    with pytest.raises(ValueError):
        model.rate_limit_window(1, status=200)
    with pytest.raises(ValueError):
        model.rate_limit_window(0)


def parse_reset(value: str) -> float:
    assert value.endswith("Z")
    return datetime.fromisoformat(value).timestamp()


def test_rate_limit_headers_when_unlimited(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=[user("[[script:hello]]")])
    assert raw.parse().content[0].type == "text"
    for name in RATE_LIMIT_HEADERS:
        if name.endswith("-reset"):
            assert abs(parse_reset(raw.headers[name]) - time.time()) < 5
        else:
            assert int(raw.headers[name]) >= 1_000_000


def test_per_minute_limits() -> None:
    limits = RateLimits(requests_per_minute=2, input_tokens_per_minute=100_000, output_tokens_per_minute=5_000)
    with (
        OfflineModel(SCRIPTS, limits=limits) as model,
        anthropic.Anthropic(base_url=model.url, api_key="offline", max_retries=0) as client,
    ):
        messages = [user("[[script:hello]]")]
        first = client.messages.with_raw_response.create(model=MODEL, max_tokens=1000, messages=messages)
        usage = first.parse().usage
        headers = first.headers
        assert headers["anthropic-ratelimit-requests-limit"] == "2"
        assert headers["anthropic-ratelimit-requests-remaining"] == "1"
        assert headers["anthropic-ratelimit-input-tokens-limit"] == "100000"
        assert headers["anthropic-ratelimit-input-tokens-remaining"] == str(100_000 - usage.input_tokens)
        # Output tokens are charged up front from max_tokens.
        assert headers["anthropic-ratelimit-output-tokens-remaining"] == str(5_000 - 1000)
        # "tokens" is the most restrictive of the two.
        assert headers["anthropic-ratelimit-tokens-limit"] == "5000"
        assert headers["anthropic-ratelimit-tokens-remaining"] == headers["anthropic-ratelimit-output-tokens-remaining"]
        reset = parse_reset(headers["anthropic-ratelimit-requests-reset"])
        assert time.time() < reset <= time.time() + 61

        # The unused part of max_tokens came back when the call ended.
        second = client.messages.with_raw_response.create(model=MODEL, max_tokens=10, messages=messages)
        remaining = int(second.headers["anthropic-ratelimit-output-tokens-remaining"])
        assert 5_000 - usage.output_tokens - 10 <= remaining <= 5_000 - 10
        assert second.headers["anthropic-ratelimit-requests-remaining"] == "0"

        with pytest.raises(anthropic.RateLimitError) as excinfo:
            client.messages.create(model=MODEL, max_tokens=10, messages=messages)
        error = excinfo.value
        assert 25 <= int(error.response.headers["retry-after"]) <= 30  # one request refills in 60 s / 2
        assert error.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert "2 requests per minute" in str(error.api_message)
        # Limits are per model.
        client.messages.create(model="claude-other", max_tokens=10, messages=messages)

        # A max_tokens above the output limit can never pass.
        with pytest.raises(anthropic.RateLimitError) as too_big:
            client.messages.create(model="claude-third", max_tokens=6_000, messages=messages)
        assert "5,000 output tokens per minute" in str(too_big.value.api_message)
        assert too_big.value.response.headers["retry-after"] == "60"
        assert model.rejection_counts() == {429: 2}


# ------------------------------------------------------------------------------------ prompt caching


def cached_conversation(turns: int) -> list[Any]:
    """A conversation whose last user message carries the only message breakpoint."""
    messages: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "Fix the failing test."}]}]
    for i in range(turns):
        messages += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{i}", "name": "bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"out {i}"}]},
        ]
    messages[-1]["content"][-1]["cache_control"] = EPHEMERAL
    return messages


def cached_system() -> list[Any]:
    return [{"type": "text", "text": BIG_SYSTEM, "cache_control": EPHEMERAL}]


def input_parts(usage: Any) -> tuple[int, int, int]:
    return usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens


def test_prompt_caching_growing_conversation(model: OfflineModel, client: anthropic.Anthropic) -> None:
    system = cached_system()
    first_messages = cached_conversation(0)
    first = client.messages.create(model=MODEL, max_tokens=1024, system=system, messages=first_messages)
    inp, created, read = input_parts(first.usage)
    assert read == 0 and created > 1024 and inp > 0
    assert inp + created + read == estimate_input_tokens({"system": system, "messages": first_messages})
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == created
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == 0

    # The conversation grew by one turn; the breakpoint moved to the new last message.
    messages = cached_conversation(1)
    with client.messages.stream(model=MODEL, max_tokens=1024, system=system, messages=messages) as stream:
        final = stream.get_final_message()
    inp2, created2, read2 = input_parts(final.usage)
    assert read2 == created  # the whole prefix written by the first call
    assert created2 > 0 and inp2 > 0
    assert inp2 + created2 + read2 == estimate_input_tokens({"system": system, "messages": messages})
    assert client.messages.count_tokens(model=MODEL, system=system, messages=messages).input_tokens == (
        inp2 + created2 + read2
    )

    # The same request again reads everything up to its last breakpoint.
    again = client.messages.create(model=MODEL, max_tokens=1024, system=system, messages=messages)
    assert input_parts(again.usage) == (inp2, 0, read2 + created2)
    # Cached per model.
    other = client.messages.create(model="claude-other", max_tokens=1024, system=system, messages=messages)
    assert other.usage.cache_read_input_tokens == 0 and other.usage.cache_creation_input_tokens == read2 + created2

    [_, c2, c3, c4] = model.calls()
    assert (c2.usage["cache_read_input_tokens"], c3.usage["cache_creation_input_tokens"]) == (read2, 0)
    assert c4.usage["total_tokens"] == sum(input_parts(other.usage)) + other.usage.output_tokens
    stats = model.cache_stats()
    assert (stats["hits"], stats["misses"]) == (2, 2)
    # Entries: the system prompt (shared by both calls) and each call's last message, then both for claude-other.
    assert stats["entries"] == stats["writes"] == 5
    assert stats["read_tokens"] == read2 + read2 + created2

    # A changed system prompt invalidates everything after it.
    changed: Any = [{"type": "text", "text": BIG_SYSTEM + " Be brief.", "cache_control": EPHEMERAL}]
    fresh = client.messages.create(model=MODEL, max_tokens=1024, system=changed, messages=messages)
    assert fresh.usage.cache_read_input_tokens == 0

    model.clear_cache()
    assert model.cache_stats() == dict.fromkeys(stats, 0)


def test_tools_are_part_of_the_cached_prefix(client: anthropic.Anthropic) -> None:
    tools: list[Any] = [
        {"name": "bash", "description": BIG_SYSTEM, "input_schema": {"type": "object"}, "cache_control": EPHEMERAL}
    ]
    messages = [user("go")]
    first = client.messages.create(model=MODEL, max_tokens=100, tools=tools, messages=messages)
    assert (first.usage.cache_creation_input_tokens or 0) > 1024
    second = client.messages.create(model=MODEL, max_tokens=100, tools=tools, system="Be careful.", messages=messages)
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert sum(input_parts(second.usage)) == estimate_input_tokens(
        {"tools": tools, "system": "Be careful.", "messages": messages}
    )


def test_cache_lookback_and_one_hour_ttl(model: OfflineModel, client: anthropic.Anthropic) -> None:
    system: Any = [{"type": "text", "text": BIG_SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]

    def ask(turns: int) -> Any:
        return client.messages.create(model=MODEL, max_tokens=10, system=system, messages=cached_conversation(turns))

    first = ask(0)
    assert first.usage.cache_creation is not None
    system_tokens = first.usage.cache_creation.ephemeral_1h_input_tokens
    assert system_tokens > 1024 and first.usage.cache_creation.ephemeral_5m_input_tokens > 0
    # 22 blocks later the first call's message breakpoint is out of the 20-block lookback: only the system is read.
    far = ask(11)
    assert far.usage.cache_read_input_tokens == system_tokens
    # 20 blocks later it is still found.
    near = ask(10)
    assert near.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens


def test_prompt_below_the_minimum_is_not_cached(model: OfflineModel, client: anthropic.Anthropic) -> None:
    system: Any = [{"type": "text", "text": "Short system prompt.", "cache_control": EPHEMERAL}]
    messages = cached_conversation(0)
    for _ in range(2):
        message = client.messages.create(model=MODEL, max_tokens=100, system=system, messages=messages)
        assert input_parts(message.usage) == (estimate_input_tokens({"system": system, "messages": messages}), 0, 0)
    assert model.cache_stats()["entries"] == 0

    # The minimum is configurable.
    model.min_cache_tokens = 10
    client.messages.create(model=MODEL, max_tokens=100, system=system, messages=messages)
    message = client.messages.create(model=MODEL, max_tokens=100, system=system, messages=messages)
    assert (message.usage.cache_read_input_tokens or 0) > 0


def test_breakpoint_limit_and_validation(model: OfflineModel, client: anthropic.Anthropic) -> None:
    system: list[Any] = [{"type": "text", "text": f"part {i}", "cache_control": EPHEMERAL} for i in range(4)]
    client.messages.create(model=MODEL, max_tokens=100, system=system, messages=[user("four is fine")])
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        client.messages.create(model=MODEL, max_tokens=100, system=system, messages=cached_conversation(0))
    assert excinfo.value.api_message == "A maximum of 4 blocks with cache_control may be provided. Found 5."
    assert excinfo.value.type == "invalid_request_error"
    bad: Any = [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "x"}}]}]
    with pytest.raises(anthropic.BadRequestError) as bad_type:
        client.messages.create(model=MODEL, max_tokens=100, messages=bad)
    assert bad_type.value.api_message == "messages.0.content.0.cache_control.type: Input should be 'ephemeral'"
    assert [c.status for c in model.calls()] == ["completed", "error", "error"]
    assert all(c.usage["total_tokens"] == 0 and c.http_status == 400 for c in model.calls()[1:])


def test_cache_entries_expire() -> None:
    with (
        OfflineModel(SCRIPTS, cache_ttl=1.0) as model,
        anthropic.Anthropic(base_url=model.url, api_key="offline", max_retries=0) as client,
    ):
        system, messages = cached_system(), cached_conversation(0)

        def ask() -> tuple[int, int, int]:
            message = client.messages.create(model=MODEL, max_tokens=10, system=system, messages=messages)
            return input_parts(message.usage)

        _, created, _ = ask()
        assert ask() == (ask()[0], 0, created)  # hits (each refreshing the entry)
        time.sleep(1.1)
        assert ask()[1:] == (created, 0)  # expired: written again
        assert model.cache_stats()["writes"] == 4


# ---------------------------------------------------------------------------------- context window


def test_context_window() -> None:
    messages = [user("[[script:hello]] " + "x" * 400)]
    tokens = estimate_input_tokens({"messages": messages})
    with (
        OfflineModel(SCRIPTS, context_window=tokens - 1, context_windows={"claude-big": tokens + 50}) as model,
        anthropic.Anthropic(base_url=model.url, api_key="offline", max_retries=0) as client,
    ):
        with pytest.raises(anthropic.BadRequestError) as too_long:
            client.messages.create(model=MODEL, max_tokens=10, messages=messages)
        assert too_long.value.api_message == f"prompt is too long: {tokens} tokens > {tokens - 1} maximum"
        assert "prompt is too long" in str(too_long.value)

        with pytest.raises(anthropic.BadRequestError) as with_output:
            client.messages.create(model="claude-big", max_tokens=100, messages=messages)
        assert with_output.value.api_message == (
            f"input length and `max_tokens` exceed context limit: {tokens} + 100 > {tokens + 50}, "
            "decrease input length or `max_tokens` and try again"
        )
        assert client.messages.create(model="claude-big", max_tokens=50, messages=messages).stop_reason == "end_turn"
        # count_tokens does not enforce the window.
        assert client.messages.count_tokens(model=MODEL, messages=messages).input_tokens == tokens

        calls = model.calls()
        assert [c.status for c in calls] == ["error", "error", "completed"]
        assert all(c.usage["total_tokens"] == 0 and c.http_status == 400 for c in calls[:2])
        assert model.context_window_for("claude-big") == tokens + 50 and model.context_window_for(MODEL) == tokens - 1


# ----------------------------------------------------------------------------------- stop reasons


def test_stop_reasons_through_the_stream(model: OfflineModel, client: anthropic.Anthropic) -> None:
    messages: list[Any] = [user("[[script:stops]]")]

    def ask(stream: bool) -> anthropic.types.Message:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=1024, messages=messages) as events:
                return events.get_final_message()
        return client.messages.create(model=MODEL, max_tokens=1024, messages=messages)

    for stream in (True, False):
        del messages[1:]
        paused = ask(stream)
        assert paused.stop_reason == "pause_turn" and paused.content[0].type == "text"
        # pause_turn: the conversation goes back as is, the paused answer included.
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in paused.content]})
        cut = ask(stream)
        assert cut.stop_reason == "max_tokens"
        assert [b.type for b in cut.content] == ["text", "tool_use"]
        assert cut.content[1].type == "tool_use" and cut.content[1].input == {"command": "pyt"}  # not to be run
        # max_tokens: continue without running the cut-off call.
        messages += [{"role": "assistant", "content": "Let me run"}, user("continue")]
        assert ask(stream).stop_reason == "tool_use"
        messages += [{"role": "assistant", "content": "ok"}, user("go on")]
        refused = ask(stream)
        assert refused.stop_reason == "refusal" and refused.content == []
    assert [c.turn for c in model.calls()] == [0, 1, 2, 3] * 2
    assert Turn(content=[], stop_reason="model_context_window_exceeded").resolved_stop_reason == (
        "model_context_window_exceeded"
    )


def test_turn_selection_survives_cleared_tool_results(model: OfflineModel, client: anthropic.Anthropic) -> None:
    # Two tool calls answered, then the oldest result cleared: still the third turn of fix_failing_test.
    messages: list[Any] = [user("fix it")]
    for i in range(2):
        messages += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{i}", "name": "bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": "x" * 500}]},
        ]
    expected = BUILTIN_SCRIPTS["fix_failing_test"].turns[2].content[0]["input"]
    before = client.messages.create(model=MODEL, max_tokens=1024, messages=messages)
    messages[2]["content"][0]["content"] = "[cleared]"
    after = client.messages.create(model=MODEL, max_tokens=1024, messages=messages)
    for message in (before, after):
        assert message.content[0].type == "tool_use" and message.content[0].input == expected
    assert after.usage.input_tokens < before.usage.input_tokens
    assert [c.turn for c in model.calls()] == [2, 2]


# ------------------------------------------------------------------------------ separate process


def test_separate_process_rate_limits_and_cache() -> None:
    command = [sys.executable, "-m", "orchestrator.testing.offline_model", "--port", "0", "--requests-per-minute", "50"]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip().rsplit(" ", 1)[1]
            window = {"seconds": 30, "status": 529, "retry_after": 1, "calls": 1}
            assert post_raw(url + "/_offline/rate_limit", json.dumps(window).encode())[0] == 200
            assert post_raw(url + "/_offline/rate_limit", b'{"seconds": 1, "bogus": 1}')[0] == 400
            state = get_json(url + "/_offline/rate_limit")
            assert [w["status"] for w in state["windows"]] == [529] and state["limits"]["requests_per_minute"] == 50
            with anthropic.Anthropic(base_url=url, api_key="offline", max_retries=0) as client:
                with pytest.raises(anthropic.OverloadedError) as excinfo:
                    client.messages.create(model=MODEL, max_tokens=100, messages=[user("hello")])
                assert excinfo.value.response.headers["retry-after"] == "1"
                raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=[user("hello")])
                assert raw.headers["anthropic-ratelimit-requests-limit"] == "50"
                assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"  # refusals cost nothing
            state = get_json(url + "/_offline/rate_limit")
            assert state["windows"] == [] and state["rejections"] == {"529": 1}
            assert [c["status"] for c in get_json(url + "/_offline/calls")] == ["rejected", "completed"]
            assert get_json(url + "/_offline/cache")["entries"] == 0
            assert post_raw(url + "/_offline/rate_limit", b"", method="DELETE")[0] == 200
            assert post_raw(url + "/_offline/cache", b"", method="DELETE")[0] == 200
            assert post_raw(url + "/_offline/limits", b"{}")[0] == 200
            assert get_json(url + "/_offline/rate_limit")["limits"] is None
        finally:
            proc.terminate()
            returncode = proc.wait(timeout=10)
    assert returncode == 0
