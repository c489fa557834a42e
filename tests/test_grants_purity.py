"""``waypoint.grants`` is pure: it imports no I/O machinery and only allowed Waypoint layers."""

from __future__ import annotations

import ast
from pathlib import Path

import waypoint.grants

GRANTS_DIR = Path(waypoint.grants.__file__).parent
FORBIDDEN = {"socket", "ssl", "trio", "threading", "asyncio", "subprocess", "os", "pg8000", "redis"}
ALLOWED_WAYPOINT = (
    "waypoint.config",
    "waypoint.errors",
    "waypoint.identity.model",
    "waypoint.lru",
    "waypoint.grants",
)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "waypoint":  # "from waypoint import errors" names the module
                names.update(f"waypoint.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


def test_grants_modules_import_no_io_and_only_allowed_layers() -> None:
    files = sorted(GRANTS_DIR.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in imported_modules(path):
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith("waypoint"):
                assert name.startswith(ALLOWED_WAYPOINT), f"{path.name} imports {name}"
