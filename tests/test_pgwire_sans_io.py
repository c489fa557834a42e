"""waypoint.pgwire and the other sans-IO cores docs/architecture.md lists are sans-IO: their
own import statements name no I/O, clock or concurrency module (pgwire: and nothing else of
Waypoint), and their code calls no socket or ssl function (scramp itself imports ssl; that is
allowed: docs/design.md#tests)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import waypoint.pgwire

PGWIRE_DIR = Path(waypoint.pgwire.__file__).parent
PACKAGE_DIR = PGWIRE_DIR.parent
ROOT = PACKAGE_DIR.parent
# The other sans-IO cores: each is driven by trio (or the relay's thread) in production and by
# plain values in its tests.
OTHER_CORES = [
    PACKAGE_DIR / "proxy" / "relay" / "core.py",
    PACKAGE_DIR / "proxy" / "relay" / "base.py",
    PACKAGE_DIR / "audit" / "tracker.py",
    PACKAGE_DIR / "audit" / "messages.py",
    PACKAGE_DIR / "audit" / "names.py",
    PACKAGE_DIR / "console" / "parser.py",
    PACKAGE_DIR / "pool" / "book.py",
]
MODULES = sorted(PGWIRE_DIR.glob("*.py")) + OTHER_CORES
FORBIDDEN = {
    "socket",
    "ssl",
    "trio",
    "asyncio",
    "selectors",
    "select",
    "threading",
    "multiprocessing",
    "concurrent",
    "time",
    "subprocess",
    "trio_asyncio",
    "anyio",
}


def _imported_roots(tree: ast.AST) -> list[tuple[str, int]]:
    roots: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                continue  # relative: inside pgwire
            roots.append((node.module or "", node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            roots.append(("__import__", node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
        ):
            roots.append(("importlib.import_module", node.lineno))
    return roots


def test_pgwire_has_modules_to_check() -> None:
    names = {m.name for m in MODULES}
    assert {"__init__.py", "startup.py", "framing.py", "messages.py", "login.py"} <= names


def _id(path: Path) -> str:
    return str(path.relative_to(PACKAGE_DIR))


def test_the_cores_exist_and_the_architecture_page_names_them() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for path in OTHER_CORES:
        assert path.is_file(), path
        assert f"`{path.relative_to(ROOT)}`" in doc, path


@pytest.mark.parametrize("module", MODULES, ids=_id)
def test_core_module_imports_no_io_module(module: Path) -> None:
    tree = ast.parse(module.read_text(), filename=str(module))
    bad = []
    for name, line in _imported_roots(tree):
        root = name.split(".")[0]
        other_waypoint = (
            module.parent == PGWIRE_DIR
            and root == "waypoint"
            and not (name == "waypoint.pgwire" or name.startswith("waypoint.pgwire."))
        )
        if root in FORBIDDEN or other_waypoint or name.startswith(("__import__", "importlib")):
            bad.append(f"{module.name}:{line} imports {name}")
    assert bad == []


@pytest.mark.parametrize("module", MODULES, ids=_id)
def test_core_module_never_names_socket_or_ssl(module: Path) -> None:
    tree = ast.parse(module.read_text(), filename=str(module))
    bad = [
        f"{module.name}:{node.lineno} uses {node.id}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id in {"socket", "ssl", "trio", "time"}
    ]
    bad += [
        f"{module.name}:{node.lineno} uses .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in {"wrap_socket", "create_connection", "SSLContext", "recv", "sendall"}
    ]
    assert bad == []


def test_forbidden_import_is_detected() -> None:
    """The checker itself must catch what it looks for."""
    tree = ast.parse("import socket\nfrom trio import open_tcp_stream\nimport waypoint.config\n")
    assert [n for n, _ in _imported_roots(tree)] == ["socket", "trio", "waypoint.config"]
