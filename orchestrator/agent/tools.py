"""Client tools (``bash`` and ``str_replace_based_edit_tool``) executed inside an agent's git worktree.

The model sees Anthropic's schema-less client tools; this module implements them locally:

* ``bash`` runs every command in a *fresh* ``/bin/bash -c`` started in the worktree (there is no persistent
  shell session, so ``cd`` and variables do not carry over between calls). Each command gets its own process
  group, a sanitised environment, a timeout and a bounded output buffer. With a :class:`~orchestrator.sandbox.Sandbox`
  the command runs confined (bubblewrap: its own PID namespace, so nothing it starts outlives it, ``setsid``
  included). Without one, whatever it left running in its process group is killed when its main process exits;
  a process that deliberately leaves the group (``setsid``) escapes this, and reading its output is abandoned
  shortly after the main process exits, so it cannot block the tool.
* ``str_replace_based_edit_tool`` (``view``, ``create``, ``str_replace``, ``insert``) only touches paths that
  resolve (symlinks included) inside the worktree and outside its ``.git``, and never a file with more than one
  hard link (its other name may be outside the worktree).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import selectors
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator.sandbox import Launch, Sandbox, SandboxUnavailable

__all__ = [
    "TOOL_DEFINITIONS",
    "PathOutsideWorktree",
    "ToolResult",
    "Toolbox",
    "resolve_in_worktree",
    "safe_env",
]

logger = logging.getLogger(__name__)

BASH_TOOL_NAME = "bash"
EDITOR_TOOL_NAME = "str_replace_based_edit_tool"

TOOL_DEFINITIONS: list[dict[str, Any]] = [
    {"type": "bash_20250124", "name": BASH_TOOL_NAME},
    {"type": "text_editor_20250728", "name": EDITOR_TOOL_NAME},
]

_EDITOR_COMMANDS = ("view", "create", "str_replace", "insert")

# --- environment -------------------------------------------------------------------------------------------

_ALLOWED_ENV_NAMES = frozenset(
    {"PATH", "LANG", "LANGUAGE", "TERM", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL", "HOME", "VIRTUAL_ENV"}
)
_ALLOWED_ENV_PREFIXES = ("LC_",)
_DENIED_ENV_PREFIXES = ("ANTHROPIC_", "ORCHESTRATOR_", "FLOWER_", "AWS_")
_DENIED_ENV_SUBSTRINGS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
# Any URL carrying userinfo (``scheme://user:pass@host``, ``redis://:pw@host``, ``https://token@host``).
_CREDENTIAL_URL = re.compile(r"://[^/\s@]*@")
_FORCED_ENV = {"GIT_TERMINAL_PROMPT": "0", "PYTHONDONTWRITEBYTECODE": "1", "PAGER": "cat"}


def _env_name_allowed(name: str) -> bool:
    if name not in _ALLOWED_ENV_NAMES and not name.startswith(_ALLOWED_ENV_PREFIXES):
        return False
    upper = name.upper()
    if upper.startswith(_DENIED_ENV_PREFIXES):
        return False
    return not any(word in upper for word in _DENIED_ENV_SUBSTRINGS)


def safe_env(base: Mapping[str, str] | None = None, *, home: str | None = None) -> dict[str, str]:
    """Return an allowlisted environment for agent shells, free of secrets.

    Only ``PATH``, ``LANG``/``LANGUAGE``, ``LC_*``, ``TERM``, ``TZ``, ``TMPDIR``, ``USER``, ``LOGNAME``,
    ``SHELL``, ``HOME`` and ``VIRTUAL_ENV`` are copied from ``base`` (default: ``os.environ``); names that
    look secret and values embedding URL credentials are dropped even then. ``home`` overrides ``HOME``.
    ``GIT_TERMINAL_PROMPT=0``, ``PYTHONDONTWRITEBYTECODE=1`` and ``PAGER=cat`` are always set.
    """
    source = os.environ if base is None else base
    env = {
        name: value for name, value in source.items() if _env_name_allowed(name) and not _CREDENTIAL_URL.search(value)
    }
    env.setdefault("PATH", os.defpath)
    if home is not None:
        env["HOME"] = home
    env.update(_FORCED_ENV)
    return env


# --- paths -------------------------------------------------------------------------------------------------


class PathOutsideWorktree(ValueError):
    """A tool path resolves outside the agent's worktree (or into its ``.git``)."""


