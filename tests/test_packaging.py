"""Packaging contracts: the CLI is ``cellseg.cli`` and the library never imports click."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_library_never_imports_click():
    code = (
        "import pkgutil, importlib, sys, cellseg\n"
        "names = [m.name for m in pkgutil.iter_modules(cellseg.__path__[:1], 'cellseg.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), 'click' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    count, imported = result.stdout.split()
    assert int(count) > 20 and imported == "False", result.stderr


def test_the_console_script_installs_under_the_package_namespace():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "cli" not in setuptools["packages"]  # no top-level ``cli`` in site-packages
    assert setuptools["package-dir"] == {"cellseg.cli": "cli"}
    assert project["project"]["scripts"]["cellseg"] == "cellseg.cli.main:main"
    import cellseg.cli.main

    assert Path(cellseg.cli.main.__file__).resolve() == REPO / "cli" / "main.py"
