"""The fleet's benchmarks: ``python -m benchmarks`` (or ``./dev bench``) runs them all and prints a table.

Every figure is compared with a baseline measured in the same run (see ``docs/benchmarks.md``). Shared setup is in
``benchmarks.harness``; a benchmark module exposes ``BENCHMARKS`` (a list of ``harness.Benchmark``) and is
registered in ``benchmarks.__main__.MODULES``.
"""
