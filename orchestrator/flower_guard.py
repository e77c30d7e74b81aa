"""Flower must not start without authentication unless a setting explicitly allows it.

``orchestrator/celery.py`` calls :func:`check_flower_auth` with ``sys.argv`` when the app is loaded, so
``celery -A orchestrator flower`` exits with the message instead of serving an open dashboard (which can
revoke tasks and shut down workers).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Celery's global options that take a value (``celery -A app --broker URL flower ...``).
_CELERY_VALUE_OPTIONS = {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir"}
_AUTH_OPTIONS = {"basic-auth": "FLOWER_BASIC_AUTH", "auth": "FLOWER_AUTH"}


def is_flower_invocation(argv: list[str]) -> bool:
    """Whether ``argv`` (``sys.argv``) runs the ``flower`` subcommand of ``celery`` (or ``python -m flower``)."""
    return _subcommand(argv) is not None


def check_flower_auth(argv: list[str], env: Mapping[str, str], allow_unauthenticated: bool) -> str | None:
    """An error message if ``argv`` starts Flower without ``--basic-auth``/``--auth`` (or their ``FLOWER_*``
    variables) and unauthenticated access is not allowed; else None. ``argv`` includes the program name."""
    index = _subcommand(argv)
    if index is None or allow_unauthenticated:
        return None
    given = {name: env.get(var, "").strip() for name, var in _AUTH_OPTIONS.items()}
    for arg in argv[index + 1:]:
        if arg == "--" or not arg.startswith("-"):
            break  # tornado stops parsing options here
        name, equals, value = arg.lstrip("-").partition("=")
        name = name.replace("_", "-")
        if equals and name in given:
            given[name] = value.strip()
    if given["basic-auth"]:
        weak = [user or "<empty user>" for user, sep, password in
                (c.strip().partition(":") for c in given["basic-auth"].split(",")) if not (user and sep and password)]
        if not weak:
            return None
        return ("refusing to start Flower: every --basic-auth/FLOWER_BASIC_AUTH credential needs a user and a "
                f"password (user:password), got none for {', '.join(weak)}")
    if given["auth"]:
        return None
    return ("refusing to start Flower without authentication: set FLOWER_BASIC_AUTH=user:password (or pass "
            "--basic-auth=user:password, or --auth=REGEX with OAuth), or set "
            "ORCHESTRATOR_FLOWER_ALLOW_UNAUTHENTICATED=true to allow an open dashboard explicitly")


def _subcommand(argv: list[str]) -> int | None:
    """Index of the ``flower`` subcommand in a celery/flower command line, or None."""
    if not argv:
        return None
    prog = argv[0].replace(os.sep, "/")
    name = prog.rsplit("/", 1)[-1]
    if name not in {"celery", "celery.exe", "flower", "flower.exe"} and not prog.endswith(
            ("celery/__main__.py", "flower/__main__.py")):
        return None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in _CELERY_VALUE_OPTIONS:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return i if arg == "flower" else None
    return None
