"""Repository mirrors and one git worktree and branch per agent under ``ORCHESTRATOR_WORKSPACE_DIR``.

A mirror is a bare clone of the coordinator's repository, shared by every agent on the host that works on it;
an flock per mirror serialises fetches and worktree changes between processes. Agent branches live in the
mirror's ``refs/heads``; the origin's branches are fetched into ``refs/remotes/origin`` so a fetch never
touches an agent's branch.

The fleet's own git never runs a program the repository (or the agent) controls:

* every call runs with a scrubbed environment (no secrets; ``GIT_CONFIG_NOSYSTEM=1``, ``GIT_CONFIG_GLOBAL=/dev/null``,
  ``HOME`` an empty fleet-owned directory, ``LANG=C``, a minimal ``PATH``) and a timeout, in its own process group;
* hooks, fsmonitor, the attributes file, automatic maintenance and submodule recursion are switched off on the
  command line, and only the fleet writes the mirror's config, so no filter, diff or merge driver is defined;
* worktree operations name the git dir (``<mirror>/worktrees/<id>``) and the work tree explicitly: the worktree's
  ``.git`` file, which the agent can rewrite, is never followed (it is restored before each commit), and nested
  repositories the agent made are left out of commits (git would otherwise run ``git status`` inside them, with
  their own config);
* credentials (``ORCHESTRATOR_GIT_CREDENTIALS_FILE``, git-credential-store format) reach only fetch and push,
  through a read-only credential helper given on the command line: never a URL, the mirror's config or an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.sandbox import GitView
from orchestrator.settings import redact_text, redact_url

logger = logging.getLogger(__name__)

# Passed to every git call: nothing the repository's (or the agent's) files select may run a program.
SAFE_GIT_FLAGS: tuple[str, ...] = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.sshCommand=ssh -o BatchMode=yes",
    "-c", "core.attributesFile=/dev/null",
    "-c", "protocol.ext.allow=never",
    "-c", "commit.gpgsign=false",
    "-c", "tag.gpgsign=false",
    "-c", "credential.helper=",
    "-c", "maintenance.auto=false",
    "-c", "gc.auto=0",
    "-c", "diff.ignoreSubmodules=all",
    "-c", "status.submoduleSummary=false",
    "-c", "submodule.recurse=false",
    "-c", "advice.addEmbeddedRepo=false",
)
# Environment variables git may keep (proxies, CA bundles, the ssh agent); everything else is dropped.
_PASSED_ENV = (
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "SSH_AUTH_SOCK", "TZ",
)
_KILL_WAIT = 5.0


#: A file modified this recently (seconds) is "racily clean" for :meth:`Workspace.fingerprint`: its content counts.
RACY_SECONDS = 0.1
RACY_HASH_MAX_BYTES = 1 << 20


def _racy_content(path: str, size: int) -> bytes:
    """What a recently modified file adds to a fingerprint: a digest of its content, or a nonce when too big."""
    if size > RACY_HASH_MAX_BYTES:
        return os.urandom(16)
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).digest()
    except OSError:
        return os.urandom(16)


class WorkspaceError(RuntimeError):
    """A git operation failed; the message carries no credentials."""


@dataclass(frozen=True)
class Worktree:
    """An agent's checkout."""

    path: Path
    branch: str
    mirror: Path


@dataclass(frozen=True)
class Snapshot:
    """An agent's worktree at a checkpoint, for any host: a bundle of its branch's commits and a commit of every
    uncommitted and untracked file on top of them (``wip``). ``key`` identifies the state (head and tree)."""

    key: str
    head: str
    wip: str
    bundle: bytes