def resolve_in_worktree(worktree: Path, path: str) -> Path:
    """Resolve ``path`` (relative to ``worktree``, or absolute) and check it stays inside the worktree.

    Symlinks are followed with :func:`os.path.realpath`, also for paths that do not exist yet. Raises
    :class:`PathOutsideWorktree` if the result is outside the real worktree or inside a ``.git`` entry.
    """
    root = os.path.realpath(worktree)
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    resolved = os.path.realpath(candidate)
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        raise PathOutsideWorktree(
            f"path {path!r} is outside the agent's worktree {root} (it resolves to {resolved}); "
            f"use a path relative to the worktree or an absolute path under {root}"
        )
    relative = Path(os.path.relpath(resolved, root))
    if ".git" in relative.parts:
        raise PathOutsideWorktree(
            f"path {path!r} is inside a .git directory of the worktree {root}; the agent may not access it "
            "with the editor"
        )
    return Path(resolved)


# --- results -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolResult:
    """Outcome of one tool call, convertible to an Anthropic ``tool_result`` content block."""

    content: str
    is_error: bool = False

    def as_block(self, tool_use_id: str) -> dict[str, Any]:
        """Return the ``tool_result`` block answering the ``tool_use`` block ``tool_use_id``."""
        return {
            "type": "tool_result",
            "tool_use_id": tool_use_id,
            "content": self.content,
            "is_error": self.is_error,
        }


class _ToolError(Exception):
    """A model mistake or expected failure; its message becomes an error ``ToolResult``."""


def _error(message: str) -> ToolResult:
    return ToolResult(content=f"Error: {message}", is_error=True)


# --- output capture ----------------------------------------------------------------------------------------

_READ_CHUNK = 65_536
_MAX_CHUNKS_PER_WAKEUP = 16
_POLL_INTERVAL = 0.05
_EXIT_GRACE = 0.2
_FINAL_DRAIN = 0.5


class _OutputCapture:
    """Keeps the head and the tail of a byte stream, counting what was dropped in between."""

    def __init__(self, limit: int) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> None:
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        excess = len(self._tail) - self._tail_limit
        if excess > 0:
            del self._tail[:excess]
            self._dropped += excess

    def text(self) -> str:
        if not self._dropped:
            return bytes(self._head + self._tail).decode("utf-8", errors="replace")
        head = self._head.decode("utf-8", errors="replace")
        tail = self._tail.decode("utf-8", errors="replace")
        return f"{head}\n[... {self._dropped} bytes truncated ...]\n{tail}"


def _read_available(fd: int, capture: _OutputCapture) -> bool:
    """Read what the non-blocking ``fd`` has (bounded); return False once it reached EOF."""
    for _ in range(_MAX_CHUNKS_PER_WAKEUP):
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        capture.feed(data)
    return True


def _drain(fd: int, capture: _OutputCapture, seconds: float) -> None:
    """Read from ``fd`` until EOF or until ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining) and not _read_available(fd, capture):
                return


def _has_exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, *without* reaping it (a zombie leader keeps its pgid reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"[exit code: {returncode} (killed by {name})]"
    return f"[exit code: {returncode}]"


# --- text helpers ------------------------------------------------------------------------------------------


def _split_lines(text: str) -> list[str]:
    """Split on ``\\n`` only, keeping line ends (``str.splitlines`` also splits on ``\\f`` etc.)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _number_lines(lines: list[str], first_line: int) -> str:
    """Format ``lines`` like ``cat -n`` (numbering starts at ``first_line``)."""
    return "\n".join(
        f"{number:6}\t{line.removesuffix(chr(10)).removesuffix(chr(13))}"
        for number, line in enumerate(lines, first_line)
    )


