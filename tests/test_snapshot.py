"""Worktree snapshots: an agent's work (commits, uncommitted and untracked files) rebuilt exactly on another host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.testing.sample_repo import make_sample_repo
from orchestrator.workspace import Workspace, WorkspaceError, Worktree


def status(wt: Worktree) -> str:
    out = subprocess.run(["git", "-C", str(wt.path), "status", "--porcelain=v1", "--untracked-files=all"],
                         capture_output=True, text=True, check=True).stdout
    return "\n".join(sorted(out.splitlines()))


def head(wt: Worktree) -> str:
    return subprocess.run(["git", "-C", str(wt.path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def files(wt: Worktree) -> dict[str, str]:
    return {str(p.relative_to(wt.path)): p.read_text() for p in sorted(wt.path.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(wt.path).parts}


def test_a_snapshot_rebuilds_the_worktree_exactly_on_an_empty_host(tmp_path: Path) -> None:
    repo = str(make_sample_repo(tmp_path / "repo"))
    here = Workspace(tmp_path / "host-a")
    wt = here.prepare("a1", repo, "main", "agent/a1")
    (wt.path / "calc.py").write_text("def add(a, b):\n    return a + b\n")  # committed below
    here.commit(wt, "round 1", "agent-a1", "a1@agents", "main")
    (wt.path / "README.md").write_text("changed, not committed\n")  # uncommitted
    (wt.path / "test_calc.py").unlink()  # deleted, not committed
    (wt.path / "notes").mkdir()
    (wt.path / "notes" / "todo.txt").write_text("untracked\n")  # untracked
    (wt.path / ".gitignore").write_text("build/\n")
    (wt.path / "build").mkdir()
    (wt.path / "build" / "out.bin").write_text("ignored\n")  # ignored: not part of the work
    before = (status(wt), head(wt), files(wt))
    snap = here.snapshot(wt, "a1", "main")
    assert snap is not None and snap.head == head(wt)
    assert (status(wt), head(wt), files(wt)) == before  # taking it changed nothing

    there = Workspace(tmp_path / "host-b")  # another host: an empty workspace directory
    rebuilt = there.prepare("a1", repo, "main", "agent/a1", snapshot=snap.bundle)
    assert head(rebuilt) == before[1]
    assert status(rebuilt) == before[0]
    expected = {k: v for k, v in before[2].items() if not k.startswith("build/")}
    assert files(rebuilt) == expected


def test_an_unchanged_worktree_makes_no_new_snapshot(tmp_path: Path) -> None:
    repo = str(make_sample_repo(tmp_path / "repo"))
    ws = Workspace(tmp_path / "ws")
    wt = ws.prepare("a1", repo, "main", "agent/a1")
    (wt.path / "new.txt").write_text("one\n")
    first = ws.snapshot(wt, "a1", "main")
    assert first is not None
    assert ws.snapshot(wt, "a1", "main", previous=first.key) is None
    (wt.path / "new.txt").write_text("two\n")
    second = ws.snapshot(wt, "a1", "main", previous=first.key)
    assert second is not None and second.key != first.key


def test_a_same_size_rewrite_within_one_clock_tick_changes_the_fingerprint(tmp_path: Path) -> None:
    """File times come from a coarse clock: an in-place rewrite in the same tick keeps size, mtime and inode."""
    import os

    repo = str(make_sample_repo(tmp_path / "repo"))
    ws = Workspace(tmp_path / "ws")
    wt = ws.prepare("a1", repo, "main", "agent/a1")
    target = wt.path / "calc.py"
    before = os.stat(target)
    first = ws.fingerprint(wt)
    with open(target, "r+") as f:  # in place: same inode, same size
        text = f.read()
        f.seek(0)
        f.write(text.replace("a - b", "a + b"))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # as if within the same tick
    after = os.stat(target)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert ws.fingerprint(wt) != first


def test_with_a_memo_an_unchanged_worktree_keeps_its_fingerprint_past_the_racy_window(tmp_path: Path) -> None:
    """A run's memo keeps hashed content in the digest, so an unchanged worktree costs no git look later, and a
    rewrite within the tick of the first look still shows once that tick is over."""
    import os
    import time

    from orchestrator.workspace import RACY_SECONDS

    repo = str(make_sample_repo(tmp_path / "repo"))
    ws = Workspace(tmp_path / "ws")
    wt = ws.prepare("a1", repo, "main", "agent/a1")
    target = wt.path / "notes.txt"
    target.write_text("first\n")
    memo: dict[str, tuple[tuple[int, ...], bytes, bool]] = {}
    first = ws.fingerprint(wt, memo)
    time.sleep(RACY_SECONDS * 1.5)  # the clock itself is what is under test
    assert ws.fingerprint(wt, memo) == first  # nothing changed: still equal past the racy window

    target.write_text("again\n")
    memo.clear()
    before = os.stat(target)
    second = ws.fingerprint(wt, memo)
    with open(target, "r+") as f:  # rewritten in place within the same tick: every stat field the same
        f.write("AGAIN\n")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(RACY_SECONDS * 1.5)
    assert ws.fingerprint(wt, memo) != second


def test_restoring_on_the_same_host_drops_what_came_after_the_snapshot(tmp_path: Path) -> None:
    repo = str(make_sample_repo(tmp_path / "repo"))
    ws = Workspace(tmp_path / "ws")
    wt = ws.prepare("a1", repo, "main", "agent/a1")
    (wt.path / "kept.txt").write_text("before the checkpoint\n")
    snap = ws.snapshot(wt, "a1", "main")
    assert snap is not None
    # A tool cut mid-way after the checkpoint: half its effect reached the disk, and the run committed it.
    (wt.path / "kept.txt").write_text("before the checkpoint\nhalf of a cut command\n")
    (wt.path / "stray.txt").write_text("from the cut command\n")
    ws.commit(wt, "killed", "agent-a1", "a1@agents", "main")
    again = ws.prepare("a1", repo, "main", "agent/a1", snapshot=snap.bundle)
    assert files(again) == {"README.md": files(again)["README.md"], "calc.py": files(again)["calc.py"],
                            "test_calc.py": files(again)["test_calc.py"], "kept.txt": "before the checkpoint\n"}
    assert head(again) == snap.head  # the commit made after the checkpoint is not on the branch any more


def test_a_snapshot_over_the_cap_is_refused(tmp_path: Path) -> None:
    repo = str(make_sample_repo(tmp_path / "repo"))
    ws = Workspace(tmp_path / "ws")
    wt = ws.prepare("a1", repo, "main", "agent/a1")
    (wt.path / "big.bin").write_bytes(os.urandom(3 << 20))  # 3 MiB that do not compress
    with pytest.raises(WorkspaceError, match="SNAPSHOT_MAX_MB"):
        ws.snapshot(wt, "a1", "main", max_bytes=1 << 20)
