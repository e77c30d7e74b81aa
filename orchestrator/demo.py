"""The fleet's main job on one machine: Valkey, a worker and beat, one real agent on a sample repository.

Without ``ANTHROPIC_API_KEY`` the agent talks to the offline model (``orchestrator.testing.offline_model``);
with a key it talks to Claude. Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from orchestrator.testing.cluster import Beat, Valkey, Worker, fleet_env
from orchestrator.testing.offline_model import OfflineModel
from orchestrator.testing.sample_repo import make_sample_repo

PROMPT = "The test suite of this repository fails. Find the bug, fix it, and run `python -m pytest -q` to confirm."


def main() -> int:
    """Run the demo; exit code 0 when the agent completed and its gate passed."""
    root = Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    print(f"demo workspace: {root}")
    valkey = Valkey(data_dir=root / "valkey")
    print(f"valkey-server on {valkey.url}")
    offline = None
    model_url = None
    if not os.environ.get("ANTHROPIC_API_KEY"):
        offline = OfflineModel().start()
        model_url = offline.url
        print(f"no ANTHROPIC_API_KEY: using the offline model at {model_url}")
    procs: list[Worker | Beat] = []
    try:
        repo = make_sample_repo(root / "sample-repo")
        env = fleet_env(valkey.url, root / "workspace", model_url, heartbeat_interval_seconds=2)
        worker = Worker(env, "demo@%h", concurrency=2, log_path=root / "worker.log")
        procs.append(worker)
        procs.append(Beat(env, log_path=root / "beat.log"))
        worker.wait_ready()
        print("worker and beat are up; submitting the agent\n")
        os.environ.update({k: v for k, v in env.items() if k.startswith("ORCHESTRATOR_")})
        from orchestrator import settings as settings_module

        settings_module.get_settings.cache_clear()
        from orchestrator.celery import AGENTS_QUEUE, SPAWN_TASK, app
        from orchestrator.cli import _fleet, follow

        spec = {"task_id": "demo-1", "prompt": PROMPT, "repo": str(repo),
                "quality_gates": [{"name": "tests", "command": "python -m pytest -q", "timeout_seconds": 120}]}
        async_result = app.send_task(SPAWN_TASK, kwargs={"spec": spec}, queue=AGENTS_QUEUE)
        result = follow(_fleet(), "demo-1", async_result, timeout=600)
        print(json.dumps(result, indent=2))
        mirror = next((root / "workspace" / "mirrors").glob("*.git"), None)
        if result.get("commit") and mirror:
            print(f"\nthe agent's work: git -C {mirror} show {result['branch']}")
        return 0 if result.get("status") == "completed" else 1
    finally:
        for proc in procs:
            proc.stop()
        if offline is not None:
            offline.stop()
        valkey.stop()


if __name__ == "__main__":
    sys.exit(main())
