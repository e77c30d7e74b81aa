"""Worker signal handlers: logging setup in every process, and handing agents back on a warm shutdown."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import setup_logging, worker_shutting_down

from orchestrator.logs import configure_logging
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(get_settings())


@worker_shutting_down.connect
def _hand_back_agents(sender: Any = None, sig: str | None = None, how: str | None = None, **_: Any) -> None:
    """On a warm shutdown (SIGTERM, redeploy) each running agent checkpoints, frees its lease and is re-enqueued
    at once, instead of holding the shutdown for up to the duration limit."""
    if how != "Warm":
        return
    from orchestrator.fleet import Fleet
    from orchestrator.ops import hand_back_worker

    try:
        handed = hand_back_worker(Fleet.create(), str(sender))
    except Exception:
        log.exception("could not hand back agents of %s", sender)
        return
    if handed:
        log.warning("warm shutdown (%s): handed back %d agent(s): %s", sig, len(handed), ", ".join(handed))
