"""Webhooks (CONTRACT section 3): timestamped HMAC signatures, a verifier for receivers, and an SSRF-safe POST.

``deliver`` resolves the host once, refuses it if any address is loopback, link-local, private, shared (CGNAT),
multicast, reserved or unspecified (IPv4-mapped and other embedded IPv4 forms included) unless the allowlist names
it, then connects to the vetted address itself (no second lookup a rebinding DNS server could answer differently),
with the original ``Host`` header and, for https, certificate and SNI checks against the original host name.
Redirects are never followed. Plain ``http://`` goes only to hosts the allowlist names.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from orchestrator.redaction import redact

SIGNATURE_HEADER = "X-Orchestrator-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT_HEADER = "X-Orchestrator-Event"
MAX_RESPONSE_BYTES = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookError(Exception):
    """A delivery that did not get a 2xx: refused, unreachable, redirected or answered with an error.
    The message is redacted."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Orchestrator-Signature`` value: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>``."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_digest(secret, t, body)}"


def _digest(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_seconds: int = 300,
           now: float | None = None) -> bool:
    """Whether a request is a fresh, untampered webhook of the fleet: a ``v1`` signature matches (constant-time),
    its timestamp is within ``tolerance_seconds`` of now, and the ``Idempotency-Key`` header (when present) equals
    the body's ``idempotency_key`` (when it has one). False on anything malformed; never raises."""
    try:
        if not secret or not isinstance(body, bytes):
            return False
        lowered = {str(k).lower(): str(v) for k, v in headers.items()}
        header = lowered.get(SIGNATURE_HEADER.lower())
        if header is None:
            return False
        t: int | None = None
        candidates = []
        for part in header.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep:
                return False
            if name == "t":
                if t is not None or not value.isdigit() or len(value) > 12:
                    return False
                t = int(value)
            elif name == "v1":
                candidates.append(value)
        if t is None or not candidates:
            return False
        moment = time.time() if now is None else now
        if abs(moment - t) > tolerance_seconds:
            return False
        expected = _digest(secret, t, body)
        if not any(hmac.compare_digest(expected.encode(), c.encode()) for c in candidates if c.isascii()):
            return False
        return _idempotency_matches(lowered.get(IDEMPOTENCY_HEADER.lower()), body)
    except Exception:
        return False


def _idempotency_matches(header: str | None, body: bytes) -> bool:
    if header is None:
        return True
    try:
        doc = json.loads(body)
    except ValueError:
        return True
    if not isinstance(doc, dict) or "idempotency_key" not in doc:
        return True
    return hmac.compare_digest(str(doc["idempotency_key"]).encode(), header.encode())


@dataclass(frozen=True)
class Allowlist:
    """``ORCHESTRATOR_WEBHOOK_ALLOWED_HOSTS``: host names and CIDRs (comma-separated) exempt from the SSRF check."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, allowed_hosts: str) -> Allowlist:
        """Read the comma-separated setting (a bare IP is a one-address network)."""
        names, networks = set(), []
        for entry in (e.strip().lower().rstrip(".") for e in allowed_hosts.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    def names_host(self, host: str) -> bool:
        """Whether the host name itself is listed (or is an IP inside a listed network)."""
        if host.lower().rstrip(".") in self.names:
            return True
        ip = parse_ip(host)
        return ip is not None and self.contains(ip)

    def contains(self, ip: IPAddress) -> bool:
        """Whether a listed network holds the address (or its embedded IPv4 form)."""
        forms = [ip, *_embedded_ipv4(ip)]
        return any(form.version == net.version and form in net for form in forms for net in self.networks)


def parse_ip(host: str) -> IPAddress | None:
    """The IP address a host string spells (``[::1]`` too), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found += list(ip.teredo)
    if ip in _NAT64 or ip.packed[:12] == bytes(12):  # NAT64 and the deprecated IPv4-compatible ::a.b.c.d
        found.append(ipaddress.IPv4Address(ip.packed[12:]))
    return found


def is_public(ip: IPAddress) -> bool:
    """Whether an address is globally reachable unicast (and so is any IPv4 address embedded in it)."""
    return all(a.is_global and not a.is_multicast and not a.is_reserved and not a.is_unspecified
               for a in (ip, *_embedded_ipv4(ip)))


def vet_addresses(host: str, port: int, allowlist: Allowlist) -> list[IPAddress]:
    """Resolve ``host`` once; its addresses if every one is public or allowed, else WebhookError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise WebhookError(f"webhook host {host} does not resolve: {exc}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = parse_ip(str(info[4][0]))
        if ip is not None and ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise WebhookError(f"webhook host {host} has no address")
    if allowlist.names_host(host):
        return addresses
    refused = [str(ip) for ip in addresses if not is_public(ip) and not allowlist.contains(ip)]
    if refused:
        raise WebhookError(f"webhook host {host} resolves to a non-public address ({', '.join(refused)}); list it "
                           "in ORCHESTRATOR_WEBHOOK_ALLOWED_HOSTS to allow it")
    return addresses


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a vetted address, with the ``Host`` header of the original name."""

    def __init__(self, host: str, port: int, ip: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.pinned_ip = str(ip)

    def connect(self) -> None:
        """Connect to the pinned address, never resolving the name again."""
        self.sock = socket.create_connection((self.pinned_ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted address; the certificate and SNI are checked against the original host name."""

    def __init__(self, host: str, port: int, ip: IPAddress, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.pinned_ip = str(ip)
        self.tls_context = context

    def connect(self) -> None:
        """Connect to the pinned address and start TLS for the original host name."""
        sock = socket.create_connection((self.pinned_ip, self.port), self.timeout)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


def deliver(url: str, body: bytes, headers: Mapping[str, str], *, allowed_hosts: str, timeout: float = 10) -> int:
    """POST ``body`` to ``url``; the HTTP status when it is 2xx, else WebhookError (redacted message)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise WebhookError("webhook URL is malformed") from None
    if parts.scheme not in {"https", "http"} or not host:
        raise WebhookError("webhook URL must be https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookError("webhook URL must not carry credentials")
    allowlist = Allowlist.parse(allowed_hosts)
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = vet_addresses(host, port, allowlist)
    if parts.scheme == "http" and not (allowlist.names_host(host) or all(allowlist.contains(a) for a in addresses)):
        raise WebhookError(f"plain http:// webhook to {host} refused: use https://, or list the host in "
                           "ORCHESTRATOR_WEBHOOK_ALLOWED_HOSTS")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    errors = []
    for ip in addresses:
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = _PinnedHTTPSConnection(host, port, ip, timeout, ssl.create_default_context())
        else:
            conn = _PinnedHTTPConnection(host, port, ip, timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                errors.append(f"{ip}: {exc}")
                continue  # the next vetted address
            conn.request("POST", target, body=body, headers=dict(headers))
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            raise WebhookError(f"webhook {url} failed: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if 200 <= status < 300:
            return status
        if 300 <= status < 400:
            raise WebhookError(f"webhook answered HTTP {status}: redirect not followed")
        raise WebhookError(f"webhook answered HTTP {status}")
    raise WebhookError(f"webhook {url} unreachable: {'; '.join(errors)}")
