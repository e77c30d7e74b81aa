"""Containment for the commands agents run (their ``bash`` tool and the quality gates): bubblewrap on Linux.

What a sandboxed command sees (CONTRACT section 6):

* the system read-only (``/usr``, ``/etc``, ``/opt``; ``/bin``, ``/sbin``, ``/lib*`` as on the host, symlinks on
  merged-usr systems), minus ``/etc/shadow``, ``/etc/gshadow``, ``/etc/ssh``, ``/etc/ssl/private`` and any path in
  ``hide``;
* the toolchains on the worker's ``PATH`` read-only, even under the worker's home (the directory holding a ``bin/``
  or ``shims/`` entry, a venv's base interpreter, pyenv's root with ``PYENV_ROOT`` set, rustup's home), never the
  home itself nor a directory holding the workspace;
* its worktree read-write at its real path; with a :class:`GitView`, the repository's mirror read-only with a
  sanitised ``config``, an empty ``hooks`` and only its own ``worktrees/<id>`` admin directory;
* a private ``/tmp`` (a size-capped tmpfs; ``HOME=/tmp/home``, ``TMPDIR=/tmp``), a fresh ``/proc`` of its own PID
  namespace and a minimal ``/dev``. Nothing else of the host: not the worker's home, other worktrees, ``/work``,
  ``/run`` or ``/sys``.

Namespaces: user (always, also as root, so that the mounts are locked and cannot be remounted read-write; no nested
user namespaces; every capability dropped), PID, IPC, UTS, cgroup (if possible) and network unless ``network`` is
``"host"``. ``--new-session`` (no TIOCSTI into the worker's terminal, CVE-2017-5226) and ``--die-with-parent``.
bwrap's PID 1 ends every process of the namespace when the command's main process exits, so ``setsid``, ``nohup``
and double-forked leftovers die with the command; SIGKILL to the outer bwrap's process group tears the namespace
down the same way (``--die-with-parent``), and :meth:`Launch.cleanup` kills whatever is left in the command's
cgroup.

Limits (memory, processes, file size) are applied by a ``/bin/sh -c '...; exec "$0" "$@"' bwrap ...`` wrapper
(no ``preexec_fn``: it is unsafe with threads and forces a slow fork). The mechanism is decided once per process
(:func:`limits_backend`):

* ``cgroup2``: a cgroup v2 subtree the worker may write with the ``memory`` and ``pids`` controllers (a delegated
  subtree, e.g. systemd ``Delegate=yes`` or a container with a private cgroup namespace and a writable
  ``/sys/fs/cgroup``). Per-command cgroups live under ``<worker cgroup>/orchestrator-sandbox/``. Because of cgroup
  v2's no-internal-processes rule, the worker's own processes are first moved into
  ``<worker cgroup>/orchestrator-worker`` when the controllers cannot otherwise be enabled. Limits: ``memory.max``,
  ``memory.swap.max=0``, ``memory.oom.group=1``, ``pids.max``; cleanup writes ``cgroup.kill``.
* ``cgroup1``: writable cgroup v1 ``memory`` and ``pids`` hierarchies (typically the worker runs as root on a
  v1/hybrid host). Per-command cgroups under ``<own cgroup>/orchestrator-sandbox/`` of each hierarchy; limits
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``), ``pids.max``; cleanup freezes forking
  (``pids.max=0``) and SIGKILLs every pid in ``cgroup.procs`` (through a pidfd, so pid reuse is harmless).
* ``rlimit``: otherwise, ``RLIMIT_AS`` (memory) and ``RLIMIT_NPROC`` (processes). Known gaps: ``RLIMIT_NPROC`` is
  not enforced for uid 0 of the initial user namespace and counts *every* process of the worker's uid on the host
  (the worker's own included); ``RLIMIT_AS`` caps address space, not memory, and breaks runtimes that reserve large
  address ranges (Go, the JVM, some JITs). The ``/tmp`` tmpfs is always capped at the memory limit.

A cgroup whose last processes are still exiting (bwrap's PID 1 unmounts the sandbox as it exits: a few ms) is
removed by a background thread that kills again until it is empty, so :meth:`Launch.cleanup` never waits.

The file size limit is always ``RLIMIT_FSIZE`` (a bigger write gets SIGXFSZ); core dumps are off (``RLIMIT_CORE=0``).
Not confined by this module: disk usage of the worktree as a whole (only single files are capped), CPU time, and,
with ``network="host"``, the host's loopback services and abstract Unix sockets. When the worker runs as root, the
command runs as uid 0 mapped to root (without capabilities): root-only files in the visible system directories
(other than those masked) are readable, and files it creates in the worktree are root's.

``mode="off"`` runs ``/bin/bash -c`` in the worktree with the given environment: no confinement at all.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from orchestrator.settings import Settings

__all__ = [
    "GitView",
    "Launch",
    "Sandbox",
    "SandboxConfig",
    "SandboxUnavailable",
    "check_available",
    "limits_backend",
]

logger = logging.getLogger(__name__)

LimitsBackend = Literal["cgroup2", "cgroup1", "rlimit"]

SANDBOX_HOME = "/tmp/home"
_CGROUP_PARENT = "orchestrator-sandbox"
_CGROUP_WORKER_LEAF = "orchestrator-worker"
_ROOT_DIRS = ("/usr", "/etc", "/opt")
_ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_SYSTEM_PREFIXES = (*_ROOT_DIRS, *_ROOT_LINKS)
_ALWAYS_HIDDEN = ("/etc/shadow", "/etc/gshadow", "/etc/ssh", "/etc/ssl/private")
# Credential files that may sit at the top of an exposed toolchain directory (e.g. ~/.cargo/credentials.toml).
_CREDENTIAL_NAMES = (
    "credentials", "credentials.toml", ".credentials.toml", ".git-credentials", ".netrc", ".pypirc", ".npmrc",
    "auth.json", ".docker",
)
_BIN_DIR_NAMES = ("bin", "sbin", "shims")
_FIX_HINT = (
    "Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap). In Docker, the default seccomp and AppArmor "
    "profiles block the namespaces it needs: run the worker with --security-opt seccomp=unconfined and "
    "--security-opt apparmor=unconfined (or profiles allowing unshare and clone with CLONE_NEWUSER), and make sure "
    "unprivileged user namespaces are enabled (sysctl kernel.unprivileged_userns_clone=1, "
    "user.max_user_namespaces > 0). Or set ORCHESTRATOR_SANDBOX=off to run agent commands unconfined."
)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot run here; the message says why and how to fix it."""


