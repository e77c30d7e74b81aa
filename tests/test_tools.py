"""Tests for the agent's client tools and the quality gates (real files and real processes, no mocks)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from orchestrator.agent.loop import StopSignal
from orchestrator.agent.tools import (
    TOOL_DEFINITIONS,
    PathOutsideWorktree,
    ShellOutcome,
    Toolbox,
    ToolResult,
    resolve_in_worktree,
    safe_env,
)
from orchestrator.errors import StopRun
from orchestrator.gates import run_gates
from orchestrator.models import GateSpec
from orchestrator.sandbox import Sandbox, SandboxConfig
from orchestrator.states import State

EDITOR = "str_replace_based_edit_tool"


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    root = tmp_path / "wt"
    root.mkdir()
    (root / ".git").write_text("gitdir: /somewhere/else\n")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    other = tmp_path / "outside"
    other.mkdir()
    (other / "secret.txt").write_text("top secret\n")
    return other


@pytest.fixture
def box(worktree: Path) -> Toolbox:
    return Toolbox(worktree, shell_timeout=20)


def _live_members(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group ``pgid`` (scans /proc)."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            live.append(int(entry))
    return live


def _wait_group_gone(pgid: int, seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (live := _live_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return live


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in ("Z", "X")


# --- API basics --------------------------------------------------------------------------------------------


def test_tool_definitions_and_result_block() -> None:
    assert TOOL_DEFINITIONS == [
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    ]
    assert ToolResult("hi").as_block("toolu_1") == {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "hi",
        "is_error": False,
    }


def test_tool_definitions_with_max_view_chars(worktree: Path) -> None:
    defs = Toolbox(worktree, max_view_chars=500).tool_definitions()
    assert defs[1]["max_characters"] == 500
    assert "max_characters" not in TOOL_DEFINITIONS[1]


def test_unknown_tool_and_bad_input(box: Toolbox) -> None:
    result = box.run("python", {"code": "1"})
    assert result.is_error and "unknown tool" in result.content
    assert box.run("bash", {}).is_error
    assert box.run("bash", {"command": 3}).is_error
    assert box.run(EDITOR, {"command": "undo_edit", "path": "x"}).is_error
    assert box.run(EDITOR, {"command": "view"}).is_error
    assert box.run(EDITOR, {"command": "view", "path": "a\0b"}).is_error
    assert box.run(EDITOR, [1, 2]).is_error  # type: ignore[arg-type]


# --- editor ------------------------------------------------------------------------------------------------


def test_view_file_with_line_numbers_and_range(box: Toolbox, worktree: Path) -> None:
    (worktree / "f.py").write_text("one\ntwo\nthree\nfour\n")
    result = box.run(EDITOR, {"command": "view", "path": "f.py"})
    assert not result.is_error
    assert "     1\tone\n     2\ttwo\n     3\tthree\n     4\tfour" in result.content
    ranged = box.run(EDITOR, {"command": "view", "path": "f.py", "view_range": [2, 3]})
    assert "     2\ttwo\n     3\tthree" in ranged.content
    assert "one" not in ranged.content and "four" not in ranged.content
    to_end = box.run(EDITOR, {"command": "view", "path": "f.py", "view_range": [3, -1]})
    assert "     3\tthree\n     4\tfour" in to_end.content and "two" not in to_end.content
    bad = box.run(EDITOR, {"command": "view", "path": "f.py", "view_range": [9, 10]})
    assert bad.is_error and "[1, 4]" in bad.content


def test_view_caps_output(worktree: Path) -> None:
    (worktree / "big.txt").write_text("".join(f"line {i}\n" for i in range(10_000)))
    result = Toolbox(worktree, max_view_chars=1000).run(EDITOR, {"command": "view", "path": "big.txt"})
    assert not result.is_error
    assert len(result.content) < 1200
    assert "truncated" in result.content and "view_range" in result.content


def test_view_directory_two_levels_without_hidden(box: Toolbox, worktree: Path) -> None:
    (worktree / "src" / "pkg" / "deep").mkdir(parents=True)
    (worktree / "src" / "pkg" / "mod.py").write_text("x\n")
    (worktree / "src" / "pkg" / "deep" / "too_deep.py").write_text("x\n")
    (worktree / "src" / "a.py").write_text("x\n")
    (worktree / ".hidden").mkdir()
    (worktree / ".hidden" / "h.txt").write_text("x\n")
    (worktree / "README.md").write_text("x\n")
    result = box.run(EDITOR, {"command": "view", "path": "."})
    assert not result.is_error
    for expected in ("README.md", "src/", "src/a.py", "src/pkg/"):
        assert re.search(rf"^{re.escape(expected)}$", result.content, re.M), expected
    assert "mod.py" not in result.content and "too_deep" not in result.content
    assert ".hidden" not in result.content and ".git" not in result.content
    sub = box.run(EDITOR, {"command": "view", "path": "src"})
    assert "src/pkg/mod.py" in sub.content


def test_view_refuses_binary_file(box: Toolbox, worktree: Path) -> None:
    (worktree / "blob.bin").write_bytes(b"abc\0def")
    result = box.run(EDITOR, {"command": "view", "path": "blob.bin"})
    assert result.is_error and "binary" in result.content


def test_missing_file(box: Toolbox) -> None:
    for tool_input in (
        {"command": "view", "path": "nope.txt"},
        {"command": "str_replace", "path": "nope.txt", "old_str": "a", "new_str": "b"},
        {"command": "insert", "path": "nope.txt", "insert_line": 0, "insert_text": "a"},
    ):
        result = box.run(EDITOR, tool_input)
        assert result.is_error and "does not exist" in result.content


def test_create_makes_parent_dirs_and_overwrites(box: Toolbox, worktree: Path) -> None:
    result = box.run(EDITOR, {"command": "create", "path": "a/b/c.txt", "file_text": "hello\n"})
    assert not result.is_error, result.content
    assert (worktree / "a" / "b" / "c.txt").read_text() == "hello\n"
    again = box.run(EDITOR, {"command": "create", "path": "a/b/c.txt", "file_text": "bye\n"})
    assert not again.is_error
    assert (worktree / "a" / "b" / "c.txt").read_text() == "bye\n"
    assert sorted(p.name for p in (worktree / "a" / "b").iterdir()) == ["c.txt"]  # no temp files left
    assert box.run(EDITOR, {"command": "create", "path": "a/b", "file_text": "x"}).is_error
    assert box.run(EDITOR, {"command": "create", "path": "d.txt"}).is_error  # file_text missing


def test_str_replace(box: Toolbox, worktree: Path) -> None:
    target = worktree / "code.py"
    target.write_text("x = 1\ny = 2\nx = 1\nz = 3\n")
    none = box.run(EDITOR, {"command": "str_replace", "path": "code.py", "old_str": "w = 0", "new_str": ""})
    assert none.is_error and "did not appear verbatim" in none.content
    two = box.run(EDITOR, {"command": "str_replace", "path": "code.py", "old_str": "x = 1", "new_str": "x"})
    assert two.is_error and "Multiple occurrences" in two.content and "[1, 3]" in two.content
    assert target.read_text() == "x = 1\ny = 2\nx = 1\nz = 3\n"
    one = box.run(EDITOR, {"command": "str_replace", "path": "code.py", "old_str": "y = 2\n", "new_str": "y = 20\n"})
    assert not one.is_error, one.content
    assert "edited successfully" in one.content and "     2\ty = 20" in one.content
    assert target.read_text() == "x = 1\ny = 20\nx = 1\nz = 3\n"
    box.run(EDITOR, {"command": "str_replace", "path": "code.py", "old_str": "z = 3\n"})  # new_str omitted
    assert target.read_text() == "x = 1\ny = 20\nx = 1\n"


def test_str_replace_keeps_crlf_and_mode(box: Toolbox, worktree: Path) -> None:
    target = worktree / "win.txt"
    target.write_bytes(b"a\r\nb\r\nc\r\n")
    target.chmod(0o755)
    result = box.run(EDITOR, {"command": "str_replace", "path": "win.txt", "old_str": "a\nb", "new_str": "A\nB"})
    assert not result.is_error, result.content
    assert target.read_bytes() == b"A\r\nB\r\nc\r\n"
    assert target.stat().st_mode & 0o777 == 0o755


def test_insert(box: Toolbox, worktree: Path) -> None:
    target = worktree / "f.txt"
    target.write_text("one\ntwo")

    def insert(line: int, text: str) -> ToolResult:
        return box.run(EDITOR, {"command": "insert", "path": "f.txt", "insert_line": line, "insert_text": text})

    assert not insert(0, "zero").is_error
    assert target.read_text() == "zero\none\ntwo"
    result = insert(2, "1.5\n")
    assert not result.is_error and "     3\t1.5" in result.content
    assert target.read_text() == "zero\none\n1.5\ntwo"
    assert not insert(4, "end").is_error
    assert target.read_text() == "zero\none\n1.5\ntwo\nend\n"
    bad = insert(99, "x")
    assert bad.is_error and "[0, 5]" in bad.content


def test_escapes_are_refused(box: Toolbox, worktree: Path, outside: Path) -> None:
    (worktree / "link_file").symlink_to(outside / "secret.txt")
    (worktree / "link_dir").symlink_to(outside, target_is_directory=True)
    (worktree / "dangling").symlink_to(outside / "new.txt")
    before = sorted(p.name for p in outside.iterdir())
    attempts = [
        {"command": "view", "path": "../outside/secret.txt"},
        {"command": "create", "path": "../x", "file_text": "pwned"},
        {"command": "view", "path": "/etc/passwd"},
        {"command": "view", "path": str(outside / "secret.txt")},
        {"command": "create", "path": str(outside / "new.txt"), "file_text": "pwned"},
        {"command": "view", "path": "link_file"},
        {"command": "str_replace", "path": "link_file", "old_str": "top", "new_str": "pwned"},
        {"command": "create", "path": "link_file", "file_text": "pwned"},
        {"command": "view", "path": "link_dir/secret.txt"},
        {"command": "create", "path": "link_dir/new.txt", "file_text": "pwned"},
        {"command": "create", "path": "link_dir/sub/new.txt", "file_text": "pwned"},
        {"command": "create", "path": "dangling", "file_text": "pwned"},
        {"command": "view", "path": ".git"},
        {"command": "view", "path": ".git/config"},
        {"command": "create", "path": ".git/hooks/pre-commit", "file_text": "pwned"},
        {"command": "view", "path": "sub/../../outside/secret.txt"},
    ]
    for tool_input in attempts:
        result = box.run(EDITOR, tool_input)
        assert result.is_error, tool_input
        assert result.content.startswith("Error: path "), result.content
        assert "pwned" not in result.content and "top secret" not in result.content
    assert "outside the agent's worktree" in box.run(EDITOR, attempts[0]).content
    assert sorted(p.name for p in outside.iterdir()) == before
    assert (outside / "secret.txt").read_text() == "top secret\n"
    assert (worktree / ".git").read_text() == "gitdir: /somewhere/else\n"
    assert not (worktree / "sub").exists()


def test_absolute_path_inside_worktree_is_accepted(box: Toolbox, worktree: Path) -> None:
    target = worktree / "abs.txt"
    result = box.run(EDITOR, {"command": "create", "path": str(target), "file_text": "ok\n"})
    assert not result.is_error, result.content
    assert target.read_text() == "ok\n"
    assert "     1\tok" in box.run(EDITOR, {"command": "view", "path": str(target)}).content


def test_resolve_in_worktree(worktree: Path, outside: Path) -> None:
    (worktree / "inner").mkdir()
    (worktree / "alias").symlink_to(worktree / "inner", target_is_directory=True)
    real = Path(os.path.realpath(worktree))
    assert resolve_in_worktree(worktree, "alias/new/file.txt") == real / "inner" / "new" / "file.txt"
    assert resolve_in_worktree(worktree, ".") == real
    assert resolve_in_worktree(worktree, str(worktree / "x")) == real / "x"
    for bad in ("..", "../outside", str(outside), "/", ".git/HEAD", "inner/../.git"):
        with pytest.raises(PathOutsideWorktree):
            resolve_in_worktree(worktree, bad)


# --- bash --------------------------------------------------------------------------------------------------


def test_bash_output_and_exit_code(box: Toolbox) -> None:
    ok = box.run("bash", {"command": "echo hello; echo oops >&2"})
    assert ok == ToolResult("hello\noops\n")
    failed = box.run("bash", {"command": "echo partial; exit 3"})
    assert not failed.is_error
    assert failed.content == "partial\n[exit code: 3]"
    assert box.run("bash", {"command": "true"}).content == "(no output)"
    assert box.run("bash", {"restart": True}).content == "tool has been restarted."


def test_bash_cwd_is_worktree_and_state_does_not_persist(box: Toolbox, worktree: Path) -> None:
    assert box.run("bash", {"command": "pwd"}).content.strip() == os.path.realpath(worktree)
    box.run("bash", {"command": "mkdir sub && cd sub && export FOO=1"})
    assert box.run("bash", {"command": "pwd; echo ${FOO:-unset}"}).content.split() == [
        os.path.realpath(worktree),
        "unset",
    ]


def test_bash_timeout_kills_whole_process_group(worktree: Path) -> None:
    box = Toolbox(worktree, shell_timeout=1)
    started = time.monotonic()
    command = "echo leader=$$; bash -c 'sleep 600 & echo child=$!; sleep 600'; (sleep 600 &); sleep 600"
    result = box.run("bash", {"command": command})
    elapsed = time.monotonic() - started
    assert elapsed < 3, elapsed
    assert result.is_error
    assert "[command timed out after 1s and was killed]" in result.content
    leader = int(re.search(r"leader=(\d+)", result.content).group(1))  # type: ignore[union-attr]
    child = int(re.search(r"child=(\d+)", result.content).group(1))  # type: ignore[union-attr]
    assert _wait_group_gone(leader) == []
    assert not _pid_alive(child)
    assert box.running_pgid is None


def test_bash_kills_leftovers_after_normal_exit(box: Toolbox) -> None:
    started = time.monotonic()
    result = box.run("bash", {"command": "echo leader=$$; sleep 600 & echo bg=$!; echo done"})
    assert time.monotonic() - started < 3
    assert not result.is_error and "done" in result.content
    leader = int(re.search(r"leader=(\d+)", result.content).group(1))  # type: ignore[union-attr]
    bg = int(re.search(r"bg=(\d+)", result.content).group(1))  # type: ignore[union-attr]
    assert _wait_group_gone(leader) == []
    assert not _pid_alive(bg)
    # Once every member is reaped (the orphaned sleep by PID 1, asynchronously) the group is gone.
    deadline = time.monotonic() + 5
    with pytest.raises(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(leader, 0)
            time.sleep(0.02)


def test_bash_output_is_capped(worktree: Path) -> None:
    box = Toolbox(worktree, output_limit=10_000, shell_timeout=30)
    result = box.run("bash", {"command": "head -c 5000000 /dev/zero | tr '\\0' a; echo; echo END"})
    assert not result.is_error
    assert len(result.content) <= 10_100
    assert result.content.startswith("aaaa")
    assert result.content.rstrip().endswith("END")
    assert f"[... {5_000_000 + 5 - 10_000} bytes truncated ...]" in result.content


def test_bash_env_has_no_secrets(worktree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-leak")
    monkeypatch.setenv("ORCHESTRATOR_BROKER_URL", "redis://:pw@host:6379/0")
    monkeypatch.setenv("MY_SECRET_TOKEN", "tok-leak")
    monkeypatch.setenv("LC_TOKEN", "lc-leak")
    box = Toolbox(worktree)
    result = box.run("bash", {"command": "env"})
    assert not result.is_error
    for leak in ("ANTHROPIC", "sk-ant-leak", "ORCHESTRATOR", "pw@", "SECRET", "tok-leak", "lc-leak"):
        assert leak not in result.content
    assert "GIT_TERMINAL_PROMPT=0" in result.content and "PAGER=cat" in result.content


def test_safe_env_allowlist() -> None:
    env = safe_env(
        {
            "PATH": "/usr/bin:/bin",
            "HOME": "/home/me",
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
            "PYTHONPATH": "/x",
            "LD_PRELOAD": "/evil.so",
            "AWS_REGION": "eu",
            "FLOWER_BASIC_AUTH": "a:b",
            "LC_PASSWD": "x",
            "TERM": "https://user:pass@example.com",
            "GITHUB_TOKEN": "ghp",
        },
        home="/tmp/agent-home",
    )
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp/agent-home",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "GIT_TERMINAL_PROMPT": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PAGER": "cat",
    }


def test_kill_running_from_another_thread(box: Toolbox) -> None:
    assert box.kill_running() is False
    box.reset_stop()
    results: list[ToolResult] = []
    worker = threading.Thread(target=lambda: results.append(box.run("bash", {"command": "sleep 600"})))
    worker.start()
    deadline = time.monotonic() + 5
    while box.running_pgid is None and time.monotonic() < deadline:
        time.sleep(0.01)
    pgid = box.running_pgid
    assert pgid is not None
    time.sleep(0.1)
    killed_at = time.monotonic()
    assert box.kill_running() is True
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert time.monotonic() - killed_at < 1
    assert results[0].is_error and "[command was killed]" in results[0].content
    assert _wait_group_gone(pgid) == []
    assert box.running_pgid is None
    assert box.kill_running() is False


def test_kill_running_latches_a_stop_until_reset(box: Toolbox, worktree: Path) -> None:
    assert box.kill_running() is False  # nothing running, but the stop is latched
    assert box.stopped
    started = time.monotonic()
    refused = box.run("bash", {"command": "touch started.txt; sleep 600"})
    assert time.monotonic() - started < 1
    assert refused.is_error and "[command was killed]" in refused.content
    assert not (worktree / "started.txt").exists()  # it never ran
    outcome = box.run_shell("echo hi")
    assert outcome.killed and outcome.exit_code is None and not outcome.timed_out
    box.reset_stop()
    assert not box.stopped
    assert box.run("bash", {"command": "echo again"}).content == "again\n"


def test_a_stop_racing_the_start_of_a_command_never_leaves_it_running(worktree: Path) -> None:
    """kill_running() from another thread, at any moment around run_shell's start: the command never survives."""
    box = Toolbox(worktree, shell_timeout=20)
    rng = random.Random(7)
    marker = f"sleep {rng.randint(10_000, 99_999)}.5"
    refused = started = 0

    def start(barrier: threading.Barrier, delay: float, outcomes: list[ShellOutcome]) -> None:
        barrier.wait()
        time.sleep(delay)
        outcomes.append(box.run_shell(marker, timeout=20))

    def stop(barrier: threading.Barrier, delay: float) -> None:
        barrier.wait()
        time.sleep(delay)
        box.kill_running()

    for attempt in range(200):
        barrier = threading.Barrier(2)
        outcomes: list[ShellOutcome] = []
        runner = threading.Thread(target=start, args=(barrier, rng.uniform(0, 0.003), outcomes))
        stopper = threading.Thread(target=stop, args=(barrier, rng.uniform(0, 0.004)))
        runner.start()
        stopper.start()
        stopper.join()
        runner.join(timeout=5)
        assert not runner.is_alive(), f"attempt {attempt}: the command outlived the stop"
        [outcome] = outcomes
        assert outcome.killed and not outcome.timed_out, (attempt, outcome)
        assert outcome.duration_seconds < 3, (attempt, outcome)
        assert box.running_pgid is None
        if outcome.duration_seconds == 0.0:
            refused += 1
        else:
            started += 1
        box.reset_stop()
    assert refused >= 10 and started >= 10, (refused, started)  # both sides of the race were exercised
    leftovers = subprocess.run(["pgrep", "-f", f"^{marker}$"], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


def test_editor_refuses_hard_linked_files(box: Toolbox, worktree: Path, outside: Path) -> None:
    target = outside / "secret.txt"
    os.link(target, worktree / "alias.txt")
    os.link(worktree / "alias.txt", worktree / "alias2.txt")
    for tool_input in (
        {"command": "view", "path": "alias.txt"},
        {"command": "str_replace", "path": "alias.txt", "old_str": "top", "new_str": "pwned"},
        {"command": "insert", "path": "alias.txt", "insert_line": 0, "insert_text": "pwned"},
        {"command": "create", "path": "alias.txt", "file_text": "pwned"},
        {"command": "view", "path": "alias2.txt"},
    ):
        result = box.run(EDITOR, tool_input)
        assert result.is_error and "hard links" in result.content, (tool_input, result)
        assert "top secret" not in result.content
    assert target.read_text() == "top secret\n"
    assert (worktree / "alias.txt").read_text() == "top secret\n"
    (worktree / "single.txt").write_text("one link\n")
    assert not box.run(EDITOR, {"command": "view", "path": "single.txt"}).is_error


# --- gates -------------------------------------------------------------------------------------------------


def test_gate_timeout_is_capped_by_the_time_the_run_has_left(worktree: Path) -> None:
    gates = [GateSpec(name="slow", command="sleep 600", timeout_seconds=600),
             GateSpec(name="never", command="touch ran.txt", timeout_seconds=600)]
    left = iter([1.0, 0.0])
    started = time.monotonic()
    slow, never = run_gates(gates, worktree, attempt=1, time_left=lambda: next(left))
    assert time.monotonic() - started < 4
    assert not slow.passed and slow.exit_code is None and "timed out after 1s" in slow.output_tail
    assert not never.passed and "no time left" in never.output_tail
    assert not (worktree / "ran.txt").exists()


def test_a_stop_kills_the_running_gate_at_once(worktree: Path) -> None:
    stop = StopSignal()
    gates = [GateSpec(name="hang", command="sleep 600", timeout_seconds=600),
             GateSpec(name="after", command="touch after.txt")]
    timer = threading.Timer(0.5, stop.request, args=(State.KILLED, "operator kill"))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(StopRun) as raised:
            run_gates(gates, worktree, attempt=1, stop=stop)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2
    assert raised.value.status == State.KILLED
    assert not (worktree / "after.txt").exists()
    leftovers = subprocess.run(["pgrep", "-f", "^sleep 600$"], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


def test_the_runners_toolbox_reaches_a_running_gate(worktree: Path) -> None:
    box = Toolbox(worktree, shell_timeout=600)
    threading.Timer(0.5, box.kill_running).start()
    started = time.monotonic()
    [result] = run_gates([GateSpec(name="hang", command="sleep 600")], worktree, attempt=1, toolbox=box)
    assert time.monotonic() - started < 2
    assert not result.passed and "[gate was killed]" in result.output_tail


def test_gates_run_in_the_sandbox(worktree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-gate-secret")
    sandbox = Sandbox(SandboxConfig(), worktree, safe_env())
    confined_check = ("test -z \"$ANTHROPIC_API_KEY\" && test \"$HOME\" = /tmp/home && "
                      "test $(ls /proc | grep -cE '^[0-9]+$') -lt 8 && ! test -e /root/.bashrc")
    gates = [GateSpec(name="confined", command=confined_check),
             GateSpec(name="fails", command="exit 4")]
    confined, fails = run_gates(gates, worktree, attempt=2, sandbox=sandbox)
    assert confined.passed, confined.output_tail
    assert not fails.passed and fails.exit_code == 4 and fails.attempt == 2
