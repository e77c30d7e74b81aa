"""Cutting a model call from another thread: a silent server, a stalled stream, and a cut before the call."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx2
import pytest

from orchestrator.agent import transport

MESSAGE = {"model": "claude-sonnet-5-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


class SilentServer:
    """Accepts connections and reads requests; ``headers`` decides whether it ever answers with anything."""

    def __init__(self, send_headers: bool) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.send_headers = send_headers
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.recv(65536)
            if self.send_headers:  # a stream that starts and then stalls forever
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n")

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture(params=[False, True], ids=["before-headers", "mid-stream"])
def server(request: Any) -> Iterator[SilentServer]:
    srv = SilentServer(send_headers=request.param)
    yield srv
    srv.close()


def client(port: int) -> anthropic.Anthropic:
    c = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0, timeout=60)
    transport.install(c._client)
    return c


def call(c: anthropic.Anthropic, started: threading.Event, ident: list[int]) -> float:
    ident.append(transport.begin())
    started.set()
    t0 = time.monotonic()
    try:
        with c.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
            for _ in stream:
                pass
    except (anthropic.APIConnectionError, httpx2.HTTPError):  # mid-stream the SDK lets httpx2's error through
        return time.monotonic() - t0
    finally:
        transport.end(ident[0])
    raise AssertionError("the call returned instead of being cut")


def test_a_cut_from_another_thread_ends_a_blocked_call_at_once(server: SilentServer) -> None:
    c = client(server.port)
    started, ident = threading.Event(), []  # type: ignore[var-annotated]
    with ThreadPoolExecutor(1) as pool:  # the call runs in a pool thread, as in Celery's threads pool
        future = pool.submit(call, c, started, ident)
        started.wait(5)
        time.sleep(0.5)  # the call is now blocked on its socket
        cut_at = time.monotonic()
        assert transport.cut(ident[0])
        elapsed = future.result(timeout=5)
    assert time.monotonic() - cut_at < 0.5 and elapsed >= 0.5


def test_a_cut_that_lands_before_the_call_blocks_is_not_lost(server: SilentServer) -> None:
    c = client(server.port)
    ident = transport.begin()
    transport.cut(ident)  # the stop arrives between the call's start and its first read
    t0 = time.monotonic()
    with pytest.raises((anthropic.APIConnectionError, httpx2.HTTPError)), c.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 1.0
    transport.end(ident)


def test_other_threads_calls_are_untouched(server: SilentServer) -> None:
    c = client(server.port)
    a_started, b_started = threading.Event(), threading.Event()
    a_ident: list[int] = []
    b_ident: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(call, c, a_started, a_ident)
        b = pool.submit(call, c, b_started, b_ident)
        a_started.wait(5)
        b_started.wait(5)
        time.sleep(0.3)
        transport.cut(a_ident[0])
        a.result(timeout=5)
        time.sleep(0.5)
        assert not b.done()  # b is still waiting on its own socket
        transport.cut(b_ident[0])
        b.result(timeout=5)