@dataclass(frozen=True)
class SandboxConfig:
    """How agent commands are confined; ``limits`` forces a limits backend (``"auto"``: :func:`limits_backend`)."""

    mode: Literal["bwrap", "off"] = "bwrap"
    network: Literal["none", "host"] = "none"
    memory_mb: int = 4096
    max_processes: int = 512
    max_file_mb: int = 1024
    bwrap: str = "bwrap"
    limits: Literal["auto", "cgroup2", "cgroup1", "rlimit"] = "auto"

    @classmethod
    def from_settings(cls, s: Settings) -> SandboxConfig:
        """The configuration from the fleet's ``ORCHESTRATOR_SANDBOX*`` settings."""
        return cls(mode=s.sandbox, network=s.sandbox_network, memory_mb=s.sandbox_memory_mb,
                   max_processes=s.sandbox_max_processes, max_file_mb=s.sandbox_max_file_mb)


@dataclass(frozen=True)
class GitView:
    """What a sandbox may see of an agent's repository: its worktree admin dir and the bare mirror (read-only)."""

    admin_dir: Path  # <mirror>/worktrees/<agent_id>
    common_dir: Path  # the bare mirror


# --- paths -----------------------------------------------------------------------------------------------------


def _is_under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or inside it (both absolute and normalised)."""
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _is_system(path: str) -> bool:
    return any(_is_under(path, prefix) for prefix in _SYSTEM_PREFIXES)


# --- toolchains ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Toolchains:
    binds: tuple[tuple[str, str], ...]  # (host source, path inside), read-only
    env: tuple[tuple[str, str], ...]
    masks: tuple[str, ...]  # credential files inside exposed toolchains


def _toolchain_root(directory: str) -> str:
    """The directory to expose for a ``PATH`` entry: the parent of a ``bin``/``shims`` dir, else the entry."""
    if os.path.basename(directory.rstrip("/")) in _BIN_DIR_NAMES:
        return os.path.dirname(directory.rstrip("/")) or "/"
    return directory


def _venv_base(root: str) -> list[str]:
    """The base interpreter's prefix of the venv at ``root`` (from ``pyvenv.cfg`` and ``bin/python``)."""
    found: list[str] = []
    with contextlib.suppress(OSError), open(os.path.join(root, "pyvenv.cfg"), encoding="utf-8",
                                            errors="replace") as handle:
        for line in handle:
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "home" and os.path.isabs(value.strip()):
                found.append(_toolchain_root(os.path.normpath(value.strip())))
    for name in ("python", "python3"):
        target = os.path.realpath(os.path.join(root, "bin", name))
        if os.path.exists(target):
            found.append(_toolchain_root(os.path.dirname(target)))
    return found