class Workspace:
    """Mirrors and worktrees under one root directory.

    ``credentials_file`` (git-credential-store format) is used by fetch and push only; every git call is killed
    after ``git_timeout`` seconds.
    """

    def __init__(self, root: Path, credentials_file: Path | None = None, git_timeout: float = 300) -> None:
        if git_timeout <= 0:
            raise ValueError("git_timeout must be positive")
        self.root = root
        self.credentials_file = credentials_file
        self.git_timeout = git_timeout
        for sub in ("mirrors", "worktrees", "locks", "git-home"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        git = shutil.which("git") or "git"
        self._git_bin = os.path.realpath(git) if os.path.isabs(git) else git
        path = ["/usr/local/bin", "/usr/bin", "/bin"]
        if os.path.isabs(git) and os.path.dirname(git) not in path:
            path.insert(0, os.path.dirname(git))
        self._env = {
            "PATH": ":".join(path),
            "HOME": str(Path(os.path.abspath(root)) / "git-home"),
            "XDG_CONFIG_HOME": str(Path(os.path.abspath(root)) / "git-home"),
            "LANG": "C",
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
        }
        self._env.update({name: os.environ[name] for name in _PASSED_ENV if name in os.environ})

    def mirror_path(self, repo: str) -> Path:
        """Where the mirror of ``repo`` lives."""
        return self.root / "mirrors" / (hashlib.sha256(repo.encode()).hexdigest()[:20] + ".git")

    def worktree_path(self, agent_id: str) -> Path:
        """Where an agent's worktree lives."""
        return self.root / "worktrees" / agent_id

    def git_view(self, agent_id: str, repo: str) -> GitView:
        """What the agent's sandbox may see of its repository: its worktree admin dir and the mirror."""
        mirror = self.mirror_path(repo)
        return GitView(admin_dir=self._admin_dir(mirror, self.worktree_path(agent_id)), common_dir=mirror)

    @contextmanager
    def _lock(self, mirror: Path) -> Iterator[None]:
        with open(self.root / "locks" / (mirror.name + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- running git ------------------------------------------------------------------------------------------

    def _git(self, cwd: Path, *args: str, credentials: bool = False, index: Path | None = None) -> str:
        """Run git with the safe flags, the scrubbed environment and the timeout; returns its stdout.

        ``index``: a temporary index file (``GIT_INDEX_FILE``) instead of the worktree's own.
        """
        argv = [self._git_bin, *SAFE_GIT_FLAGS]
        if credentials and self.credentials_file is not None:
            store = shlex.quote(str(os.path.abspath(self.credentials_file)))
            # Answer "get" only: git must never write to (or, after a failed login, erase from) the fleet's file.
            helper = f'!f() {{ if test "$1" = get; then git credential-store --file={store} get; fi; }}; f'
            argv += ["-c", f"credential.helper={helper}"]
        argv += args
        name = next((a for a in args if not a.startswith("-")), "git")
        try:
            env = self._env if index is None else {**self._env, "GIT_INDEX_FILE": str(index)}
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise WorkspaceError(f"git {name} could not be started: {exc}") from None
        try:
            out, err = proc.communicate(timeout=self.git_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # git and its helpers (ssh, remote-https) alike
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=_KILL_WAIT)
            proc.kill()
            proc.wait()
            raise WorkspaceError(f"git {name} timed out after {self.git_timeout:g}s and was killed") from None
        finally:
            if proc.returncode is None:  # interrupted (e.g. KeyboardInterrupt): never leave git running
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stdout = out.decode("utf-8", errors="replace")
        if proc.returncode != 0:
            detail = "\n".join(part for part in (err.decode("utf-8", errors="replace").strip(), stdout.strip())
                               if part)
            raise WorkspaceError(f"git {name} failed: {redact_text(detail) or f'exit code {proc.returncode}'}")
        return stdout

    def _mirror_git(self, mirror: Path, *args: str, credentials: bool = False) -> str:
        return self._git(mirror, f"--git-dir={mirror}", *args, credentials=credentials)

    def _worktree_git(self, wt: Worktree, admin: Path, *args: str, index: Path | None = None) -> str:
        """Git in the worktree with its git dir named explicitly: the worktree's ``.git`` is never followed."""
        return self._git(wt.path, f"--git-dir={admin}", f"--work-tree={wt.path}", *args, index=index)

    # -- worktree admin dirs ----------------------------------------------------------------------------------

    @staticmethod
    def _admin_dir(mirror: Path, path: Path) -> Path:
        """The mirror's admin dir of the worktree at ``path`` (found from the fleet's side, never from ``.git``)."""
        dotgit = os.path.realpath(path / ".git")
        base = mirror / "worktrees"
        candidates = [base / path.name]
        with contextlib.suppress(OSError):
            candidates += sorted(p for p in base.iterdir() if p.name != path.name)
        for candidate in candidates:
            try:
                recorded = (candidate / "gitdir").read_text().strip()
            except OSError:
                continue
            if os.path.realpath(recorded) == dotgit:
                return candidate
        raise WorkspaceError(f"the worktree {path} is not registered in its mirror")

    @staticmethod
    def _restore_dotgit(path: Path, admin: Path) -> bool:
        """Make the worktree's ``.git`` a file pointing at ``admin`` again; True if it had to be rewritten."""
        dotgit = path / ".git"
        try:
            if not dotgit.is_symlink() and dotgit.is_file():
                text = dotgit.read_text(errors="replace").strip()
                if text.startswith("gitdir:") and os.path.realpath(text[7:].strip()) == os.path.realpath(admin):
                    return False
        except OSError:
            pass
        if dotgit.is_dir() and not dotgit.is_symlink():
            shutil.rmtree(dotgit)
        else:
            with contextlib.suppress(FileNotFoundError):
                dotgit.unlink()
        dotgit.write_text(f"gitdir: {os.path.realpath(admin)}\n")
        return True

    def _nested_repos(self, wt: Worktree, admin: Path) -> list[str]:
        """Nested repositories in the worktree (gitlinks and untracked repos), relative paths."""
        found = []
        for entry in self._worktree_git(wt, admin, "ls-files", "-z", "--stage").split("\0"):
            meta, _, name = entry.partition("\t")
            if meta.startswith("160000 "):
                found.append(name)
        for entry in self._worktree_git(wt, admin, "ls-files", "-z", "--others", "--exclude-standard").split("\0"):
            if entry.endswith("/"):
                found.append(entry.rstrip("/"))
        return found

    # -- public operations ------------------------------------------------------------------------------------

    def sync_mirror(self, repo: str) -> Path:
        """Create or update the mirror of ``repo``; returns its path."""
        mirror = self.mirror_path(repo)
        with self._lock(mirror):
            self._sync_locked(repo, mirror)
        return mirror

    def _sync_locked(self, repo: str, mirror: Path) -> None:
        if not (mirror / "HEAD").exists():
            mirror.mkdir(parents=True, exist_ok=True)
            self._git(mirror, "init", "--bare", "--quiet", str(mirror))
            self._mirror_git(mirror, "remote", "add", "origin", repo)
        self._mirror_git(mirror, "fetch", "--quiet", "--prune", "origin", "+refs/heads/*:refs/remotes/origin/*",
                         credentials=True)

    def prepare(self, agent_id: str, repo: str, base_branch: str, branch: str,
                snapshot: bytes | None = None) -> Worktree:
        """The agent's worktree on ``branch``: reused if it exists, else made from its branch or the base.

        With ``snapshot`` (a bundle from :meth:`snapshot`, taken on any host), the worktree is rebuilt exactly as
        it was at that checkpoint: the branch's commits, and every uncommitted and untracked file.
        """
        mirror = self.mirror_path(repo)
        path = self.worktree_path(agent_id)
        with self._lock(mirror):
            self._sync_locked(repo, mirror)
            if snapshot is not None:
                return self._restore_locked(agent_id, mirror, path, base_branch, branch, snapshot)
            if path.exists():
                try:
                    admin: Path | None = self._admin_dir(mirror, path)
                except WorkspaceError:
                    admin = None
                if admin is not None:  # still registered: reuse it (uncommitted work included)
                    if self._restore_dotgit(path, admin):
                        logger.warning("agent %s: the worktree's .git file was altered; restored it", agent_id)
                    return Worktree(path, branch, mirror)
                shutil.rmtree(path)
            if (mirror / "worktrees" / path.name).exists():  # a registration left by a removed worktree
                self._mirror_git(mirror, "worktree", "prune")
            base = f"refs/remotes/origin/{base_branch}"
            found = set(self._mirror_git(mirror, "for-each-ref", "--format=%(refname)", f"refs/heads/{branch}",
                                         base).split())
            if f"refs/heads/{branch}" in found:
                add = ["worktree", "add", "--quiet", str(path), branch]
            elif base in found:
                add = ["worktree", "add", "--quiet", "--no-track", "-b", branch, str(path), base]
            else:
                raise WorkspaceError(f"base branch {base_branch!r} does not exist in {redact_url(repo)}")
            try:
                self._mirror_git(mirror, *add)
            except WorkspaceError:  # a stale registration under another name: prune it and try once more
                self._mirror_git(mirror, "worktree", "prune")
                self._mirror_git(mirror, *add)
        return Worktree(path, branch, mirror)

    def snapshot(self, wt: Worktree, agent_id: str, base_branch: str, previous: str | None = None,
                 max_bytes: int = 64 << 20) -> Snapshot | None:
        """The worktree's whole state for any host: None when it is unchanged since ``previous`` (a snapshot's
        ``key``). Raises WorkspaceError when the bundle would be bigger than ``max_bytes``.

        A temporary index takes every file (tracked, changed, untracked; not ignored ones, not nested repositories)
        into a tree; a commit of that tree on top of the branch head, and the branch's own commits since its base,
        go into a git bundle. The worktree, its index and its branch are not touched.
        """
        admin = self._admin_dir(wt.mirror, wt.path)
        self._restore_dotgit(wt.path, admin)
        index = admin / "orchestrator-snapshot-index"
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(admin / "index", index)  # only changed files are hashed again
        nested = self._nested_repos(wt, admin)
        self._worktree_git(wt, admin, "add", "-A", "--", ".", *(f":(exclude,literal){p}" for p in nested),
                           index=index)
        tree = self._worktree_git(wt, admin, "write-tree", index=index).strip()
        head = self._worktree_git(wt, admin, "rev-parse", "HEAD").strip()
        key = f"{head}:{tree}"
        if key == previous:
            return None
        ident = ["-c", "user.name=orchestrator", "-c", "user.email=snapshot@agents.orchestrator"]
        wip = self._worktree_git(wt, admin, *ident, "commit-tree", tree, "-p", head, "-m",
                                 f"orchestrator snapshot of agent {agent_id}").strip()
        ref = f"refs/orchestrator/snapshot/{agent_id}"
        self._mirror_git(wt.mirror, "update-ref", ref, wip)
        bundle = wt.mirror / f"orchestrator-snapshot-{agent_id}.bundle"
        try:
            base = f"refs/remotes/origin/{base_branch}"
            self._mirror_git(wt.mirror, "bundle", "create", "--quiet", str(bundle), ref, f"^{base}")
            size = bundle.stat().st_size
            if size > max_bytes:
                raise WorkspaceError(f"the worktree's snapshot is {size >> 20} MiB, more than the "
                                     f"{max_bytes >> 20} MiB allowed (ORCHESTRATOR_SNAPSHOT_MAX_MB)")
            data = bundle.read_bytes()
        finally:
            with contextlib.suppress(FileNotFoundError):
                bundle.unlink()
        return Snapshot(key=key, head=head, wip=wip, bundle=data)

    @staticmethod
    def fingerprint(wt: Worktree, memo: dict[str, tuple[tuple[int, ...], bytes, bool]] | None = None) -> str:
        """A cheap digest of every file's metadata in the worktree (path, size, mtime, inode; ``.git`` excluded).

        Equal fingerprints mean no file changed, so the last snapshot still holds (no git call at all); a changed
        one only means :meth:`snapshot` must look (ignored files count here, and git may still find no change).

        File times come from a coarse clock (a kernel tick), so a same-size rewrite in place within one tick keeps
        every stat field. As git does with "racily clean" entries, a file modified within ``RACY_SECONDS`` of now
        has its content in the digest too (a big one a random nonce, which forces a look). With ``memo`` (one per
        run) a file whose content was hashed keeps it in the digest while its metadata is unchanged: hashed again
        once after its tick is over (a rewrite within the tick shows then), then taken from the memo, so the
        fingerprint of an unchanged worktree stays equal and costs no git look.
        """
        digest = hashlib.blake2b(digest_size=16)
        recent = time.time_ns() - int(RACY_SECONDS * 1e9)
        seen: dict[str, tuple[tuple[int, ...], bytes, bool]] = {}
        for dirpath, dirs, files in os.walk(wt.path):
            if dirpath == str(wt.path):
                dirs[:] = [d for d in dirs if d != ".git"]
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(full)
                    digest.update(f"{full}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_mode}\n".encode())
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
                    known = memo.get(full) if memo is not None else None
                    if st.st_mtime_ns >= recent:  # racily clean: its content now, to be checked once more later
                        seen[full] = (key, _racy_content(full, st.st_size), False)
                    elif known is not None and known[0] == key:
                        seen[full] = known if known[2] else (key, _racy_content(full, st.st_size), True)
                    else:
                        continue
                    digest.update(seen[full][1])
        if memo is not None:
            memo.clear()
            memo.update(seen)
        return digest.hexdigest()

    def _restore_locked(self, agent_id: str, mirror: Path, path: Path, base_branch: str, branch: str,
                        data: bytes) -> Worktree:
        """Rebuild the worktree from a snapshot bundle (the mirror's lock is held)."""
        ref = f"refs/orchestrator/snapshot/{agent_id}"
        bundle = mirror / f"orchestrator-restore-{agent_id}.bundle"
        bundle.write_bytes(data)
        try:
            self._mirror_git(mirror, "fetch", "--quiet", str(bundle), f"+{ref}:{ref}")
        finally:
            bundle.unlink()
        wip = self._mirror_git(mirror, "rev-parse", ref).strip()
        head = self._mirror_git(mirror, "rev-parse", f"{wip}^").strip()
        admin: Path | None = None
        if path.exists():
            try:
                admin = self._admin_dir(mirror, path)
            except WorkspaceError:
                shutil.rmtree(path)
        if admin is None:
            self._mirror_git(mirror, "worktree", "prune")
            if self._mirror_git(mirror, "branch", "--list", branch).strip():
                self._mirror_git(mirror, "worktree", "add", "--quiet", "--force", str(path), branch)
            else:
                self._mirror_git(mirror, "worktree", "add", "--quiet", "--no-track", "-b", branch, str(path), head)
            admin = self._admin_dir(mirror, path)
        self._restore_dotgit(path, admin)
        wt = Worktree(path, branch, mirror)
        # The branch at the snapshot's head, every file as it was: tracked ones reset, stray ones removed (ignored
        # ones kept), then the snapshot's tree written over the head with the index left at the head, so what was
        # uncommitted is uncommitted again and untracked files are untracked again.
        self._worktree_git(wt, admin, "reset", "--quiet", "--hard", head)
        self._worktree_git(wt, admin, "clean", "-fdq")
        self._worktree_git(wt, admin, "read-tree", "-u", "-m", "HEAD", wip)
        self._worktree_git(wt, admin, "reset", "--quiet")
        return wt

    def commit(self, wt: Worktree, message: str, author: str, email: str, base_branch: str) -> str | None:
        """Commit every change in the worktree; returns the branch head if the branch has commits of its own.

        The worktree's ``.git`` is restored first if the agent changed it (logged as a warning); nested
        repositories are not committed.
        """
        admin = self._admin_dir(wt.mirror, wt.path)
        if self._restore_dotgit(wt.path, admin):
            logger.warning("worktree %s: its .git file no longer pointed at %s; restored it before committing",
                           wt.path, admin)
        nested = self._nested_repos(wt, admin)
        if nested:
            logger.warning("worktree %s: nested repositories left out of the commit: %s", wt.path, ", ".join(nested))
        self._worktree_git(wt, admin, "add", "-A", "--", ".", *(f":(exclude,literal){p}" for p in nested))
        ident = ["-c", f"user.name={author}", "-c", f"user.email={email}"]
        try:
            self._worktree_git(wt, admin, *ident, "commit", "--quiet", "--no-verify", "-m", message,
                               f"--author={author} <{email}>")
        except WorkspaceError as exc:
            if "nothing to commit" not in str(exc) and "nothing added to commit" not in str(exc):
                raise
        # The newest commit of the branch that its base does not have: HEAD, or nothing.
        own = self._worktree_git(wt, admin, "rev-list", "-1", f"refs/remotes/origin/{base_branch}..HEAD").strip()
        return own or None

    def push(self, wt: Worktree) -> None:
        """Push the agent's branch to the repository's origin."""
        with self._lock(wt.mirror):
            self._mirror_git(wt.mirror, "push", "--quiet", "origin",
                             f"refs/heads/{wt.branch}:refs/heads/{wt.branch}", credentials=True)

    def remove(self, agent_id: str, repo: str | None = None) -> None:
        """Delete an agent's worktree (the branch stays in the mirror)."""
        path = self.worktree_path(agent_id)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        if repo is not None and (self.mirror_path(repo) / "HEAD").exists():
            mirror = self.mirror_path(repo)
            with self._lock(mirror):
                self._mirror_git(mirror, "worktree", "prune")

    def disk_usage(self) -> int:
        """Bytes used under the workspace root."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total
