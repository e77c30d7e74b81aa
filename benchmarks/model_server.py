"""The offline model as a process for the benchmarks: ``python -m benchmarks.model_server --port P ...``.

Same server and options as ``python -m orchestrator.testing.offline_model``, with TCP_NODELAY on its sockets
(see ``benchmarks.harness.disable_nagle``) unless ``--nagle`` is given.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmarks.harness import disable_nagle
from orchestrator.testing.offline_model import main as offline_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the offline model in the foreground until SIGTERM/SIGINT."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--nagle" in args:
        args.remove("--nagle")
    else:
        disable_nagle()
    return offline_main(args)


if __name__ == "__main__":
    sys.exit(main())
