"""Logging: plain text or JSON lines (``ORCHESTRATOR_LOG_JSON``), with secrets kept out."""

from __future__ import annotations

import json
import logging
import sys

from orchestrator.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``agent_id`` / ``task_id`` when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        data = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        for extra in ("agent_id", "task_id"):
            if hasattr(record, extra):
                data[extra] = getattr(record, extra)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(settings: Settings) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("httpx", "httpx2", "httpcore", "anthropic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
