"""Layering: model, image and storage code never imports a transport (Hypha, Ray).

The transports live in the adapters (``apps/provider/rpc.py``, ``services/gateway.py``,
``services/ray_runtime.py``, ``services/deployments.py``); everything else must be usable in-process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {"apps/provider/rpc.py", "apps/cli.py", "apps/pull.py", "apps/cluster.py", "apps/workspace_token.py",
            "apps/hypha_gate.py", "services/gateway.py",
            "services/ray_runtime.py",
            "services/deployments.py"}
TRANSPORTS = ("hypha_rpc", "hypha", "ray")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def pure_modules() -> list[Path]:
    files = [*ROOT.glob("colabel/**/*.py"), *ROOT.glob("apps/**/*.py"), *ROOT.glob("services/**/*.py")]
    return [f for f in files if f.relative_to(ROOT).as_posix() not in ADAPTERS]


@pytest.mark.parametrize("path", pure_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pure_module_imports_no_transport(path):
    bad = {m for m in imported_modules(path) if m.split(".")[0] in TRANSPORTS}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_no_generic_top_level_modules_are_installed():
    """Everything installs under `colabel`: no `apps`, `services` or `tests` package in site-packages."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "colabel" or p.startswith("colabel.") for p in config["packages"])
    assert set(config["package-dir"]) <= {p for p in config["packages"]}


def test_every_python_folder_is_a_listed_package():
    """A sub-package missing from pyproject's explicit list would be left out of the wheel."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {"colabel": "colabel", "apps": "colabel.apps", "services": "colabel.services"}
    found = set()
    for folder, package in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == set(config["packages"])


def test_the_code_passes_the_linter():
    """``ruff check`` with the rules of ``[tool.ruff]`` in pyproject.toml: unused names, import order, long lines,
    late-binding closures in loops."""
    import subprocess
    import sys

    checked = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                              "colabel", "apps", "services", "tests", "bench"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
