"""Logging: plain text or JSON lines (``ORCHESTRATOR_LOG_JSON``), with secrets kept out."""

from __future__ import annotations

import json
import logging
import sys

from orchestrator.settings import Settings, redact_text

_current: dict[str, str | None] = {"agent_id": None, "task_id": None}


def set_agent_context(agent_id: str | None, task_id: str | None) -> None:
    """Tag every log line of this process with the agent it is running (one agent per pool process)."""
    _current["agent_id"], _current["task_id"] = agent_id, task_id


class AgentContextFilter(logging.Filter):
    """Adds ``agent_id`` and ``task_id`` to every record emitted while an agent runs in this process."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the current agent's ids (never drops a record)."""
        for name, value in _current.items():
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """Plain text, with ``[agent=... task=...]`` when an agent is running."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as one text line."""
        line = redact_text(super().format(record))
        agent = getattr(record, "agent_id", None)
        return f"{line} [agent={agent} task={getattr(record, 'task_id', None)}]" if agent else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``agent_id`` / ``task_id`` when the record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        data = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": redact_text(record.getMessage())}
        for extra in ("agent_id", "task_id"):
            if hasattr(record, extra):
                data[extra] = getattr(record, extra)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def configure_logging(settings: Settings) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(AgentContextFilter())
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("httpx", "httpx2", "httpcore", "anthropic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
