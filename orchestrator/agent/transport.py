"""Cut a model call from any thread, at once, whatever it is waiting for.

The SDK's HTTP stack (httpx2 over httpcore2) reads and writes through a network backend; ``install`` wraps the
backends of an SDK client so that every read and write first records, for the calling thread, the socket it is
about to block on. ``cut(thread)`` marks that thread's call as cut and shuts its socket down: a ``recv`` blocked in
another thread returns at once (before the response headers as well as mid-stream), and any later read or connect
of that thread fails until ``end`` clears the mark. No signal is involved, so this works in any thread of any Celery
pool (prefork or threads), and a half-read pooled connection is discarded by httpcore, never reused.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable
from typing import Any

import httpcore2
from httpcore2 import NetworkStream

_lock = threading.Lock()
_sockets: dict[int, socket.socket] = {}  # thread ident -> the socket that thread last read or wrote
_cut: set[int] = set()  # threads whose current call was cut


class CallCut(httpcore2.ReadError):
    """The calling thread's model call was cut on purpose (kill, killswitch, duration limit)."""


def _enter(stream: NetworkStream) -> None:
    ident = threading.get_ident()
    sock = stream.get_extra_info("socket")
    with _lock:
        if isinstance(sock, socket.socket):
            _sockets[ident] = sock
        cut = ident in _cut
    if cut:
        raise CallCut("model call cut by a stop request")


class _Stream(NetworkStream):
    """A network stream that registers its socket for the calling thread before each read and write."""

    def __init__(self, inner: NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        _enter(self._inner)
        data: bytes = self._inner.read(max_bytes, timeout)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _enter(self._inner)
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore2.NetworkBackend):
    """Wraps the streams of another backend in ``_Stream``; refuses to connect for a cut thread."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> NetworkStream:
        if threading.get_ident() in _cut:
            raise CallCut("model call cut by a stop request")
        return _Stream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> NetworkStream:
        if threading.get_ident() in _cut:
            raise CallCut("model call cut by a stop request")
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def install(http_client: Any) -> Any:
    """Wrap the network backend of every transport of an httpx2 client (the SDK's ``_client``); returns it."""
    transports = [getattr(http_client, "_transport", None), *getattr(http_client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is not None and not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend)  # type: ignore[union-attr]
    return http_client


def begin() -> int:
    """Start a call in this thread (forgets an older cut); returns the thread's ident for ``cut``."""
    ident = threading.get_ident()
    with _lock:
        _cut.discard(ident)
        _sockets.pop(ident, None)
    return ident


def end(ident: int) -> None:
    """The thread's call is over: forget its socket and any cut."""
    with _lock:
        _cut.discard(ident)
        _sockets.pop(ident, None)


def cut(ident: int) -> bool:
    """Cut the call of thread ``ident`` now; True if a socket was shut down under it."""
    with _lock:
        _cut.add(ident)
        sock = _sockets.get(ident)
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    return True
