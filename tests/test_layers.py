"""The package's layers (pyproject.toml's [tool.importlinter]): each stage imports only the stages below it, so
there is no import cycle, and the package's own imports sit at the top of each module where a reader sees them."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fedseg"
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    """lint-imports with `src` first on the path, so the contracts are checked against that copy of fedseg."""
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    done = _lint(ROOT, ROOT / "src")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_import_of_a_higher_layer_breaks_the_contract(tmp_path):
    """The check can fail: the data layer importing the chain (a cycle through run.py, as before the layers)
    is reported, naming the import."""
    shutil.copytree(SRC, tmp_path / "src" / "fedseg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    labels = tmp_path / "src" / "fedseg" / "data" / "labels.py"
    labels.write_text(labels.read_text() + "\nfrom fedseg import run  # noqa: E402,F401\n")
    done = _lint(tmp_path, tmp_path / "src")
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "fedseg.data.labels -> fedseg.run" in done.stdout, done.stdout


def test_the_package_imports_itself_at_the_top_of_each_module():
    """An import of fedseg inside a function is how a cycle hides; with the layers there is no need for one."""
    inside = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("fedseg"):
                        inside.append(f"{path.relative_to(SRC)}:{sub.lineno}: from {sub.module} import ...")
                    elif isinstance(sub, ast.Import) and any(a.name.startswith("fedseg") for a in sub.names):
                        inside.append(f"{path.relative_to(SRC)}:{sub.lineno}: import fedseg...")
    assert not inside, "\n".join(inside)
