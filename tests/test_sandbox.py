"""The sandbox, for real: bubblewrap, real processes, real cgroups/rlimits, real git (no fleet, no mocks)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.agent.tools import Toolbox, safe_env
from orchestrator.sandbox import (
    GitView,
    Sandbox,
    SandboxConfig,
    SandboxUnavailable,
    check_available,
    limits_backend,
)
from orchestrator.settings import Settings
from orchestrator.testing.sample_repo import make_sample_repo
from orchestrator.workspace import Workspace

REPO_ROOT = Path(__file__).resolve().parent.parent
# Big read-only trees (the system and the toolchains): searched by name only, not grepped for secrets.
PRUNE = "-path /proc -o -path /sys -o -path /dev -o -path /usr -o -path /opt -o -path /root/.rustup"


@dataclass
class Layout:
    root: Path  # the workspace root
    worktree: Path  # ours
    other: Path  # another agent's worktree, same root


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    root = tmp_path / "ws"
    worktree, other = root / "worktrees" / "agent-a", root / "worktrees" / "agent-b"
    worktree.mkdir(parents=True)
    other.mkdir(parents=True)
    return Layout(root, worktree, other)


def run(sandbox: Sandbox, command: str, timeout: float = 60.0) -> tuple[int, str]:
    """Spawn ``command`` the way the Toolbox does; returns (exit code, output)."""
    launch = sandbox.launch(command)
    proc = subprocess.Popen(launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"command did not finish within {timeout}s: {command}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        launch.cleanup()
    return proc.returncode, out.decode("utf-8", errors="replace")


def steps(output: str) -> dict[str, int]:
    """``name=rc`` lines printed by a command."""
    found = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep and value.strip().lstrip("-").isdigit() and name.isidentifier():
            found[name] = int(value)
    return found


def host_processes(token: str) -> list[int]:
    """Live host processes whose name (argv[0], set with ``exec -a``) starts with ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline.startswith(token.encode()) and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def wait_for(predicate: object, seconds: float = 5.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def token() -> str:
    return "tok" + secrets.token_hex(6)


# --- what is visible ---------------------------------------------------------------------------------------------


def test_no_secret_of_the_worker_is_readable_inside(layout: Layout, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    secret = "sk-ant-" + secrets.token_hex(16)
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    monkeypatch.setenv("ORCHESTRATOR_STATE_URL", f"redis://:{secret}@valkey:6379/0")
    (layout.root / ".env").write_text(f"ANTHROPIC_API_KEY={secret}\n")  # the worker's files, next to the workspace
    (tmp_path / "worker.env").write_text(secret)
    encoded = base64.b64encode(secret.encode()).decode()  # the command never holds the secret in clear
    sandbox = Sandbox(SandboxConfig(), layout.worktree, safe_env())
    _, out = run(sandbox, f"""
        pat=$(echo {encoded} | base64 -d)
        echo "procs=$(ls /proc | grep -cE '^[0-9]+$')"
        echo --- environ; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'
        echo --- env; env
        echo --- files
        find / \\( {PRUNE} \\) -prune -o -type f -print0 2>/dev/null | xargs -0 grep -lsF -- "$pat"
        echo --- end
    """, timeout=120)
    assert secret not in out and "sk-ant-" not in out
    found = steps(out)
    assert 1 <= found["procs"] <= 8, out  # bwrap's init, bash and its pipeline: not the host's processes
    assert "PYTEST_CURRENT_TEST" not in out  # set in the worker's environment: no /proc view of the worker
    files = out.split("--- files\n", 1)[1].split("--- end", 1)[0]
    assert files.strip() == "", files
    assert "HOME=/tmp/home" in out and "GIT_TERMINAL_PROMPT=0" in out


def test_other_worktrees_and_the_home_are_invisible(layout: Layout, tmp_path: Path, token: str) -> None:
    (layout.other / f"OTHER_MARKER_{token}").write_text("theirs")
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    (fake_home / ".git-credentials").write_text(f"https://user:{token}-fake@example.com\n")
    real = Path.home() / ".git-credentials"
    planted = not real.exists()
    if planted:
        real.write_text(f"https://user:{token}-real@example.com\n")
    try:
        env = safe_env()
        sandbox = Sandbox(SandboxConfig(), layout.worktree, env)
        _, out = run(sandbox, f"""
            find / -path /proc -prune -o -name 'OTHER_MARKER*' -print 2>/dev/null
            echo "root_listing=$(ls -A /root | tr '\\n' ' ')"
            cat /root/.git-credentials; echo "cat_real=$?"
            ls {layout.root}/worktrees; echo "ws=$(ls -A {layout.root} | tr '\\n' ' ')"
        """, timeout=120)
        env["HOME"] = str(fake_home)
        _, out2 = run(Sandbox(SandboxConfig(), layout.worktree, env),
                          f"cat {fake_home}/.git-credentials; echo cat_fake=$?; ls -A {fake_home}")
    finally:
        if planted:
            real.unlink()
    assert "OTHER_MARKER" not in out and "agent-b" not in out
    assert token not in out and token not in out2
    assert steps(out)["cat_real"] != 0 and steps(out2)["cat_fake"] != 0
    listing = out.split("root_listing=", 1)[1].splitlines()[0].split()
    assert set(listing) <= {".pyenv", ".cargo", ".rustup", ".local"}, listing  # toolchains only
    assert ".git-credentials" not in listing
    assert out.split("ws=", 1)[1].split() == ["worktrees"]


def test_writes_outside_the_worktree_leave_nothing_on_the_host(layout: Layout, token: str) -> None:
    name = f"w-{token}"
    _, out = run(Sandbox(SandboxConfig(), layout.worktree, safe_env()), f"""
        echo x > /tmp/{name}; echo "tmp=$?"
        echo x > "$HOME/{name}"; echo "home=$?"
        echo x > ../{name}; echo "above=$?"
        echo x > {layout.root}/{name}; echo "root=$?"
        echo x > /{name}; echo "slash=$?"
        echo x > /usr/{name}; echo "usr=$?"
        echo x > /etc/{name}; echo "etc=$?"
        echo ok > inside-{name}; echo "inside=$?"
        cat /tmp/{name} "$HOME/{name}"
    """)
    found = steps(out)
    assert found["tmp"] == found["home"] == found["inside"] == 0, out
    assert found["slash"] != 0 and found["usr"] != 0 and found["etc"] != 0 and "Read-only file system" in out
    for path in (Path("/tmp") / name, Path.home() / name, layout.worktree.parent / name, layout.root / name,
                 Path("/") / name, Path("/usr") / name, Path("/etc") / name):
        assert not path.exists(), path
    assert (layout.worktree / f"inside-{name}").read_text() == "ok\n"


def test_hidden_paths_are_masked_and_invisible_ones_not_revealed(layout: Layout, token: str) -> None:
    creds = layout.worktree / "creds.txt"
    creds.write_text(token)
    private = layout.worktree / "private"
    private.mkdir()
    (private / "key").write_text(token)
    elsewhere = layout.root / f"elsewhere-{token}"
    elsewhere.write_text(token)
    sandbox = Sandbox(SandboxConfig(), layout.worktree, safe_env(), hide=[creds, private, elsewhere])
    launch = sandbox.launch("true")
    launch.cleanup()
    assert str(elsewhere) not in launch.argv  # not visible anyway: its name is not even mentioned
    _, out = run(sandbox, """
        echo "creds_bytes=$(cat creds.txt | wc -c)"; echo "private_entries=$(ls -A private | wc -l)"
        echo "shadow_bytes=$(cat /etc/shadow | wc -c)"; echo "ssh_entries=$(ls -A /etc/ssh | wc -l)"
        echo x > creds.txt; echo "write_creds=$?"
    """)
    found = steps(out)
    assert token not in out
    assert found["creds_bytes"] == 0 and found["private_entries"] == 0
    assert found["shadow_bytes"] == 0 and found["ssh_entries"] == 0
    assert found["write_creds"] != 0
    assert creds.read_text() == token and (private / "key").read_text() == token


@pytest.mark.parametrize("network", ["none", "host"])
def test_network_none_cuts_the_host_loopback(layout: Layout, network: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.settimeout(5)
        port = server.getsockname()[1]
        sandbox = Sandbox(SandboxConfig(network=network), layout.worktree, safe_env())  # type: ignore[arg-type]
        code, out = run(sandbox, f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected")
        if network == "none":
            assert code != 0 and "connected" not in out
        else:
            assert code == 0 and "connected" in out, out
            conn, _ = server.accept()
            conn.close()


# --- processes -----------------------------------------------------------------------------------------------------


def test_daemonized_leftovers_die_when_the_command_returns(layout: Layout, token: str) -> None:
    sandbox = Sandbox(SandboxConfig(), layout.worktree, safe_env())
    launch = sandbox.launch(f"""
        setsid bash -c 'exec -a {token}-setsid sleep 600' &
        nohup bash -c 'exec -a {token}-nohup sleep 600' >/dev/null 2>&1 &
        ( ( exec -a {token}-double sleep 600 & ) & )
        setsid bash -c 'while :; do date +%s%N > heartbeat; sleep 0.05; done' >/dev/null 2>&1 &
        sleep 1.5; echo done
    """)
    proc = subprocess.Popen(launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: len(host_processes(token)) == 3), host_processes(token)  # they did start
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        launch.cleanup()
    assert proc.returncode == 0 and b"done" in out
    assert wait_for(lambda: host_processes(token) == [], 2.0), host_processes(token)
    beat = (layout.worktree / "heartbeat").read_text()
    time.sleep(0.4)
    assert (layout.worktree / "heartbeat").read_text() == beat  # the setsid loop is gone too


def test_killing_the_leaders_group_tears_the_sandbox_down(layout: Layout, token: str) -> None:
    sandbox = Sandbox(SandboxConfig(), layout.worktree, safe_env())
    launch = sandbox.launch(f"setsid bash -c 'exec -a {token}-daemon sleep 600' & exec -a {token}-main sleep 600")
    proc = subprocess.Popen(launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: len(host_processes(token)) == 2), host_processes(token)
        os.killpg(proc.pid, signal.SIGKILL)  # what the Toolbox does; cleanup() not called yet
        proc.wait(timeout=5)
        assert wait_for(lambda: host_processes(token) == [], 2.0), host_processes(token)  # --die-with-parent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        launch.cleanup()


def test_cleanup_kills_what_is_left_in_the_commands_cgroup(layout: Layout, token: str) -> None:
    if limits_backend() == "rlimit":
        pytest.skip("no cgroup on this host: cleanup has nothing to kill by")
    sandbox = Sandbox(SandboxConfig(), layout.worktree, safe_env())
    launch = sandbox.launch(f"exec -a {token} sleep 600")
    proc = subprocess.Popen(launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: len(host_processes(token)) == 1)
        launch.cleanup()  # no signal sent by us: the cgroup kill alone must end it
        proc.wait(timeout=5)
        assert proc.returncode != 0
        assert wait_for(lambda: host_processes(token) == [], 2.0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    launch.cleanup()  # idempotent


def test_per_command_cgroups_are_removed(layout: Layout) -> None:
    backend = limits_backend()
    if backend == "rlimit":
        pytest.skip("no cgroup on this host")
    sandbox = Sandbox(SandboxConfig(), layout.worktree, safe_env())
    launch = sandbox.launch("cat /proc/self/cgroup >/dev/null")
    directories = [directory for _, directory in launch._cgroups]
    assert directories and all(d.is_dir() for d in directories)
    assert all(d.parent.name == "orchestrator-sandbox" for d in directories)
    proc = subprocess.run(launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, start_new_session=True, check=False)
    launch.cleanup()
    assert proc.returncode == 0, proc.stdout
    assert wait_for(lambda: not any(d.exists() for d in directories), 3.0), directories


# --- limits --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limits", ["auto", "rlimit"])
def test_a_memory_hog_fails_and_the_sandbox_stays_usable(layout: Layout, limits: str) -> None:
    sandbox = Sandbox(SandboxConfig(memory_mb=128, limits=limits), layout.worktree,  # type: ignore[arg-type]
                      safe_env())
    started = time.monotonic()
    code, out = run(sandbox, "/usr/bin/python3 -c \"b = b'x' * (1024 * 1024 * 1024); print('allocated', len(b))\"")
    assert code != 0 and "allocated" not in out, out
    assert time.monotonic() - started < 30
    assert run(sandbox, "echo still-fine") == (0, "still-fine\n")


def test_a_fork_bomb_is_stopped_by_the_process_limit(layout: Layout, token: str) -> None:
    if limits_backend() == "rlimit" and os.geteuid() == 0:
        pytest.skip("RLIMIT_NPROC does not bind root: the documented gap")
    sandbox = Sandbox(SandboxConfig(max_processes=32), layout.worktree, safe_env())
    started = time.monotonic()
    code, out = run(sandbox, f"exec -a {token} /usr/bin/python3 -c 'import os\nwhile True: os.fork()'")
    assert time.monotonic() - started < 20
    assert code != 0 and "Resource temporarily unavailable" in out, out[-2000:]
    assert wait_for(lambda: host_processes(token) == [], 3.0)
    assert run(sandbox, "echo still-fine") == (0, "still-fine\n")


def test_a_file_bigger_than_the_limit_fails(layout: Layout) -> None:
    sandbox = Sandbox(SandboxConfig(max_file_mb=4), layout.worktree, safe_env())
    _, out = run(sandbox, "head -c 50M /dev/zero > big.bin; echo rc=$?; head -c 3M /dev/zero > ok.bin; echo ok=$?")
    found = steps(out)
    assert found["rc"] != 0 and found["ok"] == 0, out
    assert (layout.worktree / "big.bin").stat().st_size <= 4 * 1024 * 1024
    assert (layout.worktree / "ok.bin").stat().st_size == 3 * 1024 * 1024


def test_the_private_tmp_is_capped(layout: Layout) -> None:
    sandbox = Sandbox(SandboxConfig(memory_mb=64, max_file_mb=1024, limits="rlimit"), layout.worktree, safe_env())
    _, out = run(sandbox, "head -c 200M /dev/zero > /tmp/fill; echo rc=$?; du -m /tmp/fill | cut -f1")
    assert steps(out)["rc"] != 0 and "No space left on device" in out, out
    assert int(out.strip().splitlines()[-1]) <= 64


# --- toolchains and git --------------------------------------------------------------------------------------------


def test_python_and_pytest_from_the_workers_path_work_inside(layout: Layout) -> None:
    (layout.worktree / "test_tiny.py").write_text("def test_tiny():\n    assert 1 + 1 == 2\n")
    sandbox = Sandbox(SandboxConfig(), layout.worktree, safe_env())
    code, out = run(sandbox, "python -c 'import pytest; print(\"import-ok\")' && "
                             "python -m pytest -q -p no:cacheprovider test_tiny.py", timeout=120)
    assert code == 0, out
    assert "import-ok" in out and "1 passed" in out


def test_a_toolchain_on_path_is_exposed_read_only_with_its_credentials_masked(layout: Layout, tmp_path: Path,
                                                                              token: str) -> None:
    tool = tmp_path / "tools" / "mytool"
    (tool / "bin").mkdir(parents=True)
    (tool / "bin" / "hello").write_text("#!/bin/sh\necho hello-from-tool\n")
    (tool / "bin" / "hello").chmod(0o755)
    (tool / "credentials.toml").write_text(f"token = '{token}'\n")
    (tmp_path / "sentinel").write_text(token)
    env = safe_env()
    env["PATH"] = f"{tool / 'bin'}:/usr/bin:/bin"
    _, out = run(Sandbox(SandboxConfig(), layout.worktree, env), f"""
        hello
        echo "creds_bytes=$(cat {tool}/credentials.toml | wc -c)"
        echo x > {tool}/new; echo "tool_write=$?"
        echo "listing=$(ls -A {tmp_path} | tr '\n' ' ')"
    """)
    found = steps(out)
    assert "hello-from-tool" in out and found["creds_bytes"] == 0 and found["tool_write"] != 0, out
    assert token not in out
    assert out.split("listing=", 1)[1].split() == ["tools", "ws"]  # skeleton dirs only, no sentinel
    assert not (tool / "new").exists()


def test_a_home_on_path_is_never_exposed(layout: Layout, tmp_path: Path, token: str) -> None:
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (home / "bin" / "tool").chmod(0o755)
    (home / ".git-credentials").write_text(token)
    env = safe_env()
    env.update(HOME=str(home), PATH=f"{home / 'bin'}:/usr/bin:/bin")
    sandbox = Sandbox(SandboxConfig(), layout.worktree, env)
    launch = sandbox.launch("true")
    launch.cleanup()
    assert str(home) not in launch.argv
    _, out = run(sandbox, f"cat {home}/.git-credentials; echo cat=$?; tool; echo tool=$?")
    assert token not in out and steps(out)["cat"] != 0 and steps(out)["tool"] != 0


def test_the_projects_venv_works_inside_without_exposing_the_project(layout: Layout) -> None:
    venv = REPO_ROOT / ".venv"
    if not (venv / "pyvenv.cfg").exists():
        pytest.skip("no .venv in the repository")
    env = safe_env()
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    code, out = run(Sandbox(SandboxConfig(), layout.worktree, env), f"""
        python -c 'import sys, pytest; print("prefix=" + sys.prefix)'
        echo "listing=$(ls -A {REPO_ROOT} | tr '\n' ' ')"
    """, timeout=120)
    assert code == 0, out
    assert f"prefix={venv}" in out
    assert out.split("listing=", 1)[1].split() == [".venv"]


def test_git_is_read_only_inside(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    workspace = Workspace(tmp_path / "ws")
    wt = workspace.prepare("a1", str(repo), "main", "agent/a1")
    workspace.prepare("a2", str(repo), "main", "agent/a2")
    view = workspace.git_view("a1", str(repo))
    assert view == GitView(admin_dir=view.common_dir / "worktrees" / "a1", common_dir=workspace.mirror_path(str(repo)))
    config_before = (view.common_dir / "config").read_bytes()
    assert b"url = " in config_before
    refs_before = subprocess.run(["git", "--git-dir", str(view.common_dir), "for-each-ref"], capture_output=True,
                                 text=True, check=True).stdout
    sandbox = Sandbox(SandboxConfig(), wt.path, safe_env(), git=view)
    common = view.common_dir
    _, out = run(sandbox, f"""
        git status >/dev/null; echo status=$?
        echo '# changed' >> calc.py
        git diff | grep -q '# changed'; echo diff=$?
        git log --oneline -1; echo log=$?
        echo "worktrees=$(ls {common}/worktrees | tr '\\n' ' ')"
        echo "url_lines=$(grep -c url {common}/config)"
        git config --get remote.origin.url; echo remote=$?
        git config filter.x.clean 'touch /tmp/pwned'; echo config_write=$?
        echo evil > {common}/hooks/pre-commit; echo hook_write=$?
        echo evil > {common}/worktrees/a1/config.worktree; echo admin_write=$?
        git commit -qam sneaky; echo commit=$?
        git branch -f other HEAD; echo branch=$?
        git push {common} HEAD:refs/heads/pushed; echo push=$?
        git push origin HEAD; echo push_origin=$?
    """)
    found = steps(out)
    assert found["status"] == found["diff"] == found["log"] == 0, out
    assert out.split("worktrees=", 1)[1].splitlines()[0].split() == ["a1"]
    assert found["url_lines"] == 0 and found["remote"] != 0
    for step in ("config_write", "hook_write", "admin_write", "commit", "branch", "push", "push_origin"):
        assert found[step] != 0, (step, out)
    assert (common / "config").read_bytes() == config_before
    assert not (common / "hooks" / "pre-commit").exists()
    assert not (common / "worktrees" / "a1" / "config.worktree").exists()
    refs_after = subprocess.run(["git", "--git-dir", str(common), "for-each-ref"], capture_output=True, text=True,
                                check=True).stdout
    assert refs_after == refs_before


# --- availability, mode off ----------------------------------------------------------------------------------------


def test_check_available_passes_here_and_for_mode_off() -> None:
    check_available(SandboxConfig())
    check_available(SandboxConfig(mode="off", bwrap="/nonexistent/bwrap"))


def test_check_available_says_how_to_fix_a_missing_bwrap(layout: Layout) -> None:
    config = SandboxConfig(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable) as missing:
        check_available(config)
    message = str(missing.value)
    assert "/nonexistent/bwrap" in message and "not found" in message
    assert "apt-get install bubblewrap" in message and "seccomp=unconfined" in message
    assert "ORCHESTRATOR_SANDBOX=off" in message
    with pytest.raises(SandboxUnavailable):
        Sandbox(config, layout.worktree, safe_env())


def test_check_available_reports_an_unusable_bwrap_and_caches_the_verdict(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    config = SandboxConfig(bwrap=str(fake))
    with pytest.raises(SandboxUnavailable) as unusable:
        check_available(config)
    message = str(unusable.value)
    assert "cannot create a sandbox here" in message and "No permissions to creating new namespace" in message
    assert "apparmor=unconfined" in message and "ORCHESTRATOR_SANDBOX=off" in message
    fake.write_text("#!/bin/sh\nexit 0\n")  # now it would pass, but the verdict is per process
    with pytest.raises(SandboxUnavailable):
        check_available(config)


def test_mode_off_runs_plain_bash_unconfined(layout: Layout) -> None:
    env = {"PATH": "/usr/bin:/bin", "MARK": "visible"}
    sandbox = Sandbox(SandboxConfig(mode="off", bwrap="/nonexistent"), layout.worktree, env)
    launch = sandbox.launch("echo $MARK; ls /proc | grep -cE '^[0-9]+$'")
    assert launch.argv == ["/bin/bash", "-c", "echo $MARK; ls /proc | grep -cE '^[0-9]+$'"]
    assert launch.cwd == str(layout.worktree) and launch.env == env
    code, out = run(sandbox, "echo $MARK; test -e /proc/1 && echo host-proc; pwd")
    assert code == 0 and out.split() == ["visible", "host-proc", str(layout.worktree)]


def test_config_from_settings() -> None:
    settings = Settings(sandbox="off", sandbox_network="host", sandbox_memory_mb=256, sandbox_max_processes=64,
                        sandbox_max_file_mb=10, _env_file=None)
    assert SandboxConfig.from_settings(settings) == SandboxConfig(mode="off", network="host", memory_mb=256,
                                                                   max_processes=64, max_file_mb=10)


# --- through the Toolbox -------------------------------------------------------------------------------------------


def test_toolbox_runs_commands_through_the_sandbox(layout: Layout) -> None:
    box = Toolbox(layout.worktree, shell_timeout=30, sandbox=Sandbox(SandboxConfig(), layout.worktree, safe_env()))
    result = box.run("bash", {"command": "pwd; echo $HOME; test -e /proc/1/environ && echo own-pid-ns; exit 3"})
    assert result.content.splitlines() == [str(layout.worktree), "/tmp/home", "own-pid-ns", "[exit code: 3]"]


def test_toolbox_timeout_ends_a_sandboxed_command_and_its_daemons(layout: Layout, token: str) -> None:
    box = Toolbox(layout.worktree, shell_timeout=1, sandbox=Sandbox(SandboxConfig(), layout.worktree, safe_env()))
    started = time.monotonic()
    result = box.run("bash", {"command": f"setsid bash -c 'exec -a {token} sleep 600' & sleep 600"})
    assert time.monotonic() - started < 4
    assert result.is_error and "timed out" in result.content
    assert wait_for(lambda: host_processes(token) == [], 2.0)


def test_toolbox_kill_running_stops_a_sandboxed_command_at_once(layout: Layout, token: str) -> None:
    box = Toolbox(layout.worktree, shell_timeout=60, sandbox=Sandbox(SandboxConfig(), layout.worktree, safe_env()))
    results = []
    worker = threading.Thread(target=lambda: results.append(
        box.run("bash", {"command": f"setsid bash -c 'exec -a {token} sleep 600' & sleep 600"})))
    worker.start()
    try:
        assert wait_for(lambda: len(host_processes(token)) == 1)
        killed_at = time.monotonic()
        assert box.kill_running() is True
        worker.join(timeout=5)
        assert not worker.is_alive() and time.monotonic() - killed_at < 2
    finally:
        box.kill_running()
        worker.join(timeout=5)
    assert "[command was killed]" in results[0].content
    assert wait_for(lambda: host_processes(token) == [], 2.0)


# --- unprivileged --------------------------------------------------------------------------------------------------

_UNPRIVILEGED = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from orchestrator.sandbox import Sandbox, SandboxConfig, check_available, limits_backend

worktree = Path(sys.argv[2])
env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
check_available(SandboxConfig())

def run(config, command):
    launch = Sandbox(config, worktree, env).launch(command)
    try:
        proc = subprocess.run(launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, start_new_session=True)
    finally:
        launch.cleanup()
    return [proc.returncode, proc.stdout.decode(errors="replace")[-3000:]]

print(json.dumps({
    "uid": os.getuid(),
    "backend": limits_backend(),
    "basic": run(SandboxConfig(), "id -u; echo made > made-inside; ls /proc | grep -cE '^[0-9]+$'; "
                                  "grep -c . /proc/self/uid_map; echo h > $HOME/h && cat $HOME/h; "
                                  "grep CapEff /proc/self/status"),
    "bomb": run(SandboxConfig(max_processes=40), "python3 -c 'import os\nwhile True: os.fork()'"),
    "hog": run(SandboxConfig(memory_mb=128), "python3 -c \"b = b'x' * (1 << 30); print('allocated')\""),
    "fsize": run(SandboxConfig(max_file_mb=2), "head -c 10M /dev/zero > big; echo rc=$?"),
}))
"""


@pytest.fixture
def nobody_worktree() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sandbox-nobody-", dir="/tmp"))
    os.chown(path, 65534, 65534)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_as_an_unprivileged_user(nobody_worktree: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, setpriv and a system python3 to switch to uid 65534")
    # A copy of the package that uid 65534 can read wherever the checkout lives (a fresh clone may sit in a 0700
    # directory).
    readable = Path(tempfile.mkdtemp(prefix="sandbox-nobody-src-", dir="/tmp"))
    readable.chmod(0o755)
    shutil.copytree(REPO_ROOT / "orchestrator", readable / "orchestrator",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [readable, *readable.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", _UNPRIVILEGED,
             str(readable), str(nobody_worktree)],
            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"},
            cwd=nobody_worktree, capture_output=True, text=True, timeout=180, check=False,
        )
    finally:
        shutil.rmtree(readable, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["uid"] == 65534 and report["backend"] == "rlimit"
    code, out = report["basic"]
    assert code == 0, out
    lines = out.split()
    assert lines[0] == "65534" and int(lines[1]) <= 6 and lines[2] == "1" and lines[3] == "h"
    assert lines[-1] == "0000000000000000"
    made = nobody_worktree / "made-inside"
    assert made.read_text() == "made\n" and made.stat().st_uid == 65534
    code, out = report["bomb"]
    assert code != 0 and "Resource temporarily unavailable" in out, out
    code, out = report["hog"]
    assert code != 0 and "allocated" not in out and "MemoryError" in out, out
    code, out = report["fsize"]
    assert steps(out)["rc"] != 0 and (nobody_worktree / "big").stat().st_size <= 2 * 1024 * 1024