@functools.lru_cache(maxsize=16)
def _discover_toolchains(path_var: str, homes: tuple[str, ...]) -> _Toolchains:
    """Directories to expose so that every tool on ``path_var`` works inside (cached per process).

    Never a home directory or an ancestor of one, nor a top-level directory (``/tmp``, ``/app``, ``/home``...).
    """
    roots: list[str] = []
    env: dict[str, str] = {}

    def add(root: str) -> None:
        root = os.path.normpath(root)
        if root not in roots and os.path.isdir(root):
            roots.append(root)

    for entry in path_var.split(os.pathsep):
        if not entry or not os.path.isabs(entry):
            continue
        entry = os.path.normpath(entry)
        real = os.path.realpath(entry)
        if not os.path.isdir(real) or (_is_system(entry) and _is_system(real)):
            continue
        root = _toolchain_root(entry)
        if os.path.basename(root) == ".local":  # ~/.local: its bin and lib only (share/ holds keyrings and such)
            add(os.path.join(root, "bin"))
            add(os.path.join(root, "lib"))
        else:
            add(root)
        if os.path.exists(os.path.join(root, "pyvenv.cfg")):
            for base in _venv_base(root):
                add(base)
        if os.path.exists(os.path.join(root, "libexec", "pyenv")):
            env.setdefault("PYENV_ROOT", root)
        if os.path.exists(os.path.join(root, "bin", "rustup")):
            rustup_home = os.environ.get("RUSTUP_HOME") or os.path.join(os.path.dirname(root), ".rustup")
            if os.path.isdir(rustup_home):
                add(rustup_home)
                env.setdefault("RUSTUP_HOME", rustup_home)
        # Tools that are symlinks to elsewhere (e.g. ~/.local/bin/x -> ~/.local/share/x/venv/bin/x).
        with contextlib.suppress(OSError), os.scandir(real) as iterator:
            for item in iterator:
                if item.is_symlink():
                    target = os.path.realpath(item.path)
                    if os.path.exists(target) and not _is_system(target) and not _is_under(target, root):
                        add(_toolchain_root(os.path.dirname(target)))

    binds: list[tuple[str, str]] = []
    masks: list[str] = []
    for root in roots:
        real = os.path.realpath(root)
        if any(path.count("/") < 2 or any(_is_under(home, path) for home in homes) for path in (root, real)):
            logger.debug("sandbox: not exposing toolchain %s (a home or top-level directory)", root)
            continue
        for dest in dict.fromkeys((real, root)):
            if _is_system(dest):
                continue
            binds.append((real, dest))
            for name in _CREDENTIAL_NAMES:
                if os.path.lexists(os.path.join(real, name)):
                    masks.append(os.path.join(dest, name))
    # Outermost first, nested duplicates dropped.
    binds.sort(key=lambda bind: (bind[1].count("/"), bind[1]))
    kept: list[tuple[str, str]] = []
    for src, dest in binds:
        # Already visible through an enclosing bind (same host directory at the same place)?
        if not any(_is_under(dest, kept_dest) and src == os.path.normpath(os.path.join(kept_src, os.path.relpath(
                dest, kept_dest))) for kept_src, kept_dest in kept):
            kept.append((src, dest))
    return _Toolchains(tuple(kept), tuple(sorted(env.items())), tuple(dict.fromkeys(masks)))


