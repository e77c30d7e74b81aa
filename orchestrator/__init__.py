"""A Celery + Valkey fleet that runs Claude coding agents under budgets, health checks and a killswitch.

``celery -A orchestrator ...`` finds the Celery app in ``orchestrator.celery``; the library itself does not
import Celery.
"""

__version__ = "0.1.0"
