"""Webhooks: timestamped signatures a receiver can verify, and an SSRF-safe delivery to real loopback servers."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator.webhooks import Allowlist, WebhookError, deliver, is_public, parse_ip, sign, verify

SECRET = "whsec-test-secret"
BODY = json.dumps({"agent_id": "a1", "status": "completed", "idempotency_key": "a1:k1"}).encode()


class Receiver:
    """A real HTTP(S) server on a free loopback port that records each request and answers ``status`` (after
    ``delay`` seconds)."""

    def __init__(self, status: int = 200, location: str | None = None, tls: ssl.SSLContext | None = None,
                 delay: float = 0.0) -> None:
        self.status, self.location, self.delay = status, location, delay
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                time.sleep(receiver.delay)
                self.send_response(receiver.status)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # a followed 302/303 would arrive as a GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every address ``socket.create_connection`` is asked for (a spy on the standard library; it still connects)."""
    seen: list[Any] = []
    real = socket.create_connection

    def spy(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        seen.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return seen


T0 = 1_800_000_000  # "now" for the table of refusals


def headers_for(body: bytes, t: int | None = T0, key: str | None = "a1:k1") -> dict[str, str]:
    h = {"X-Orchestrator-Signature": sign(SECRET, body, t)}
    if key is not None:
        h["Idempotency-Key"] = key
    return h


# -- sign / verify ---------------------------------------------------------------------------------------------

def test_sign_format_and_round_trip() -> None:
    signature = sign(SECRET, BODY, 1_700_000_000)
    t, v1 = signature.split(",")
    assert t == "t=1700000000" and v1.startswith("v1=") and len(v1) == 3 + 64
    assert verify(SECRET, {"X-Orchestrator-Signature": signature}, BODY, now=1_700_000_100)
    assert verify(SECRET, {"x-orchestrator-signature": sign(SECRET, BODY)}, BODY)  # header name case-insensitive
    assert verify(SECRET, headers_for(BODY, None), BODY)
    assert verify(SECRET, headers_for(BODY, T0 - 299), BODY, now=T0)  # within the tolerance


def test_several_v1_values_one_matching_is_enough() -> None:
    good = sign(SECRET, BODY, 1_700_000_000).split(",")[1]
    header = f"t=1700000000,v1={'0' * 64},{good}"
    assert verify(SECRET, {"X-Orchestrator-Signature": header}, BODY, now=1_700_000_000)


@pytest.mark.parametrize(("case", "headers", "body", "secret"), [
    ("stale timestamp", headers_for(BODY, T0 - 301), BODY, SECRET),
    ("timestamp from the future", headers_for(BODY, T0 + 301), BODY, SECRET),
    ("changed body", headers_for(BODY), BODY.replace(b"completed", b"failed"), SECRET),
    ("wrong secret", headers_for(BODY), BODY, "another-secret"),
    ("empty secret", headers_for(BODY), BODY, ""),
    ("missing header", {"Idempotency-Key": "a1:k1"}, BODY, SECRET),
    ("garbled header", {"X-Orchestrator-Signature": "sha256=abc"}, BODY, SECRET),
    ("no v1", {"X-Orchestrator-Signature": f"t={T0}"}, BODY, SECRET),
    ("non-numeric t", {"X-Orchestrator-Signature": "t=now,v1=00"}, BODY, SECRET),
    ("two t values", {"X-Orchestrator-Signature": f"t=1,{sign(SECRET, BODY, T0)}"}, BODY, SECRET),
    ("non-ascii v1", {"X-Orchestrator-Signature": f"t={T0},v1=\u00e9\u00e9"}, BODY, SECRET),
    ("idempotency key differs from the body's", headers_for(BODY, key="a1:other"), BODY, SECRET),
])
def test_verify_refuses(case: str, headers: dict[str, str], body: bytes, secret: str) -> None:
    assert verify(secret, headers, body, now=T0) is False, case
    assert verify(SECRET, headers_for(BODY), BODY, now=T0)  # the same call with a good request passes


def test_verify_never_raises_on_junk() -> None:
    junk: list[Any] = [None, 42, {"X-Orchestrator-Signature": None}, {"X-Orchestrator-Signature": "=,=,=="}]
    for headers in junk:
        assert verify(SECRET, headers, BODY) is False
    assert verify(SECRET, headers_for(BODY), "not bytes") is False  # type: ignore[arg-type]
    assert verify(None, headers_for(BODY), BODY) is False  # type: ignore[arg-type]


# -- address vetting -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("fc00::1", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("239.1.1.1", False), ("ff02::1", False), ("240.0.0.1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("2002:a00:1::", False),
    ("64:ff9b::a9fe:a9fe", False), ("::a00:1", False),
])
def test_is_public(address: str, public: bool) -> None:
    ip = parse_ip(address)
    assert ip is not None and is_public(ip) is public


def test_allowlist_names_and_cidrs() -> None:
    allow = Allowlist.parse(" Hooks.Internal. , 10.0.0.0/8,127.0.0.1 ,[::1]")
    assert allow.names_host("hooks.internal") and allow.names_host("HOOKS.internal.")
    assert allow.names_host("10.9.8.7") and allow.names_host("127.0.0.1") and allow.names_host("::1")
    assert not allow.names_host("127.0.0.2") and not allow.names_host("other.internal")
    mapped = parse_ip("::ffff:10.1.1.1")
    assert mapped is not None and allow.contains(mapped)