def _homes(env_home: str | None) -> tuple[str, ...]:
    """The worker's home directories: ``$HOME`` as given, ``~`` and the passwd entry's (real paths)."""
    found = [os.path.expanduser("~")]
    if env_home:
        found.append(env_home)
    with contextlib.suppress(KeyError, OSError):
        found.append(pwd.getpwuid(os.geteuid()).pw_dir)
    return tuple(dict.fromkeys(os.path.realpath(h) for h in found if os.path.isabs(h) and h != "/"))


# --- git config ------------------------------------------------------------------------------------------------

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_config_dir_lock = threading.Lock()
_config_dir: tuple[int, str] | None = None


def _sanitized_git_config(common_dir: Path) -> str:
    """The minimal config git needs to read the mirror: format version, ``core.bare``, ``extensions.*``."""
    version = "0"
    extensions: dict[str, str] = {}
    section = ""
    try:
        text = (common_dir / "config").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            header = line[1:line.find("]")] if "]" in line else ""
            section = header.strip().lower() if '"' not in header and " " not in header.strip() else "<sub>"
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"') if sep else "true"
        if section == "core" and key == "repositoryformatversion" and value.isdigit():
            version = value
        elif section == "extensions" and re.fullmatch(r"[a-z0-9]+", key) and _SAFE_VALUE.match(value):
            extensions[key] = value
    content = f"[core]\n\trepositoryformatversion = {version}\n\tbare = true\n"
    if extensions:
        content += "[extensions]\n" + "".join(f"\t{key} = {value}\n" for key, value in sorted(extensions.items()))
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    path = os.path.join(_private_dir(), f"gitconfig-{digest}")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    return path


def _private_dir() -> str:
    """A per-process directory (mode 0700) for files bound into sandboxes; removed at exit."""
    global _config_dir
    with _config_dir_lock:
        if _config_dir is None or _config_dir[0] != os.getpid() or not os.path.isdir(_config_dir[1]):
            path = tempfile.mkdtemp(prefix="orchestrator-sandbox-")
            _config_dir = (os.getpid(), path)
            atexit.register(_remove_private_dir, os.getpid(), path)
        return _config_dir[1]


def _remove_private_dir(pid: int, path: str) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


# --- cgroups ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CgroupParent:
    controller: Literal["unified", "memory", "pids"]
    directory: Path  # <mount>/<own cgroup>/orchestrator-sandbox
    proc_path: str  # the same as /proc/<pid>/cgroup shows it


