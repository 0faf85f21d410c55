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

    installed = Path(cellseg.cli.main.__file__).resolve()
    assert installed in (
        REPO / "cli" / "main.py",
        Path(cellseg.__file__).parent / "cli" / "main.py",
    )


def _floors(requirements: list[str]) -> dict[str, str]:
    floors = {}
    for requirement in requirements:
        name, _, version = requirement.partition(">=")
        floors[name.strip().lower()] = version.strip()
    return floors


def test_the_ci_pins_the_lowest_allowed_versions():
    """.ci/min-versions.txt pins exactly pyproject's floors (CI tests them in a fresh venv)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = _floors(project["dependencies"] + project["optional-dependencies"]["test"])
    lines = (REPO / ".ci" / "min-versions.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    left_out = {"torch", "ruff"}  # see the file's header
    assert set(pins) == set(floors) - left_out
    for name, pinned in pins.items():
        wanted = [int(part) for part in floors[name].split(".")]
        got = [int(part) for part in pinned.split(".")[: len(wanted)]]
        assert got == wanted, f"{name}: pinned {pinned}, floor {floors[name]}"
