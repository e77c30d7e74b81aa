"""Worker signal handlers: logging setup in every process."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from orchestrator.logs import configure_logging
from orchestrator.settings import get_settings


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(get_settings())