@dataclass(frozen=True)
class _LimitsPlan:
    backend: LimitsBackend
    parents: tuple[_CgroupParent, ...] = ()


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fstype, super options) of every cgroup mount of this process."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
                mountpoint = fields[4].replace("\\040", " ")
                found.append((fields[3], mountpoint, tail[0], set(tail[2].split(","))))
    return found


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller (and ``"unified"`` for v2), from ``/proc/self/cgroup``."""
    owned: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/cgroup", encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                owned["unified"] = parts[2]
            for controller in parts[1].split(","):
                if controller:
                    owned[controller] = parts[2]
    return owned


def _cgroup_dir(mount_root: str, mountpoint: str, own: str) -> Path | None:
    """The directory of cgroup ``own`` under a mount whose root is ``mount_root`` (None if not visible)."""
    if not _is_under(own, mount_root) or "/.." in own:
        return None
    relative = own[len(mount_root.rstrip("/")):].lstrip("/")
    return Path(mountpoint) / relative if relative else Path(mountpoint)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _enable_controllers(directory: Path) -> None:
    enabled = set((directory / "cgroup.subtree_control").read_text().split())
    if {"memory", "pids"} - enabled:
        _write(directory / "cgroup.subtree_control", "+memory +pids")


def _setup_cgroup2() -> _LimitsPlan | None:
    own = _own_cgroups().get("unified")
    mounts = [m for m in _mounts() if m[2] == "cgroup2"]
    if own is None or not mounts:
        return None
    root, mountpoint, _, _ = mounts[0]
    base = _cgroup_dir(root, mountpoint, own)
    if base is None:
        return None
    try:
        if {"memory", "pids"} - set((base / "cgroup.controllers").read_text().split()):
            return None
        if not os.access(base / "cgroup.subtree_control", os.W_OK) or not os.access(base / "cgroup.procs", os.W_OK):
            return None
        try:
            _enable_controllers(base)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # No internal processes: move this cgroup's processes (the worker's) into a leaf, then enable.
            leaf = base / _CGROUP_WORKER_LEAF
            leaf.mkdir(exist_ok=True)
            for _ in range(20):
                pids = (base / "cgroup.procs").read_text().split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        _write(leaf / "cgroup.procs", pid)
            _enable_controllers(base)
        parent = base / _CGROUP_PARENT
        parent.mkdir(exist_ok=True)
        _enable_controllers(parent)
        probe = parent / f"probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.mkdir()
        try:
            ok = (probe / "memory.max").exists() and (probe / "pids.max").exists()
        finally:
            probe.rmdir()
    except OSError as exc:
        logger.debug("cgroup v2 limits unavailable: %s", exc)
        return None
    if not ok:
        return None
    proc_path = own.rstrip("/") + "/" + _CGROUP_PARENT
    return _LimitsPlan("cgroup2", (_CgroupParent("unified", parent, proc_path),))


def _setup_cgroup1() -> _LimitsPlan | None:
    owned = _own_cgroups()
    parents: list[_CgroupParent] = []
    controllers: tuple[Literal["memory", "pids"], ...] = ("memory", "pids")
    for controller in controllers:
        own = owned.get(controller)
        mount = next((m for m in _mounts() if m[2] == "cgroup" and controller in m[3]), None)
        if own is None or mount is None:
            return None
        base = _cgroup_dir(mount[0], mount[1], own)
        if base is None:
            return None
        parent = base / _CGROUP_PARENT
        try:
            parent.mkdir(exist_ok=True)
            probe = parent / f"probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            logger.debug("cgroup v1 %s limits unavailable: %s", controller, exc)
            return None
        finally:
            with contextlib.suppress(OSError):
                parent.rmdir()  # re-created per command; an empty parent is not left behind
        parents.append(_CgroupParent(controller, parent, own.rstrip("/") + "/" + _CGROUP_PARENT))
    return _LimitsPlan("cgroup1", tuple(parents))


_plans: dict[str, _LimitsPlan | None] = {}
_plans_lock = threading.Lock()


def _limits_plan(kind: Literal["auto", "cgroup2", "cgroup1", "rlimit"]) -> _LimitsPlan:
    """The limits mechanism for ``kind`` (decided once per process); raises SandboxUnavailable if forced and absent."""
    with _plans_lock:
        if kind == "rlimit":
            return _LimitsPlan("rlimit")
        for candidate, setup in (("cgroup2", _setup_cgroup2), ("cgroup1", _setup_cgroup1)):
            if kind not in ("auto", candidate):
                continue
            if candidate not in _plans:
                _plans[candidate] = setup()
            plan = _plans[candidate]
            if plan is not None:
                return plan
        if kind != "auto":
            raise SandboxUnavailable(f"the {kind} limits backend is not available on this host")
        return _LimitsPlan("rlimit")


def limits_backend() -> LimitsBackend:
    """What enforces the memory and process limits on this host: ``cgroup2``, ``cgroup1`` or ``rlimit``."""
    return _limits_plan("auto").backend


def _read_pids(directory: Path) -> list[int]:
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_in_cgroup(pid: int, proc_path: str) -> None:
    """SIGKILL ``pid`` if it (still) is in cgroup ``proc_path``; a pidfd makes pid reuse harmless."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as handle:
            member = any(line.rstrip("\n").split(":", 2)[-1] == proc_path for line in handle)
        if member:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


_Cgroups = tuple[tuple[_CgroupParent, Path], ...]


