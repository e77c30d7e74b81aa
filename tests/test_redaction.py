"""Redaction: one function removes every kind of credential from any text, and the fleet registers its secrets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.redaction import forget_secrets, redact, register_secret, register_settings_secrets
from orchestrator.settings import Settings, redact_text, redact_url


@pytest.fixture(autouse=True)
def _no_secrets() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


# (input, what must be gone, what must stay)
CASES: list[tuple[str, list[str], list[str]]] = [
    ("redis://:p#a/s@s@host:6379/0", ["p#a", "a/s", "s@s", "#"], ["redis://***@host:6379/0"]),
    ("redis://user:p@ss w:rd@valkey:6379/0 is down", ["p@ss", "w:rd"], ["redis://user:***@valkey:6379/0 is down"]),
    ("redis://:my pass@host:6379/0 failed", ["my pass"], ["redis://***@host:6379/0 failed"]),
    ("redis://u:p%40ss%2F@h/0", ["p%40ss"], ["redis://u:***@h/0"]),
    ("https://user:tok@github.com/o/r.git", ["tok@"], ["https://user:***@github.com/o/r.git"]),
    ("https://ghp_abcdef123@github.com/o/r.git", ["ghp_abcdef123"], ["https://***@github.com/o/r.git"]),
    ("git+https://ghp_abcdef123@github.com/o/r", ["ghp_abcdef123"], ["github.com/o/r"]),
    ("sentinel://:pw1@s1:26379;sentinel://:pw2@s2:26379", ["pw1", "pw2"],
     ["sentinel://***@s1:26379;sentinel://***@s2:26379"]),
    ("clone (https://a:b3cret@c.example/x) failed", ["b3cret"], ["(https://a:***@c.example/x) failed"]),
    ("see 'https://u:pw#frag@h.example/x'", ["pw#frag"], ["https://u:***@h.example/x'"]),
    ("https://h.example/x?token=abc123&X-Amz-Signature=f00d&a=1", ["abc123", "f00d"],
     ["?token=***&X-Amz-Signature=***&a=1"]),
    ("GET /hook?API_KEY=k-1&sig=s-2&password=p-3&secret=s-4&access_token=t-5&key=k-6", ["k-1", "s-2", "p-3", "s-4",
                                                                                        "t-5", "k-6"], ["GET /hook?"]),
    ("Authorization: Bearer sk-ant-api03-abcdefghij", ["sk-ant-api03"], ["Authorization: Bearer ***"]),
    ("{'Authorization': 'Basic dXNlcjpwYXNzd29yZA=='}", ["dXNlcjpwYXNz"], ["'Authorization': 'Basic ***'"]),
    ("proxy-authorization=Token abcdef0123", ["abcdef0123"], ["proxy-authorization=Token ***"]),
    ("sent with Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", ["eyJhbGci"], ["Bearer ***"]),
    ("clone bot:s3cr#t/x@github.com:o/r.git", ["s3cr#t"], ["clone bot:***@github.com:o/r.git"]),
    # no credentials: unchanged
    ("redis://localhost:6379/0", [], ["redis://localhost:6379/0"]),
    ("ssh://git@github.com/o/r.git and git@github.com:o/r.git", [], ["ssh://git@github.com/o/r.git and git@github"]),
    ("https://registry.npmjs.org/@scope/pkg", [], ["https://registry.npmjs.org/@scope/pkg"]),
    ("redis://localhost:6379 failed, mail admin@example.com", [], ["redis://localhost:6379 failed, mail admin@"]),
    ("total_tokens=5 max_tokens=10 cache_key=abc", [], ["total_tokens=5 max_tokens=10 cache_key=abc"]),
]


@pytest.mark.parametrize(("text", "gone", "kept"), CASES, ids=[c[0][:40] for c in CASES])
def test_redact_table(text: str, gone: list[str], kept: list[str]) -> None:
    out = redact(text)
    for secret in gone:
        assert secret not in out, out
    for part in kept:
        assert part in out, out
    assert redact(out) == out  # idempotent
    assert redact_text(text) == out and redact_url(text) == out  # the old names are thin wrappers


def test_registered_secrets_longest_first_and_short_ones_ignored() -> None:
    register_secret("abcdef")
    register_secret("abcdefghij")
    register_secret("pw1")  # too short to register: it would redact ordinary words
    out = redact("x abcdefghij y abcdef z pw1")
    assert out == "x *** y *** z pw1"


def test_settings_secrets_are_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "git-credentials"
    creds.write_text("https://bot:gh-push-token-1@github.com\nhttps://ci:p%23ss%2Fword@git.example\n")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-the-api-key")
    s = Settings(broker_url="redis://:broker-pass-1@vk:6379/0", state_url="redis://u:state#pass/2@vk2:6379/0",
                 result_backend="sentinel://:sent-pass-3@s1:26379;sentinel://:sent-pass-3@s2:26379",
                 webhook_secret="hook-secret-value", git_credentials_file=creds, _env_file=None)  # type: ignore[call-arg]
    register_settings_secrets(s)
    text = ("key sk-ant-the-api-key, hook hook-secret-value, passwords broker-pass-1 state#pass/2 sent-pass-3 "
            "gh-push-token-1 p#ss/word p%23ss%2Fword")
    out = redact(text)
    for secret in ("sk-ant-the-api-key", "hook-secret-value", "broker-pass-1", "state#pass/2", "sent-pass-3",
                   "gh-push-token-1", "p#ss/word", "p%23ss%2Fword"):
        assert secret not in out, out
    assert out.startswith("key ***, hook ***, passwords ***")


def test_missing_git_credentials_file_is_not_an_error(tmp_path: Path) -> None:
    s = Settings(git_credentials_file=tmp_path / "absent", _env_file=None)  # type: ignore[call-arg]
    register_settings_secrets(s)
    assert redact("nothing here") == "nothing here"
