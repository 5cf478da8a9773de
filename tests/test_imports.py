"""The import rules of pyproject.toml's [tool.importlinter] hold: run by pytest, so by CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    run = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    done = subprocess.run([sys.executable, "-c", run], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_python_dash_m_yolosafe_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "yolosafe", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Usage:" in done.stdout


def test_every_exception_class_of_the_package_is_a_yolosafe_error():
    """One vocabulary: whatever yolosafe raises on purpose, ``except YolosafeError`` catches (classes found by reading
    every module's source, so a module not imported elsewhere counts too). A stop is no error: ``proc.Stopped``
    (SIGTERM, SIGHUP) is a ``KeyboardInterrupt``, as Ctrl-C is, and is caught where Ctrl-C is."""
    import ast
    import importlib
    from pathlib import Path

    import yolosafe
    from yolosafe.errors import YolosafeError

    root = Path(yolosafe.__file__).parent
    outside = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("yolosafe", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef) or not node.bases:
                continue
            cls = getattr(importlib.import_module(module), node.name)
            if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(
                    cls, (YolosafeError, KeyboardInterrupt)):
                outside.append(f"{module}.{node.name}")
    assert outside == []
