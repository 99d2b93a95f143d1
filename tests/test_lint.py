"""ruff (pyproject.toml's [tool.ruff]: pycodestyle, pyflakes, import order, 120 columns) passes on the package,
the tests, the benchmarks and the notebooks' code cells."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    done = subprocess.run([str(Path(sys.executable).with_name("ruff")), "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
