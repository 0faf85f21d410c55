"""Packaging contracts: the CLI is ``cellseg.cli`` and the library never imports click."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_library_never_imports_click():
    """No module of ``cellseg/`` imports click or the CLI (an AST scan: importing them all
    would take seconds for torch alone)."""
    modules = sorted((REPO / "cellseg").glob("*.py"))
    assert len(modules) > 20
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                top = name.lstrip(".").split(".")[0]
                assert top not in ("click", "cli"), f"{path.name} imports {name}"
                assert not name.startswith((".cli", "cellseg.cli")), f"{path.name} imports {name}"


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
        floors[name.split("[")[0].strip().lower()] = version.strip()  # dask[distributed]: dask
    return floors


def test_the_ci_pins_the_lowest_allowed_versions():
    """.ci/min-versions.txt pins exactly pyproject's floors (CI tests them in a fresh venv)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = _floors(project["dependencies"] + project["optional-dependencies"]["test"])
    lines = (REPO / ".ci" / "min-versions.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    # torch, ruff: see the file's header. dask: its floor (2024.1) is for --scheduler; in the
    # lowest-versions venv ome-zarr's reader needs a dask that knows zarr 3, so pip picks it.
    left_out = {"torch", "ruff", "dask"}
    assert set(pins) == set(floors) - left_out
    for name, pinned in pins.items():
        wanted = [int(part) for part in floors[name].split(".")]
        got = [int(part) for part in pinned.split(".")[: len(wanted)]]
        assert got == wanted, f"{name}: pinned {pinned}, floor {floors[name]}"
