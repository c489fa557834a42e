"""The package table of docs/architecture.md is a check: every import of every module under
``waypoint/`` (at module level, inside functions, under ``TYPE_CHECKING``) goes to the same
package, to a package of a lower layer, to ``observability`` (layer "—", which imports no
other package), or is one of the same-layer imports that page lists. Every module belongs to
a row of the table."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "waypoint"
DOC = ROOT / "docs" / "architecture.md"
CROSS_CUTTING = "—"


def _unit(path: str) -> str:
    """``waypoint/proxy/`` -> ``proxy``, ``waypoint/errors.py`` -> ``errors``,
    ``waypoint/__init__.py`` -> ``__init__``."""
    rest = path.removeprefix("waypoint/").rstrip("/")
    return rest.removesuffix(".py")


def read_table(text: str) -> tuple[dict[str, str], dict[str, int]]:
    """Package (``proxy``, ``errors``, ``__init__``) -> its layer (``"5"``, ``"—"``), and ->
    its row (the paths of one row are one package)."""
    section = text.split("## Packages", 1)[1]
    layers: dict[str, str] = {}
    rows: dict[str, int] = {}
    for row, line in enumerate(section.splitlines()):
        match = re.match(r"\| (\d+|—) \| ([^|]+) \|", line)
        if match is None:
            continue
        for path in re.findall(r"`(waypoint/[^`]*)`", match.group(2)):
            layers[_unit(path)] = match.group(1)
            rows[_unit(path)] = row
    return layers, rows


def read_exceptions(text: str) -> set[tuple[str, str]]:
    """The same-layer imports the page allows: lines ``- `a` → `b` (...), `c` (...)``."""
    items: list[str] = []
    for line in text.splitlines():  # a list item and its indented continuation lines
        if line.startswith("- "):
            items.append(line)
        elif line.startswith("  ") and items and line.strip():
            items[-1] += " " + line.strip()
        else:
            items.append("")
    allowed: set[tuple[str, str]] = set()
    for item in items:
        match = re.match(r"- `(\w+)` → (.*)", item)
        if match is None:
            continue
        for target in re.findall(r"`(\w+)`(?: \([^)]*\))?", match.group(2)):
            allowed.add((match.group(1), target))
    return allowed


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every ``waypoint...`` module the file ``path`` imports, relative imports resolved."""
    return imports_in(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, *, is_package: bool) -> list[tuple[str, int]]:
    """Every ``waypoint...`` module that ``source`` (the module ``module``) imports."""
    here = module.split(".")
    if not is_package:
        here.pop()  # the package a relative import starts from
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from waypoint import x`` imports the module waypoint.x when there is one.
            out.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
    return sorted(
        ((name, line) for name, line in out if name.split(".")[0] == "waypoint"),
        key=lambda item: item[1],
    )


def unit_of_module(name: str, units: Iterable[str]) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in units:
        return parts[1]
    return "__init__"  # the package root itself (``from waypoint import __version__``)


def violations(
    unit: str,
    edges: Iterable[tuple[str, str]],
    layers: Mapping[str, str],
    allowed: set[tuple[str, str]],
    rows: Mapping[str, int],
) -> list[str]:
    """The imports (target unit, where) of ``unit`` that the table does not allow."""
    bad = []
    mine = layers[unit]
    for target, where in edges:
        if rows[target] == rows[unit]:
            continue
        theirs = layers[target]
        if mine == CROSS_CUTTING:
            ok = False  # observability imports nothing else of Waypoint
        elif theirs == CROSS_CUTTING or int(theirs) < int(mine):
            ok = True
        else:
            ok = int(theirs) == int(mine) and (unit, target) in allowed
        if not ok:
            bad.append(f"{where}: {unit} (layer {mine}) imports {target} (layer {theirs})")
    return bad


TEXT = DOC.read_text()
LAYERS, ROWS = read_table(TEXT)
ALLOWED = read_exceptions(TEXT)
MODULES = sorted(PACKAGE.rglob("*.py"))


def _unit_of_path(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    return rel[0].removesuffix(".py") if len(rel) == 1 else rel[0]


def test_the_table_covers_every_module_and_is_read() -> None:
    assert len(LAYERS) >= 17, LAYERS
    assert LAYERS["pgwire"] == "1" and LAYERS["proxy"] == "5" and LAYERS["cli"] == "7"
    assert LAYERS["observability"] == CROSS_CUTTING
    assert ("proxy", "audit") in ALLOWED and ("grants", "identity") in ALLOWED
    assert ("proxy", "pool") in ALLOWED  # on a continuation line of the list item
    missing = sorted({_unit_of_path(p) for p in MODULES} - set(LAYERS))
    assert not missing, f"packages missing from the table in docs/architecture.md: {missing}"


@pytest.mark.parametrize("unit", sorted(set(LAYERS)))
def test_package_imports_follow_the_layer_table(unit: str) -> None:
    edges = [
        (unit_of_module(name, LAYERS), f"{path.relative_to(ROOT)}:{line}")
        for path in MODULES
        if _unit_of_path(path) == unit
        for name, line in imports_of(path)
    ]
    assert violations(unit, edges, LAYERS, ALLOWED, ROWS) == []


def test_the_checker_catches_what_it_looks_for() -> None:
    """Upward, same-layer and observability imports are reported; lower ones are not."""
    edges = [("provision", "a:1"), ("proxy", "a:2"), ("observability", "a:3"), ("app", "a:4")]
    assert violations("reaper", edges, LAYERS, ALLOWED, ROWS) == [
        "a:2: reaper (layer 5) imports proxy (layer 5)",
        "a:4: reaper (layer 5) imports app (layer 6)",
    ]
    assert violations("observability", [("config", "b:1")], LAYERS, ALLOWED, ROWS) == [
        "b:1: observability (layer —) imports config (layer 2)"
    ]
    # Imports inside functions, under TYPE_CHECKING and relative ones are all seen.
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from waypoint.proxy.session import X\n"
        "def f():\n    import waypoint.app\n"
        "from ..proxy import registry\n"
        "from . import engine\n"
    )
    assert [n for n, _ in imports_in(source, "waypoint.reaper.probe", is_package=False)] == [
        "waypoint.proxy.session.X",
        "waypoint.app",
        "waypoint.proxy.registry",
        "waypoint.reaper.engine",
    ]
