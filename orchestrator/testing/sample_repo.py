"""A small sample repository with a failing test: the demo's and the tests' agent target."""

from __future__ import annotations

import subprocess
from pathlib import Path

CALC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
TEST_CALC = (
    "from calc import add, mul\n\n\n"
    "def test_add():\n    assert add(2, 3) == 5\n\n\n"
    "def test_mul():\n    assert mul(2, 3) == 6\n"
)


def make_sample_repo(path: Path, bare_origin: Path | None = None) -> Path:
    """Create a git repository at ``path`` (branch ``main``) whose ``test_calc.py`` fails; returns ``path``.

    With ``bare_origin``, also create a bare clone there and make it the repository's ``origin``.
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "calc.py").write_text(CALC)
    (path / "test_calc.py").write_text(TEST_CALC)
    (path / "README.md").write_text("# calc\n\nA tiny project whose `add` is wrong.\n")
    git = ["git", "-c", "user.name=sample", "-c", "user.email=sample@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run([*git, "-C", str(path), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(path), "commit", "-q", "-m", "calc with a failing test"], check=True)
    if bare_origin is not None:
        subprocess.run(["git", "clone", "-q", "--bare", str(path), str(bare_origin)], check=True)
        subprocess.run(["git", "-C", str(path), "remote", "add", "origin", str(bare_origin)], check=True)
    return path
