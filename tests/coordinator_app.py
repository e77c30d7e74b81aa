"""A stand-in coordinator: a separate Celery app whose task receives the fleet's result callbacks.

Run as ``celery -A tests.coordinator_app worker -Q coordinator``; each result is written to
``$COORDINATOR_OUT/<agent_id>.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from celery import Celery

app = Celery("coordinator", broker=os.environ["COORDINATOR_BROKER"])
app.conf.update(task_serializer="json", accept_content=["json"])


@app.task(name="coordinator.agent_finished")
def agent_finished(result: dict[str, Any]) -> None:
    """Record a finished agent's result."""
    out = Path(os.environ["COORDINATOR_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['agent_id']}.json").write_text(json.dumps(result))