# -- delivery --------------------------------------------------------------------------------------------------

def test_loopback_is_refused_without_the_allowlist(receiver: Receiver, connections: list[Any]) -> None:
    with pytest.raises(WebhookError, match="non-public address"):
        deliver(f"https://127.0.0.1:{receiver.port}/hook", BODY, {}, allowed_hosts="")
    assert receiver.requests == [] and connections == []


@pytest.mark.parametrize("allowed", ["127.0.0.1", "127.0.0.0/8", "example.org, 127.0.0.0/8"])
def test_allowlisted_loopback_is_delivered(receiver: Receiver, allowed: str) -> None:
    headers = {"Content-Type": "application/json", **headers_for(BODY, None)}
    assert deliver(f"http://127.0.0.1:{receiver.port}/hook?x=1", BODY, headers, allowed_hosts=allowed) == 200
    [(path, got, body)] = receiver.requests
    assert path == "/hook?x=1" and body == BODY
    assert got["host"] == f"127.0.0.1:{receiver.port}"
    assert verify(SECRET, got, body)


def test_redirect_is_not_followed(receiver: Receiver) -> None:
    target = receiver
    redirector = Receiver(status=302, location=f"http://127.0.0.1:{target.port}/stolen")
    try:
        with pytest.raises(WebhookError, match="redirect not followed"):
            deliver(f"http://127.0.0.1:{redirector.port}/hook", BODY, {}, allowed_hosts="127.0.0.1")
        assert len(redirector.requests) == 1
        time.sleep(0.2)
        assert target.requests == []
    finally:
        redirector.stop()


@pytest.mark.parametrize("status", [500, 404, 429, 304])
def test_non_2xx_raises(status: int) -> None:
    r = Receiver(status=status)
    try:
        with pytest.raises(WebhookError, match=f"HTTP {status}"):
            deliver(f"http://127.0.0.1:{r.port}/", BODY, {}, allowed_hosts="127.0.0.1")
    finally:
        r.stop()


def test_any_2xx_acknowledges() -> None:
    r = Receiver(status=204)
    try:
        assert deliver(f"http://127.0.0.1:{r.port}/", BODY, {}, allowed_hosts="127.0.0.1") == 204
    finally:
        r.stop()


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "https://169.254.169.254/",
                                 "https://[::ffff:169.254.169.254]/", "https://[::1]/", "https://10.0.0.1/"])
def test_metadata_and_private_addresses_are_refused_without_connecting(url: str, connections: list[Any]) -> None:
    with pytest.raises(WebhookError, match=r"non-public address|http://"):
        deliver(url, BODY, {}, allowed_hosts="")
    assert connections == []


def test_a_name_resolving_to_loopback_is_refused(receiver: Receiver, connections: list[Any]) -> None:
    with pytest.raises(WebhookError, match="non-public address"):
        deliver(f"https://localhost:{receiver.port}/hook", BODY, {}, allowed_hosts="")
    with pytest.raises(WebhookError, match="non-public address"):
        deliver(f"https://localhost:{receiver.port}/hook", BODY, {}, allowed_hosts="127.0.0.2, other.example")
    assert connections == [] and receiver.requests == []


def test_plain_http_needs_the_host_on_the_allowlist(connections: list[Any]) -> None:
    with pytest.raises(WebhookError, match=r"http://"):
        deliver("http://93.184.215.14/hook", BODY, {}, allowed_hosts="")
    assert connections == []


def test_credentials_and_other_schemes_are_refused() -> None:
    for url in ("https://user:pw@example.com/", "ftp://example.com/", "file:///etc/passwd", "https:///nohost"):
        with pytest.raises(WebhookError) as info:
            deliver(url, BODY, {}, allowed_hosts="")
        assert "pw@" not in str(info.value)


def test_the_vetted_address_is_pinned(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebinding DNS server answers loopback (allowed) first, then something else: only one lookup is made."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            lookups.append(host)
            return real("127.0.0.1" if len(lookups) == 1 else "169.254.169.254", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert deliver(f"http://rebind.test:{receiver.port}/h", BODY, {}, allowed_hosts="rebind.test") == 200
    assert lookups == ["rebind.test"]
    assert receiver.requests[0][1]["host"] == f"rebind.test:{receiver.port}"  # the original Host header


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context with a self-signed certificate for ``hook.test``, trusted by this process's default
    context (SSL_CERT_FILE), and ``hook.test``/``other.test`` resolving to 127.0.0.1."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=hook.test", "-addext", "subjectAltName=DNS:hook.test"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host in {"hook.test", "other.test"} else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_https_checks_the_certificate_against_the_original_name(tls: ssl.SSLContext) -> None:
    server = Receiver(tls=tls)
    try:
        assert deliver(f"https://hook.test:{server.port}/h", BODY, {}, allowed_hosts="127.0.0.1") == 200
        assert server.requests[0][1]["host"] == f"hook.test:{server.port}"
        with pytest.raises(WebhookError, match=r"CERTIFICATE_VERIFY_FAILED|certificate|hostname"):
            deliver(f"https://other.test:{server.port}/h", BODY, {}, allowed_hosts="127.0.0.1")
        assert len(server.requests) == 1
    finally:
        server.stop()
