"""Repository mirrors and one git worktree and branch per agent under ``ORCHESTRATOR_WORKSPACE_DIR``.

A mirror is a bare clone of the coordinator's repository, shared by every agent on the host that works on it;
an flock per mirror serialises fetches and worktree changes between processes. Agent branches live in the
mirror's ``refs/heads``; the origin's branches are fetched into ``refs/remotes/origin`` so a fetch never
touches an agent's branch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import git

from orchestrator.settings import redact_text, redact_url

GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/true", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}


class WorkspaceError(RuntimeError):
    """A git operation failed; the message carries no credentials."""


@dataclass(frozen=True)
class Worktree:
    """An agent's checkout."""

    path: Path
    branch: str
    mirror: Path


class Workspace:
    """Mirrors and worktrees under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("mirrors", "worktrees", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def mirror_path(self, repo: str) -> Path:
        """Where the mirror of ``repo`` lives."""
        return self.root / "mirrors" / (hashlib.sha256(repo.encode()).hexdigest()[:20] + ".git")

    def worktree_path(self, agent_id: str) -> Path:
        """Where an agent's worktree lives."""
        return self.root / "worktrees" / agent_id

    @contextmanager
    def _lock(self, mirror: Path) -> Iterator[None]:
        with open(self.root / "locks" / (mirror.name + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _git(self, cwd: Path, *args: str) -> str:
        try:
            out: str = git.Git(str(cwd)).execute(
                ["git", "-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false", *args],
                env={**os.environ, **GIT_ENV},
            )
            return out
        except git.GitCommandError as exc:
            detail = redact_text(str(exc.stderr or exc).strip())
            raise WorkspaceError(f"git {args[0]} failed: {detail}") from None

    def sync_mirror(self, repo: str) -> Path:
        """Create or update the mirror of ``repo``; returns its path."""
        mirror = self.mirror_path(repo)
        with self._lock(mirror):
            self._sync_locked(repo, mirror)
        return mirror

    def _sync_locked(self, repo: str, mirror: Path) -> None:
        if not (mirror / "HEAD").exists():
            mirror.mkdir(parents=True, exist_ok=True)
            self._git(mirror, "init", "--bare", "--quiet")
            self._git(mirror, "remote", "add", "origin", repo)
        self._git(mirror, "fetch", "--quiet", "--prune", "origin", "+refs/heads/*:refs/remotes/origin/*")

    def prepare(self, agent_id: str, repo: str, base_branch: str, branch: str) -> Worktree:
        """The agent's worktree on ``branch``: reused if it exists, else made from its branch or the base."""
        mirror = self.mirror_path(repo)
        path = self.worktree_path(agent_id)
        with self._lock(mirror):
            self._sync_locked(repo, mirror)
            if (path / ".git").exists():
                return Worktree(path, branch, mirror)
            if path.exists():
                shutil.rmtree(path)
            self._git(mirror, "worktree", "prune")
            has_branch = bool(self._git(mirror, "branch", "--list", branch).strip())
            if has_branch:
                self._git(mirror, "worktree", "add", "--quiet", str(path), branch)
            else:
                base = f"refs/remotes/origin/{base_branch}"
                if not self._git(mirror, "for-each-ref", base).strip():
                    raise WorkspaceError(f"base branch {base_branch!r} does not exist in {redact_url(repo)}")
                self._git(mirror, "worktree", "add", "--quiet", "--no-track", "-b", branch, str(path), base)
        return Worktree(path, branch, mirror)

    def commit(self, wt: Worktree, message: str, author: str, email: str, base_branch: str) -> str | None:
        """Commit every change in the worktree; returns the branch head if the branch has commits of its own."""
        self._git(wt.path, "add", "-A")
        ident = ["-c", f"user.name={author}", "-c", f"user.email={email}"]
        try:
            self._git(wt.path, *ident, "commit", "--quiet", "--no-verify", "-m", message,
                      f"--author={author} <{email}>")
        except WorkspaceError as exc:
            if "nothing to commit" not in str(exc) and "nothing added to commit" not in str(exc):
                raise
        # The newest commit of the branch that its base does not have: HEAD, or nothing.
        own = self._git(wt.path, "rev-list", "-1", f"refs/remotes/origin/{base_branch}..HEAD").strip()
        return own or None

    def push(self, wt: Worktree) -> None:
        """Push the agent's branch to the repository's origin."""
        with self._lock(wt.mirror):
            self._git(wt.mirror, "push", "--quiet", "origin", f"refs/heads/{wt.branch}:refs/heads/{wt.branch}")

    def remove(self, agent_id: str, repo: str | None = None) -> None:
        """Delete an agent's worktree (the branch stays in the mirror)."""
        path = self.worktree_path(agent_id)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        if repo is not None and (self.mirror_path(repo) / "HEAD").exists():
            mirror = self.mirror_path(repo)
            with self._lock(mirror):
                self._git(mirror, "worktree", "prune")

    def disk_usage(self) -> int:
        """Bytes used under the workspace root."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total