def _kill_pass(cgroups: _Cgroups) -> None:
    """Stop the command's cgroups from forking, then SIGKILL every process in them (one pass, no waiting)."""
    for parent, directory in cgroups:
        if parent.controller == "unified" and (directory / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(directory / "cgroup.kill", "1")
        elif parent.controller in ("pids", "unified"):
            with contextlib.suppress(OSError):
                _write(directory / "pids.max", "0")
    for parent, directory in cgroups:
        for pid in _read_pids(directory):
            _kill_in_cgroup(pid, f"{parent.proc_path}/{directory.name}")


def _try_remove(cgroups: _Cgroups) -> bool:
    """Remove the command's cgroups (and the fleet's parent once unused); False while one is still busy."""
    removed = True
    for _, directory in cgroups:
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                logger.warning("could not remove sandbox cgroup %s: %s", directory, exc)
            else:
                removed = False
    if removed:
        for parent, _ in cgroups:
            with contextlib.suppress(OSError):
                parent.directory.rmdir()  # re-created by the next launch
    return removed


class _Janitor:
    """Finishes cleanups in the background: kills again and removes cgroups whose last processes are still
    exiting (the PID namespace's init unmounts the sandbox as it exits, which takes a few milliseconds)."""

    def __init__(self) -> None:
        self._init()
        os.register_at_fork(after_in_child=self._init)

    def _init(self) -> None:
        self._cond = threading.Condition()
        self._items: list[tuple[_Cgroups, float]] = []
        self._thread: threading.Thread | None = None

    def submit(self, cgroups: _Cgroups, give_up_after: float = 60.0) -> None:
        with self._cond:
            self._items.append((cgroups, time.monotonic() + give_up_after))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sandbox-janitor", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _sweep(self) -> bool:
        """One pass over the pending cleanups; True once none is left."""
        with self._cond:
            batch = list(self._items)
        finished = []
        for item in batch:
            cgroups, deadline = item
            _kill_pass(cgroups)
            if _try_remove(cgroups):
                finished.append(item)
            elif time.monotonic() > deadline:
                logger.warning("sandbox cgroups still busy, giving up: %s", [str(d) for _, d in cgroups])
                finished.append(item)
        with self._cond:
            for item in finished:
                if item in self._items:  # drain() at exit may sweep alongside the thread
                    self._items.remove(item)
            return not self._items

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
            if not self._sweep():
                time.sleep(0.002)

    def pending(self) -> int:
        """How many cleanups are not finished yet."""
        with self._cond:
            return len(self._items)

    def drain(self, timeout: float = 5.0) -> bool:
        """Finish every pending cleanup now (at most ``timeout`` seconds); True if none is left."""
        deadline = time.monotonic() + timeout
        while not self._sweep():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True


_janitor = _Janitor()
atexit.register(_janitor.drain)


# --- launches ----------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """How to start one command; call :meth:`cleanup` once it ended.

    Spawn ``Popen(argv, env=env, cwd=cwd, stdin=DEVNULL, stdout=PIPE, stderr=STDOUT, start_new_session=True,
    close_fds=True)`` from a thread that outlives the command (``--die-with-parent`` fires when the spawning
    *thread* exits), SIGKILL the leader's process group to stop it, then call :meth:`cleanup`.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    _cgroups: _Cgroups = field(default=(), repr=False)
    _cleaned: bool = field(default=False, repr=False)

    def cleanup(self) -> None:
        """SIGKILL anything still alive in this command's cgroup and remove the cgroup (idempotent).

        Processes that are still exiting keep the cgroup busy for a few milliseconds: its removal (and another
        kill pass) then finishes in a background thread rather than delaying the caller.
        """
        if self._cleaned:
            return
        self._cleaned = True
        if self._cgroups:
            _kill_pass(self._cgroups)
            if not _try_remove(self._cgroups):
                _janitor.submit(self._cgroups)


@functools.lru_cache(maxsize=8)
def _bwrap_path(bwrap: str) -> str | None:
    if os.sep in bwrap:
        return bwrap if os.access(bwrap, os.X_OK) and os.path.isfile(bwrap) else None
    return shutil.which(bwrap)


@functools.lru_cache(maxsize=8)
def _bwrap_options(path: str) -> frozenset[str]:
    """The options this bwrap knows (from ``--help``)."""
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(re.findall(r"^\s+(--[a-z0-9-]+)", out.stdout + out.stderr, re.M))


def _root_skeleton() -> list[str]:
    args: list[str] = []
    for directory in _ROOT_DIRS:
        if os.path.isdir(directory):
            args += ["--ro-bind", directory, directory]
    for link in _ROOT_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    return args


class Sandbox:
    """Builds the launch of every command of one agent: its worktree, environment and (optionally) git view.

    ``env`` is the commands' environment (e.g. ``safe_env()``); inside, ``HOME`` is ``/tmp/home``, ``TMPDIR`` is
    ``/tmp`` and ``PATH`` is kept (its toolchains are exposed). ``hide`` lists host paths to mask if they would
    otherwise be visible (e.g. the git credentials file). The static part of bwrap's argv is built once here;
    :meth:`launch` adds the per-command limits wrapper. Raises SandboxUnavailable if bubblewrap is missing.
    """

    def __init__(self, config: SandboxConfig, worktree: Path, env: Mapping[str, str], *, git: GitView | None = None,
                 hide: Sequence[Path] = ()) -> None:
        self.config = config
        self.worktree = Path(os.path.realpath(worktree))
        self.git = git
        self._env = dict(env)
        self._argv: list[str] = []
        self._plan: _LimitsPlan | None = None
        if config.mode == "off":
            return
        bwrap = _bwrap_path(config.bwrap)
        if bwrap is None:
            raise SandboxUnavailable(f"bubblewrap ({config.bwrap!r}) was not found. {_FIX_HINT}")
        self._plan = _limits_plan(config.limits)
        options = _bwrap_options(bwrap)
        wt = str(self.worktree)
        homes = _homes(self._env.get("HOME"))
        toolchains = _discover_toolchains(self._env.get("PATH", os.defpath), homes)

        # Directories that must stay invisible: every ancestor of them is refused as a toolchain bind.
        private = [*homes, os.path.dirname(wt)]
        if git is not None:
            private.append(os.path.dirname(os.path.realpath(git.common_dir)))

        argv = [bwrap]
        argv += ["--unshare-user"]
        if "--disable-userns" in options:
            argv += ["--disable-userns"]
        argv += ["--cap-drop", "ALL", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if config.network == "none":
            argv += ["--unshare-net"]
        argv += ["--new-session", "--die-with-parent"]
        argv += _root_skeleton()
        visible = [d for d in _SYSTEM_PREFIXES if os.path.isdir(d)]
        if config.network == "host":
            resolv = os.path.realpath("/etc/resolv.conf")
            if os.path.exists(resolv) and not _is_system(resolv):
                argv += ["--ro-bind", resolv, resolv]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        if "--size" in options:
            argv += ["--size", str(config.memory_mb * 1024 * 1024)]
        argv += ["--tmpfs", "/tmp", "--dir", SANDBOX_HOME]
        masks: list[str] = list(toolchains.masks)
        for src, dest in toolchains.binds:
            if any(_is_under(p, dest) or _is_under(p, src) for p in private) or _is_under(dest, wt):
                logger.debug("sandbox: not exposing toolchain %s (it holds a private directory)", dest)
                continue
            argv += ["--ro-bind", src, dest]
            visible.append(dest)
        if git is not None:
            common = os.path.realpath(git.common_dir)
            admin = os.path.realpath(git.admin_dir)
            argv += ["--ro-bind", common, common, "--ro-bind", _sanitized_git_config(git.common_dir),
                     os.path.join(common, "config")]
            hooks = os.path.join(common, "hooks")
            if os.path.isdir(hooks):
                argv += ["--tmpfs", hooks, "--remount-ro", hooks]
            worktrees = os.path.join(common, "worktrees")
            argv += ["--tmpfs", worktrees, "--ro-bind", admin, admin, "--remount-ro", worktrees]
            visible.append(common)
        argv += ["--bind", wt, wt]
        visible.append(wt)
        for path in [*_ALWAYS_HIDDEN, *(str(p) for p in hide), *masks]:
            target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
            if not os.path.lexists(target) or not any(_is_under(target, v) for v in visible):
                continue
            if os.path.isdir(target) and not os.path.islink(target):
                argv += ["--tmpfs", target, "--remount-ro", target]
            else:
                argv += ["--ro-bind", "/dev/null", target]
        argv += ["--remount-ro", "/", "--chdir", wt, "--", "/bin/bash", "-c"]
        self._argv = argv
        self._env.update({"HOME": SANDBOX_HOME, "TMPDIR": "/tmp", **dict(toolchains.env)})

    @property
    def limits(self) -> LimitsBackend | None:
        """The limits backend of this sandbox's launches (None when ``mode`` is ``"off"``)."""
        return None if self._plan is None else self._plan.backend

    def launch(self, command: str) -> Launch:
        """The argv, environment and cwd that run ``command`` confined (creates the command's cgroup)."""
        if self.config.mode == "off" or self._plan is None:
            return Launch(["/bin/bash", "-c", command], dict(self._env), str(self.worktree))
        cfg = self.config
        script: list[str] = []
        cgroups: list[tuple[_CgroupParent, Path]] = []
        try:
            for parent in self._plan.parents:
                directory = _make_cgroup(parent, cfg)
                cgroups.append((parent, directory))
                script.append(f"echo $$ > {shlex.quote(str(directory / 'cgroup.procs'))}")
        except OSError as exc:
            Launch([], {}, "", tuple(cgroups)).cleanup()
            raise SandboxUnavailable(f"could not create the command's cgroup: {exc}") from None
        if self._plan.backend == "rlimit":
            script.append(f"ulimit -v {cfg.memory_mb * 1024}")
            # dash and busybox: -p; bash: -u (its -p is the read-only pipe size).
            script.append(f"{{ ulimit -p {cfg.max_processes} 2>/dev/null || ulimit -u {cfg.max_processes}; }}")
        script += ["ulimit -c 0", f"ulimit -f {cfg.max_file_mb * 2048}", 'exec "$0" "$@"']
        argv = ["/bin/sh", "-c", " && ".join(script), *self._argv, command]
        return Launch(argv, dict(self._env), str(self.worktree), tuple(cgroups))


def _make_cgroup(parent: _CgroupParent, cfg: SandboxConfig) -> Path:
    name = f"{os.getpid()}-{secrets.token_hex(6)}"
    directory = parent.directory / name
    for attempt in range(10):
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent.directory)
            if parent.controller == "unified":
                _enable_controllers(parent.directory)
            os.mkdir(directory)
            break
        except FileNotFoundError:  # a concurrent cleanup removed the empty parent: try again
            if attempt == 9:
                raise
    memory = cfg.memory_mb * 1024 * 1024
    try:
        if parent.controller == "unified":
            _write(directory / "memory.max", str(memory))
            for knob, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if (directory / knob).exists():
                    _write(directory / knob, value)
            _write(directory / "pids.max", str(cfg.max_processes))
        elif parent.controller == "memory":
            _write(directory / "memory.limit_in_bytes", str(memory))
            if (directory / "memory.memsw.limit_in_bytes").exists():
                with contextlib.suppress(OSError):
                    _write(directory / "memory.memsw.limit_in_bytes", str(memory))
        else:
            _write(directory / "pids.max", str(cfg.max_processes))
    except OSError:
        with contextlib.suppress(OSError):
            directory.rmdir()
        raise
    return directory


# --- availability ------------------------------------------------------------------------------------------------

_verdicts: dict[SandboxConfig, str | None] = {}
_verdicts_lock = threading.Lock()


def check_available(config: SandboxConfig) -> None:
    """Raise SandboxUnavailable (with a fix hint) unless commands can run confined under ``config``.

    ``mode="off"`` always passes. Otherwise a trial run of the real launch shape (``true``) must succeed. The
    verdict is cached per process.
    """
    if config.mode == "off":
        return
    with _verdicts_lock:
        if config not in _verdicts:
            _verdicts[config] = _trial_run(config)
        problem = _verdicts[config]
    if problem is not None:
        raise SandboxUnavailable(problem)


def _trial_run(config: SandboxConfig) -> str | None:
    if _bwrap_path(config.bwrap) is None:
        return f"bubblewrap ({config.bwrap!r}) was not found. {_FIX_HINT}"
    with tempfile.TemporaryDirectory(prefix="orchestrator-sandbox-check-") as tmp:
        try:
            sandbox = Sandbox(config, Path(tmp), {"PATH": "/usr/bin:/bin"})
            launch = sandbox.launch("true")
        except SandboxUnavailable as exc:
            return f"{exc}. {_FIX_HINT}"
        try:
            proc = subprocess.run(launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=30, check=False, start_new_session=True)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"bubblewrap ({config.bwrap!r}) could not be run: {exc}. {_FIX_HINT}"
        finally:
            launch.cleanup()
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-500:] or f"exit code {proc.returncode}"
        return f"bubblewrap ({config.bwrap!r}) cannot create a sandbox here: {detail}. {_FIX_HINT}"
    return None
