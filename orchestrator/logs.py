"""Logging: plain text or JSON lines (``ORCHESTRATOR_LOG_JSON``), with secrets kept out."""

from __future__ import annotations

import json
import logging
import sys
import threading

from orchestrator.redaction import redact, register_settings_secrets
from orchestrator.settings import Settings

_context = threading.local()  # per thread: a threads-pool worker runs many agents in one process


def set_agent_context(agent_id: str | None, task_id: str | None) -> None:
    """Tag every log line of this thread with the agent it is running (None, None to stop)."""
    _context.ids = {"agent_id": agent_id, "task_id": task_id}


def agent_context() -> tuple[str | None, str | None]:
    """The agent this thread runs, to hand to the threads that work for it."""
    ids = getattr(_context, "ids", None) or {}
    return ids.get("agent_id"), ids.get("task_id")


class AgentContextFilter(logging.Filter):
    """Adds ``agent_id`` and ``task_id`` to every record emitted while an agent runs in the emitting thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the current agent's ids (never drops a record)."""
        for name, value in (getattr(_context, "ids", None) or {}).items():
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """Plain text, with ``[agent=... task=...]`` when an agent is running; the whole line (traceback and stack
    included) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as one text line."""
        line = super().format(record)
        agent = getattr(record, "agent_id", None)
        return redact(f"{line} [agent={agent} task={getattr(record, 'task_id', None)}]" if agent else line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with ``agent_id`` / ``task_id`` when the record carries them; every text field
    (message, ``exc``, ``stack``) is redacted before it is encoded."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as JSON."""
        data = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": redact(record.getMessage())}
        for extra in ("agent_id", "task_id"):
            if hasattr(record, extra):
                data[extra] = redact(str(getattr(record, extra)))
        if record.exc_info:
            data["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            data["exc"] = redact(record.exc_text)
        if record.stack_info:
            data["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(data)


def configure_logging(settings: Settings) -> None:
    """Configure the root logger once for this process, with the fleet's secrets registered for redaction."""
    register_settings_secrets(settings)
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
