"""One redaction function for every text that leaves the process: logs, errors, records, listings.

``redact`` removes URL userinfo passwords (any characters, up to the last ``@`` before the host), ``https://TOKEN@``
users, ``user:password@host:path`` git addresses, credential query parameters, ``Authorization`` header values and
every secret registered here (exact strings, longest first). What it removes becomes ``***``."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from orchestrator.settings import Settings

MARK = "***"
MIN_SECRET_CHARS = 6

_lock = threading.Lock()
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None

_SCHEME_RE = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*)://")
# What follows the userinfo's last '@': a host (name, IPv4 or [IPv6]) and an optional port, then the end of the
# authority.
_HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%-]+)(?::\d{0,5})?(?=[/?#\s'\"<>)\],;|\\]|$)")
_HOST_PORT_RE = re.compile(r"[^\s:@/]*:\d{1,5}(?:[\s/]|$)")  # "localhost:6379 ..." is a host, not a user
_TOKEN_USER_SCHEMES = ("http", "https", "ws", "wss")
_PARAM_NAMES = (
    "token", "access_token", "refresh_token", "id_token", "auth_token", "api_key", "apikey", "api-key", "key",
    "client_secret", "secret", "password", "passwd", "pwd", "sig", "signature", "x-amz-signature",
    "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential", "private_token",
)
_PARAM_RE = re.compile(r"(?i)(?<![A-Za-z0-9_.-])(" + "|".join(re.escape(n) for n in _PARAM_NAMES)
                       + r")=([^&\s#'\"<>]+)")
_AUTH_HEADER_RE = re.compile(
    r"(?i)((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)(?:(bearer|basic|token|digest|negotiate)\s+)?"
    r"([^\s'\",;}]+)")
_BEARER_RE = re.compile(r"(?<![A-Za-z])(Bearer\s+)[A-Za-z0-9._~+/-]{8,}=*")
# scp-like git addresses with a password: user:password@host:path
_SCP_RE = re.compile(r"(?<![A-Za-z0-9._~+/:@-])([A-Za-z0-9._-]+):(?!//)\S+@(?=[A-Za-z0-9.-]+:)")


def register_secret(value: str | None) -> None:
    """Add a known secret; every exact occurrence is redacted from now on (values under 6 chars are ignored)."""
    global _secrets_re
    if not value or len(value) < MIN_SECRET_CHARS:
        return
    with _lock:
        if value in _secrets:
            return
        _secrets.add(value)
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in ordered))


def forget_secrets() -> None:
    """Drop every registered secret (for tests)."""
    global _secrets_re
    with _lock:
        _secrets.clear()
        _secrets_re = None


def url_secrets(url: str) -> list[str]:
    """The passwords (and ``https://TOKEN@`` tokens, and credential query values) found in a URL or URL list,
    both as written and percent-decoded."""
    found: list[str] = []
    for scheme, start, at, _colon_user in userinfo_spans(url):
        userinfo = url[start:at]
        user, sep, password = userinfo.partition(":")
        if sep:
            found += [password, unquote(password)]
        elif _token_user_scheme(scheme):
            found += [user, unquote(user)]
    for match in _PARAM_RE.finditer(url):
        found += [match.group(2), unquote(match.group(2))]
    return [s for s in found if s]


def register_settings_secrets(settings: Settings) -> None:
    """Register the fleet's secrets: the API key, the webhook secret, Valkey passwords and git credentials."""
    register_secret(os.environ.get("ANTHROPIC_API_KEY"))
    if settings.webhook_secret is not None:
        register_secret(settings.webhook_secret.get_secret_value())
    for url in (settings.broker_url, settings.state_url, settings.result_backend):
        for secret in url_secrets(url or ""):
            register_secret(secret)
    if settings.git_credentials_file is not None:
        for secret in git_credential_secrets(settings.git_credentials_file):
            register_secret(secret)


def git_credential_secrets(path: Path) -> list[str]:
    """Passwords of a git-credential-store file (one ``https://user:pass@host`` per line); [] if unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [secret for line in text.splitlines() if line.strip() for secret in url_secrets(line.strip())]


def redact(text: str) -> str:
    """``text`` without credentials: registered secrets, URL passwords and tokens, credential query values and
    ``Authorization`` header values, each replaced by ``***``."""
    if not text:
        return text
    pattern = _secrets_re
    if pattern is not None:
        text = pattern.sub(MARK, text)
    text = _redact_userinfo(text)
    text = _SCP_RE.sub(lambda m: f"{m.group(1)}:{MARK}@", text)
    text = _PARAM_RE.sub(lambda m: f"{m.group(1)}={MARK}", text)
    text = _AUTH_HEADER_RE.sub(lambda m: f"{m.group(1)}{m.group(2) + ' ' if m.group(2) else ''}{MARK}", text)
    return _BEARER_RE.sub(lambda m: f"{m.group(1)}{MARK}", text)


def userinfo_spans(text: str) -> list[tuple[str, int, int, bool]]:
    """(scheme, userinfo start, index of its last '@', whether a ':' separates a user) for each URL with userinfo.

    The userinfo runs to the last '@' that is followed by a host, within the URL's run of non-blank characters, or,
    when it starts like ``user:password`` (not ``host:port``), within the rest of the line up to the next URL: a
    password may hold blanks, and over-redacting is the safe error. A candidate holding '/', '?' or '#' but no ':' is
    a path (``https://registry/@scope/pkg``), not userinfo.
    """
    spans = []
    matches = list(_SCHEME_RE.finditer(text))
    for i, match in enumerate(matches):
        start = match.end()
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        if i + 1 < len(matches):
            line_end = min(line_end, matches[i + 1].start())  # one URL ends where the next begins
        blank = re.search(r"\s", text[start:line_end])
        head = text[start:line_end]
        if blank is not None and re.match(r"[^\s:@/]*:", head) and not _HOST_PORT_RE.match(head):
            at = _last_host_at(text, start, line_end)  # "user:pass word@host": greedy to the line's last '@'
        else:
            at = _last_host_at(text, start, start + blank.start() if blank else line_end)
        if at is not None:
            spans.append((match.group(1), start, at, ":" in text[start:at]))
    return spans


def _token_user_scheme(scheme: str) -> bool:
    """Whether a lone user name in this scheme's URLs is a token (``https://TOKEN@host``, ``git+https``...)."""
    return scheme.lower().rsplit("+", 1)[-1] in _TOKEN_USER_SCHEMES


def _last_host_at(text: str, start: int, end: int) -> int | None:
    at = text.rfind("@", start, end)
    while at >= start:
        candidate = text[start:at]
        if _HOST_RE.match(text, at + 1) and (":" in candidate or not re.search(r"[/?#]", candidate)):
            return at
        at = text.rfind("@", start, at)
    return None


def _redact_userinfo(text: str) -> str:
    spans = userinfo_spans(text)
    if not spans:
        return text
    out, pos = [], 0
    for scheme, start, at, has_colon in spans:
        if start < pos:
            continue  # inside a span already redacted
        userinfo = text[start:at]
        if has_colon:
            user = userinfo.split(":", 1)[0]
            replacement = f"{user}:{MARK}" if user else MARK
        elif _token_user_scheme(scheme):
            replacement = MARK
        else:
            continue  # ssh://git@host, redis://default@host: a user name, no secret
        out += [text[pos:start], replacement]
        pos = at
    out.append(text[pos:])
    return "".join(out)