def _truncate(text: str, limit: int, hint: str) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    if cut <= 0:
        cut = limit
    return f"{text[:cut]}\n[... output truncated: showing {cut} of {len(text)} characters; {hint} ...]"


def _line_of(text: str, index: int) -> int:
    """1-based line number of character ``index`` in ``text``."""
    return text.count("\n", 0, index) + 1


def _find_all(text: str, needle: str) -> list[int]:
    """Start indices of all (possibly overlapping) occurrences of ``needle``."""
    found: list[int] = []
    start = text.find(needle)
    while start != -1:
        found.append(start)
        start = text.find(needle, start + 1)
    return found


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` then ``os.replace`` it (keeping the file mode)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _refuse_hard_links(display: str, info: os.stat_result) -> None:
    """A regular file with several hard links may be another name of a file outside the worktree."""
    if info.st_nlink > 1:
        raise _ToolError(
            f"{display} has {info.st_nlink} hard links; the editor does not touch hard-linked files (another "
            "name of the file may be outside the worktree)"
        )


_BINARY_SNIFF_BYTES = 8192
_MAX_EDIT_FILE_BYTES = 32 * 1024 * 1024
_SNIPPET_CONTEXT = 4


# --- toolbox -----------------------------------------------------------------------------------------------

_Outcome = Literal["exited", "timeout", "killed"]


@dataclass(frozen=True)
class ShellOutcome:
    """How a shell command ended: its capped output, exit code, and whether it timed out or was killed."""

    output: str
    exit_code: int | None
    timed_out: bool
    killed: bool
    duration_seconds: float
    start_error: str | None = None


class Toolbox:
    """Executes the agent's client tools inside one worktree.

    ``env`` defaults to :func:`safe_env`. ``max_view_chars`` caps ``view`` output (it is also advertised as
    ``max_characters`` by :meth:`tool_definitions`); all output is capped at ``output_limit`` characters.
    With ``sandbox``, shell commands are launched through it (its environment is the one it was built with).
    :meth:`kill_running` latches a stop: no command starts afterwards until :meth:`reset_stop`.
    """

    def __init__(
        self,
        worktree: Path,
        *,
        shell_timeout: float = 300.0,
        output_limit: int = 30_000,
        env: Mapping[str, str] | None = None,
        max_view_chars: int | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        if shell_timeout <= 0:
            raise ValueError("shell_timeout must be positive")
        if output_limit < 2:
            raise ValueError("output_limit must be at least 2")
        if max_view_chars is not None and max_view_chars < 1:
            raise ValueError("max_view_chars must be positive")
        self.worktree = Path(os.path.realpath(worktree))
        self.shell_timeout = shell_timeout
        self.output_limit = output_limit
        self.max_view_chars = max_view_chars
        self._env = dict(env) if env is not None else safe_env()
        self.sandbox = sandbox
        self._run_lock = threading.Lock()  # one shell command at a time
        self._state_lock = threading.Lock()  # guards _pgid / _killed / _stopped against kill_running()
        self._pgid: int | None = None
        self._killed = False
        self._stopped = False

    # -- public API -----------------------------------------------------------------------------------------

    def tool_definitions(self) -> list[dict[str, Any]]:
        """Copy of :data:`TOOL_DEFINITIONS`, with the editor's ``max_characters`` from ``max_view_chars``."""
        definitions = [dict(definition) for definition in TOOL_DEFINITIONS]
        if self.max_view_chars is not None:
            for definition in definitions:
                if definition["name"] == EDITOR_TOOL_NAME:
                    definition["max_characters"] = self.max_view_chars
        return definitions

    @property
    def running_pgid(self) -> int | None:
        """Process group id of the shell command currently running, if any."""
        with self._state_lock:
            return self._pgid

    def kill_running(self) -> bool:
        """SIGKILL the running shell command's process group and latch a stop (thread-safe).

        Returns True if a command was running. Until :meth:`reset_stop`, any later command is refused (it ends
        ``killed`` without running), also one whose start raced with this call.
        """
        with self._state_lock:
            self._stopped = True
            if self._pgid is None:
                return False
            self._killed = True
            _killpg(self._pgid)
            return True

    @property
    def stopped(self) -> bool:
        """Whether :meth:`kill_running` latched a stop that :meth:`reset_stop` has not cleared."""
        with self._state_lock:
            return self._stopped

    def reset_stop(self) -> None:
        """Allow commands again after :meth:`kill_running`."""
        with self._state_lock:
            self._stopped = False

    def run(self, name: str, tool_input: Mapping[str, Any]) -> ToolResult:
        """Dispatch a ``tool_use`` to the named tool; model mistakes become error results, not exceptions."""
        if not isinstance(tool_input, Mapping):
            return _error(f"tool input must be a JSON object, got {type(tool_input).__name__}")
        try:
            if name == BASH_TOOL_NAME:
                return self.bash(tool_input)
            if name == EDITOR_TOOL_NAME:
                return self.edit(tool_input)
        except Exception as exc:  # a tool call must never crash the agent loop
            logger.exception("tool %s failed unexpectedly", name)
            return _error(f"tool {name} failed: {type(exc).__name__}: {exc}")
        known = ", ".join(repr(d["name"]) for d in TOOL_DEFINITIONS)
        return _error(f"unknown tool {name!r}; available tools: {known}")

    def bash(self, tool_input: Mapping[str, Any]) -> ToolResult:
        """Run ``tool_input["command"]`` in a fresh shell in the worktree (``restart`` is a no-op).

        cwd and shell variables do not persist between calls. Processes the command leaves behind in its
        process group are killed when its main process exits.
        """
        if tool_input.get("restart"):
            return ToolResult("tool has been restarted.")
        command = tool_input.get("command")
        if not isinstance(command, str) or not command.strip():
            return _error("the bash tool needs a non-empty string 'command' (or 'restart': true)")
        with self._run_lock:
            return self._execute(command)

    def edit(self, tool_input: Mapping[str, Any]) -> ToolResult:
        """Run a text-editor command (``view``, ``create``, ``str_replace``, ``insert``) in the worktree."""
        command = tool_input.get("command")
        if command not in _EDITOR_COMMANDS:
            return _error(f"unknown command {command!r}; allowed commands are: {', '.join(_EDITOR_COMMANDS)}")
        path = tool_input.get("path")
        if not isinstance(path, str) or not path:
            return _error("the 'path' parameter is required and must be a non-empty string")
        try:
            resolved = resolve_in_worktree(self.worktree, path)
        except PathOutsideWorktree as exc:
            return _error(str(exc))
        except (ValueError, OSError) as exc:
            return _error(f"invalid path {path!r}: {exc}")
        try:
            if command == "view":
                return self._view(path, resolved, tool_input)
            if command == "create":
                return self._create(path, resolved, tool_input)
            if command == "str_replace":
                return self._str_replace(path, resolved, tool_input)
            return self._insert(path, resolved, tool_input)
        except _ToolError as exc:
            return _error(str(exc))
        except OSError as exc:
            return _error(f"{command} on {path} failed: {exc.strerror or exc}")

    # -- bash -----------------------------------------------------------------------------------------------

    def run_shell(self, command: str, timeout: float | None = None) -> ShellOutcome:
        """Run a command in the worktree in its own process group, with a timeout and an output cap."""
        with self._run_lock:
            return self._spawn(command, self.shell_timeout if timeout is None else timeout)

    def _execute(self, command: str) -> ToolResult:
        outcome = self._spawn(command, self.shell_timeout)
        output = outcome.output
        if outcome.start_error:
            return _error(outcome.start_error)
        if outcome.timed_out:
            trailer, is_error = f"[command timed out after {self.shell_timeout:g}s and was killed]", True
        elif outcome.killed:
            trailer, is_error = "[command was killed]", True
        elif outcome.exit_code != 0:
            trailer, is_error = _describe_exit(outcome.exit_code or 0), False
        else:
            trailer, is_error = "", False
        if trailer:
            content = f"{output}\n{trailer}" if output and not output.endswith("\n") else output + trailer
        else:
            content = output or "(no output)"
        return ToolResult(content=content, is_error=is_error)

    def _spawn(self, command: str, timeout: float) -> ShellOutcome:
        started = time.monotonic()
        if self.stopped:
            return ShellOutcome("", None, False, True, 0.0)
        launch: Launch | None = None
        try:
            if self.sandbox is not None:
                launch = self.sandbox.launch(command)
                argv, env, cwd = launch.argv, launch.env, launch.cwd
            else:
                argv, env, cwd = ["/bin/bash", "-c", command], self._env, str(self.worktree)
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, ValueError, SandboxUnavailable) as exc:
            if launch is not None:
                launch.cleanup()
            return ShellOutcome("", None, False, False, 0.0, f"could not start the command: {exc}")
        try:
            return self._supervise(proc, timeout, started)
        finally:
            if launch is not None:
                launch.cleanup()

    def _supervise(self, proc: subprocess.Popen[bytes], timeout: float, started: float) -> ShellOutcome:
        assert proc.stdout is not None
        with self._state_lock:
            self._pgid = proc.pid  # start_new_session: the leader's pid is the group id
            # A stop that landed after the check above (before the group was known) kills the command at once.
            self._killed = self._stopped
            if self._killed:
                _killpg(proc.pid)
        capture = _OutputCapture(self.output_limit)
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        outcome: _Outcome = "killed"
        try:
            outcome = self._pump(proc.pid, fd, capture, timeout)
        finally:
            # The leader is not reaped yet (see _has_exited), so its pgid cannot have been reused: killing
            # the group here removes stragglers after a normal exit and everything on timeout / kill.
            with self._state_lock:
                _killpg(proc.pid)
                self._pgid = None
                killed = self._killed
            try:
                _drain(fd, capture, _FINAL_DRAIN)
            finally:
                proc.stdout.close()
                proc.wait()
        return ShellOutcome(
            output=capture.text(),
            exit_code=proc.returncode,
            timed_out=outcome == "timeout",
            killed=outcome != "timeout" and (killed or outcome == "killed"),
            duration_seconds=time.monotonic() - started,
        )

    def _pump(self, pid: int, fd: int, capture: _OutputCapture, timeout: float) -> _Outcome:
        """Collect output until the leader exits (plus a short grace), the timeout, or a kill.

        The leader's exit is watched through a pidfd in the same selector as its output, so a command that has
        finished is noticed at once rather than at the next poll.
        """
        deadline = time.monotonic() + timeout
        grace_end: float | None = None
        eof = False
        pidfd = _open_pidfd(pid)
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ, "out")
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ, "exit")
            try:
                while True:
                    if self._killed:
                        return "killed"
                    now = time.monotonic()
                    if grace_end is None and _has_exited(pid):
                        if eof:
                            return "exited"
                        grace_end = now + _EXIT_GRACE
                        if pidfd is not None:
                            selector.unregister(pidfd)
                    if grace_end is not None and now >= grace_end:
                        return "exited"
                    if now >= deadline:
                        return "timeout"
                    wake = deadline if grace_end is None else min(deadline, grace_end)
                    wait = max(0.0, min(wake - now, _POLL_INTERVAL))
                    if eof and pidfd is None:  # no pidfd: poll for the leader's exit
                        time.sleep(min(wait, 0.01))
                        continue
                    for key, _ in selector.select(wait):
                        if key.data == "out" and not _read_available(fd, capture):
                            eof = True
                            selector.unregister(fd)
                            if grace_end is not None:
                                return "exited"
            finally:
                if pidfd is not None:
                    os.close(pidfd)

    # -- editor ---------------------------------------------------------------------------------------------

    @property
    def _view_limit(self) -> int:
        if self.max_view_chars is None:
            return self.output_limit
        return min(self.max_view_chars, self.output_limit)

    def _read_file(self, display: str, resolved: Path, *, strict: bool) -> str:
        """Read a regular text file; ``strict`` refuses invalid UTF-8 (editing must not corrupt bytes).

        The checks are made on the opened file itself (no symlink followed, no FIFO blocking), so the path
        cannot be swapped between check and read.
        """
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _ToolError(f"the path {display} does not exist. Please provide a valid path.") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _ToolError(f"the path {display} is not a regular file") from None
            raise
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise _ToolError(
                    f"the path {display} is a directory and only the `view` command can be used on it"
                )
            if not stat.S_ISREG(info.st_mode):
                raise _ToolError(f"the path {display} is not a regular file")
            _refuse_hard_links(display, info)
            if info.st_size > _MAX_EDIT_FILE_BYTES:
                raise _ToolError(
                    f"{display} is too large ({info.st_size} bytes; the limit is {_MAX_EDIT_FILE_BYTES}); "
                    "use bash tools such as head, sed -n or grep instead"
                )
            data = handle.read(_MAX_EDIT_FILE_BYTES + 1)
        if b"\0" in data[:_BINARY_SNIFF_BYTES]:
            raise _ToolError(f"{display} appears to be a binary file; the editor only handles text files")
        if not strict:
            return data.decode("utf-8", errors="replace")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _ToolError(f"{display} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def _snippet(self, display: str, text: str, first_line: int, last_line: int) -> str:
        lines = _split_lines(text)
        start = max(1, first_line - _SNIPPET_CONTEXT)
        end = min(len(lines), last_line + _SNIPPET_CONTEXT)
        body = _number_lines(lines[start - 1 : end], start)
        snippet = f"Here's the result of running `cat -n` on a snippet of {display}:\n{body}\n"
        return _truncate(snippet, self.output_limit, "use view to see the file")

    def _view(self, display: str, resolved: Path, tool_input: Mapping[str, Any]) -> ToolResult:
        view_range = tool_input.get("view_range")
        if resolved.is_dir():
            if view_range is not None:
                raise _ToolError("the `view_range` parameter is not allowed when `path` points to a directory")
            return ToolResult(self._list_directory(display, resolved))
        text = self._read_file(display, resolved, strict=False)
        lines = _split_lines(text)
        first = 1
        if view_range is not None:
            if (
                not isinstance(view_range, list | tuple)
                or len(view_range) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in view_range)
            ):
                raise _ToolError("invalid `view_range`; it should be a list of two integers [start, end]")
            first, last = view_range
            if not 1 <= first <= len(lines):
                raise _ToolError(
                    f"invalid `view_range`: {list(view_range)}. Its first element `{first}` should be within "
                    f"the range of lines of the file: [1, {len(lines)}]"
                )
            if last != -1 and last < first:
                raise _ToolError(
                    f"invalid `view_range`: {list(view_range)}. Its second element `{last}` should be -1 or "
                    f"larger or equal than its first `{first}`"
                )
            lines = lines[first - 1 :] if last == -1 else lines[first - 1 : last]
        if not lines:
            return ToolResult(f"The file {display} is empty.")
        content = f"Here's the result of running `cat -n` on {display}:\n{_number_lines(lines, first)}\n"
        return ToolResult(_truncate(content, self._view_limit, "use view_range to view the rest"))

    def _list_directory(self, display: str, resolved: Path) -> str:
        entries: list[str] = []

        def scan(directory: Path, depth: int) -> None:
            try:
                with os.scandir(directory) as iterator:
                    children = sorted(iterator, key=lambda entry: entry.name)
            except OSError:
                return
            for child in children:
                if child.name.startswith("."):
                    continue
                relative = os.path.relpath(child.path, self.worktree)
                is_dir = child.is_dir(follow_symlinks=False)
                entries.append(relative + ("/" if is_dir else ""))
                if is_dir and depth < 2:
                    scan(Path(child.path), depth + 1)

        scan(resolved, 1)
        header = (
            f"Here are the files and directories up to 2 levels deep in {display}, excluding hidden items "
            f"(paths relative to the worktree {self.worktree}):\n"
        )
        body = "\n".join(entries) if entries else "(empty directory)"
        return _truncate(header + body + "\n", self._view_limit, "view a subdirectory to see more")

    def _create(self, display: str, resolved: Path, tool_input: Mapping[str, Any]) -> ToolResult:
        file_text = tool_input.get("file_text")
        if not isinstance(file_text, str):
            raise _ToolError("the `file_text` parameter is required for command: create")
        existed = os.path.lexists(resolved)
        if existed:
            info = resolved.stat()
            if stat.S_ISDIR(info.st_mode):
                raise _ToolError(f"the path {display} is a directory; cannot create a file there")
            if not stat.S_ISREG(info.st_mode):
                raise _ToolError(f"the path {display} exists and is not a regular file")
            _refuse_hard_links(display, info)
        resolved.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(resolved, file_text.encode("utf-8"))
        verb = "overwritten" if existed else "created"
        return ToolResult(f"File {verb} successfully at: {display}")

    def _str_replace(self, display: str, resolved: Path, tool_input: Mapping[str, Any]) -> ToolResult:
        old_str = tool_input.get("old_str")
        new_str = tool_input.get("new_str", "")
        if not isinstance(old_str, str) or not old_str:
            raise _ToolError("the `old_str` parameter is required for command: str_replace and must be non-empty")
        if new_str is None:
            new_str = ""
        if not isinstance(new_str, str):
            raise _ToolError("the `new_str` parameter must be a string")
        text = self._read_file(display, resolved, strict=True)
        matches = _find_all(text, old_str)
        if not matches and "\r\n" in text and "\r\n" not in old_str:
            # The model saw CRLF lines without their \r (view strips it): match in the file's line-end style.
            old_str, new_str = old_str.replace("\n", "\r\n"), new_str.replace("\n", "\r\n")
            matches = _find_all(text, old_str)
        if not matches:
            raise _ToolError(f"no replacement was performed, old_str `{old_str}` did not appear verbatim in {display}.")
        if len(matches) > 1:
            lines = sorted({_line_of(text, index) for index in matches})
            raise _ToolError(
                f"no replacement was performed. Multiple occurrences ({len(matches)}) of old_str `{old_str}` "
                f"in lines {lines} of {display}. Please ensure it is unique"
            )
        index = matches[0]
        new_text = text[:index] + new_str + text[index + len(old_str) :]
        _atomic_write(resolved, new_text.encode("utf-8"))
        first = _line_of(new_text, index)
        last = first + new_str.count("\n")
        return ToolResult(
            f"The file {display} has been edited successfully. "
            + self._snippet(display, new_text, first, last)
            + "Review the changes and make sure they are as expected."
        )

    def _insert(self, display: str, resolved: Path, tool_input: Mapping[str, Any]) -> ToolResult:
        insert_line = tool_input.get("insert_line")
        insert_text = tool_input.get("insert_text", tool_input.get("new_str"))
        if not isinstance(insert_line, int) or isinstance(insert_line, bool):
            raise _ToolError("the `insert_line` parameter is required for command: insert and must be an integer")
        if not isinstance(insert_text, str):
            raise _ToolError("the `insert_text` parameter is required for command: insert")
        text = self._read_file(display, resolved, strict=True)
        lines = _split_lines(text)
        if not 0 <= insert_line <= len(lines):
            raise _ToolError(
                f"invalid `insert_line` parameter: {insert_line}. It should be within the range of lines of "
                f"the file: [0, {len(lines)}]"
            )
        newline = "\r\n" if "\r\n" in text else "\n"
        if newline == "\r\n" and "\r\n" not in insert_text:
            insert_text = insert_text.replace("\n", "\r\n")
        if insert_text and not insert_text.endswith("\n"):
            insert_text += newline
        if insert_line == len(lines) and lines and not lines[-1].endswith("\n"):
            lines[-1] += newline
        new_text = "".join(lines[:insert_line]) + insert_text + "".join(lines[insert_line:])
        _atomic_write(resolved, new_text.encode("utf-8"))
        first = insert_line + 1
        last = insert_line + max(1, insert_text.count("\n"))
        return ToolResult(
            f"The file {display} has been edited successfully. "
            + self._snippet(display, new_text, first, last)
            + "Review the changes and make sure they are as expected (indentation, no duplicate lines)."
        )
