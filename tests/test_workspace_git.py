"""The fleet's own git: it never runs what the agent (or the repository) planted, keeps credentials to itself and
never hangs (real git, real processes, a real local HTTP server; no mocks)."""

from __future__ import annotations

import base64
import http.server
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.testing.sample_repo import make_sample_repo
from orchestrator.workspace import SAFE_GIT_FLAGS, Workspace, WorkspaceError


def git(*args: str, cwd: Path | None = None) -> str:
    """Plain git for the test's own checks (never the code under test)."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    bare = tmp_path / "origin.git"
    make_sample_repo(tmp_path / "src", bare_origin=bare)
    return bare


def marker_program(directory: Path, markers: Path, name: str) -> Path:
    """An executable that records that it ran (and passes stdin through, like a filter)."""
    path = directory / name
    path.write_text(f"#!/bin/sh\ntouch '{markers}/{name}'\ncat\n")
    path.chmod(0o755)
    return path


def planted_config(bin_dir: Path, markers: Path, hooks: Path) -> str:
    return (
        f'[filter "x"]\n\tclean = {marker_program(bin_dir, markers, "filter-clean")}\n'
        f"\tsmudge = {marker_program(bin_dir, markers, 'filter-smudge')}\n\trequired = true\n"
        f"[core]\n\tfsmonitor = {marker_program(bin_dir, markers, 'fsmonitor')}\n\thooksPath = {hooks}\n"
        f'[diff "x"]\n\ttextconv = {marker_program(bin_dir, markers, "textconv")}\n'
        f"[gc]\n\tauto = 1\n"
    )


def plant_hooks(hooks: Path, markers: Path) -> None:
    hooks.mkdir(parents=True, exist_ok=True)
    for name in ("pre-commit", "commit-msg", "post-commit", "post-index-change", "reference-transaction",
                 "prepare-commit-msg", "pre-auto-gc"):
        marker_program(hooks, markers, f"hook-{name}").rename(hooks / name)


def test_the_fleets_commit_runs_nothing_the_agent_planted(tmp_path: Path, origin: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    markers, bin_dir = tmp_path / "markers", tmp_path / "bin"
    markers.mkdir()
    bin_dir.mkdir()
    workspace = Workspace(tmp_path / "ws")
    wt = workspace.prepare("a1", str(origin), "main", "agent/a1")
    view = workspace.git_view("a1", str(origin))
    mirror_config = (view.common_dir / "config").read_bytes()

    # Everything the agent can write in its worktree ...
    (wt.path / ".gitattributes").write_text("* filter=x diff=x merge=x\n")
    (wt.path / "work.txt").write_text("agent work\n")
    # ... a nested repository, already tracked as a gitlink, whose own config defines a filter (git runs
    # `git status` inside tracked nested repositories, with their config) ...
    nested = wt.path / "vendor" / "lib"
    nested.mkdir(parents=True)
    git("init", "--quiet", str(nested))
    (nested / "data.txt").write_text("aaaa\n")
    trusted = ["-c", "user.name=n", "-c", "user.email=n@n", "-c", "core.hooksPath=/dev/null"]
    git(*trusted, "-C", str(nested), "add", "-A")
    git(*trusted, "-C", str(nested), "commit", "-qm", "nested")
    git(*trusted, "-C", str(wt.path), "add", "vendor/lib")
    git(*trusted, "-C", str(wt.path), "commit", "-qm", "a gitlink on the branch")
    gitlink = git("-C", str(wt.path), "rev-parse", "HEAD:vendor/lib").strip()
    plant_hooks(nested / ".git" / "hooks", markers)
    with open(nested / ".git" / "config", "a") as handle:
        handle.write(planted_config(bin_dir, markers, nested / ".git" / "hooks"))
    (nested / ".gitattributes").write_text("* filter=x\n")
    (nested / "data.txt").write_text("bbbb\n")  # same size, newer mtime: only the clean filter can tell
    later = time.time() + 5
    os.utime(nested / "data.txt", (later, later))
    # ... its .git pointed at a git dir it controls, with a filter, fsmonitor and hooks ...
    evil = tmp_path / "evil.git"
    git("init", "--quiet", "--bare", str(evil))
    git("--git-dir", str(evil), "config", "core.bare", "false")
    evil_hooks = evil / "hooks"
    plant_hooks(evil_hooks, markers)
    with open(evil / "config", "a") as handle:
        handle.write(planted_config(bin_dir, markers, evil_hooks))
    (wt.path / ".git").write_text(f"gitdir: {evil}\n")
    # ... and, if it could reach them, the worktree admin dir's config.worktree and the mirror's hooks.
    (view.admin_dir / "config.worktree").write_text(planted_config(bin_dir, markers, evil_hooks))
    plant_hooks(view.common_dir / "hooks", markers)
    # The worker's own environment points git at attacker config too: the fleet's git must ignore it.
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    (fake_home / ".gitconfig").write_text(planted_config(bin_dir, markers, evil_hooks))
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(fake_home / ".gitconfig"))
    monkeypatch.setenv("GIT_DIR", str(evil))
    monkeypatch.setenv("GIT_CONFIG_PARAMETERS", f"'core.fsmonitor'='{bin_dir / 'fsmonitor'}'")
    workspace = Workspace(tmp_path / "ws")  # built with that environment

    with caplog.at_level(logging.WARNING, logger="orchestrator.workspace"):
        commit = workspace.commit(wt, "agent work", "agent-a1", "a1@agents.invalid", "main")

    assert commit is not None
    assert sorted(p.name for p in markers.iterdir()) == []  # no filter, fsmonitor, textconv, hook or gc ran
    assert (view.common_dir / "config").read_bytes() == mirror_config
    files = git("--git-dir", str(view.common_dir), "ls-tree", "-r", "--name-only", commit).split()
    assert "work.txt" in files and ".gitattributes" in files and "calc.py" in files
    # The nested repository is left out: its gitlink stays as it was.
    assert git("--git-dir", str(view.common_dir), "rev-parse", f"{commit}:vendor/lib").strip() == gitlink
    assert git("--git-dir", str(view.common_dir), "show", f"{commit}:work.txt") == "agent work\n"  # unfiltered
    assert git("--git-dir", str(view.common_dir), "rev-parse", "refs/heads/agent/a1").strip() == commit
    assert git("--git-dir", str(evil), "for-each-ref") == ""  # nothing went to the agent's git dir
    assert (wt.path / ".git").read_text() == f"gitdir: {os.path.realpath(view.admin_dir)}\n"
    assert "restored" in caplog.text and "nested repositories left out" in caplog.text


def test_prepare_restores_a_rewritten_dotgit_and_commits_still_land_on_the_branch(tmp_path: Path,
                                                                                   origin: Path) -> None:
    workspace = Workspace(tmp_path / "ws")
    wt = workspace.prepare("a1", str(origin), "main", "agent/a1")
    (wt.path / ".git").unlink()
    (wt.path / ".git").mkdir()  # the agent made .git a directory (its own repository)
    (wt.path / "new.txt").write_text("new\n")
    again = workspace.prepare("a1", str(origin), "main", "agent/a1")
    assert again.path == wt.path and (wt.path / "new.txt").exists()  # the work is kept
    assert (wt.path / ".git").is_file()
    commit = workspace.commit(again, "m", "agent-a1", "a1@agents.invalid", "main")
    assert commit is not None
    mirror = workspace.mirror_path(str(origin))
    assert "new.txt" in git("--git-dir", str(mirror), "ls-tree", "--name-only", commit).split()
    (wt.path / ".git").unlink()  # deleted outright: the worktree (and its uncommitted work) is still kept
    (wt.path / "more.txt").write_text("more\n")
    workspace.prepare("a1", str(origin), "main", "agent/a1")
    assert (wt.path / "more.txt").exists() and (wt.path / ".git").is_file()


def test_push_to_a_local_bare_origin_with_credentials_configured(tmp_path: Path, origin: Path) -> None:
    password = secrets.token_hex(12)
    creds = tmp_path / "git-credentials"
    creds.write_text(f"https://fleet:{password}@example.invalid\n")
    workspace = Workspace(tmp_path / "ws", credentials_file=creds, git_timeout=60)
    wt = workspace.prepare("a1", str(origin), "main", "agent/a1")
    (wt.path / "pushed.txt").write_text("pushed\n")
    commit = workspace.commit(wt, "push me", "agent-a1", "a1@agents.invalid", "main")
    assert commit is not None
    workspace.push(wt)
    assert git("--git-dir", str(origin), "rev-parse", "refs/heads/agent/a1").strip() == commit
    mirror_config = (workspace.mirror_path(str(origin)) / "config").read_text()
    assert password not in mirror_config and "credential" not in mirror_config and str(creds) not in mirror_config
    assert creds.read_text() == f"https://fleet:{password}@example.invalid\n"


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        if auth is None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="fleet"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        type(self).seen.append(auth)
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def auth_server() -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    handler = type("Handler", (_AuthHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_uses_the_credentials_file_only_through_a_read_only_helper(tmp_path: Path,
                                                                         auth_server: tuple[str, list[str]]) -> None:
    host, seen = auth_server
    password = secrets.token_hex(12)
    creds = tmp_path / "git-credentials"
    line = f"http://fleet:{password}@{host}\n"
    creds.write_text(line)
    workspace = Workspace(tmp_path / "ws", credentials_file=creds, git_timeout=60)
    repo = f"http://{host}/repo.git"
    with pytest.raises(WorkspaceError) as failed:
        workspace.sync_mirror(repo)
    assert seen and seen[0] == "Basic " + base64.b64encode(f"fleet:{password}".encode()).decode()
    assert password not in str(failed.value) and "403" in str(failed.value)
    assert creds.read_text() == line  # git's "erase" after the rejected login never reached the file
    mirror_config = (workspace.mirror_path(repo) / "config").read_text()
    assert password not in mirror_config and "credential" not in mirror_config
    # Without a credentials file git has nothing to answer the server with (and never prompts).
    bare = Workspace(tmp_path / "ws2", git_timeout=60)
    seen.clear()
    with pytest.raises(WorkspaceError) as no_creds:
        bare.sync_mirror(repo)
    assert seen == [] and "could not read Username" in str(no_creds.value)


def test_the_safe_flags_switch_off_what_runs_programs() -> None:
    flags = dict(pair.split("=", 1) for pair in SAFE_GIT_FLAGS[1::2])
    assert flags["core.hooksPath"] == "/dev/null" and flags["core.fsmonitor"] == "false"
    assert flags["core.attributesFile"] == "/dev/null" and flags["protocol.ext.allow"] == "never"
    assert flags["credential.helper"] == "" and flags["commit.gpgsign"] == "false"
    assert all(flag == "-c" for flag in SAFE_GIT_FLAGS[0::2])


def _processes_mentioning(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if token.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_hanging_git_is_killed_at_the_timeout_and_runs_with_a_scrubbed_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-ant-" + secrets.token_hex(12)
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    monkeypatch.setenv("ORCHESTRATOR_BROKER_URL", f"redis://:{secret}@valkey:6379/0")
    token = "hang" + secrets.token_hex(6)
    environments: list[bytes] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for pid in _processes_mentioning(token):
                if pid == os.getpid():
                    continue
                try:
                    with open(f"/proc/{pid}/environ", "rb") as handle:
                        environments.append(handle.read())
                except OSError:
                    pass
            time.sleep(0.05)

    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        repo = f"http://127.0.0.1:{listener.getsockname()[1]}/{token}.git"
        workspace = Workspace(tmp_path / "ws", git_timeout=2)
        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        try:
            with pytest.raises(WorkspaceError, match="timed out after 2s"):
                workspace.sync_mirror(repo)
        finally:
            stop.set()
            watcher.join()
        assert time.monotonic() - started < 8
    deadline = time.monotonic() + 3
    while _processes_mentioning(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(token) == []  # git and its remote helper were killed
    assert environments, "never saw the hanging git process"
    for environ in environments:
        names = dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)
        assert secret.encode() not in environ and b"ANTHROPIC_API_KEY" not in names
        assert not any(name.startswith(b"ORCHESTRATOR_") for name in names)
        assert names[b"GIT_CONFIG_NOSYSTEM"] == b"1" and names[b"GIT_CONFIG_GLOBAL"] == b"/dev/null"
        assert names[b"HOME"] == str((tmp_path / "ws" / "git-home").resolve()).encode()
        assert names[b"GIT_TERMINAL_PROMPT"] == b"0" and names[b"LANG"] == b"C"
