"""Tests for the offline Anthropic Messages API stand-in, driven through the real SDK over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
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
    OfflineModel,
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
}


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


def post_raw(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
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
