"""docs/configuration.md documents every configuration key and its examples load."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from waypoint.config import Config, load_config_text

DOC = Path(__file__).parent.parent / "docs" / "configuration.md"


def _all_field_names(
    cl: type, seen: set[type] | None = None, *, leaves_only: bool = False
) -> set[str]:
    seen = set() if seen is None else seen
    if cl in seen:
        return set()
    seen.add(cl)
    names: set[str] = set()
    hints = attrs.resolve_types(cl)
    for f in attrs.fields(hints):
        if cl is Config and f.name == "source":
            continue
        tp = f.type
        candidates = [tp, *getattr(tp, "__args__", ())]
        tables = [c for c in candidates if isinstance(c, type) and attrs.has(c)]
        # leaves_only: leave out plain sub-tables ([identity], [defaults.limits], ...),
        # which are documented by a section header rather than a row
        if not (leaves_only and isinstance(tp, type) and attrs.has(tp)):
            names.add(f.name)
        for candidate in tables:
            names |= _all_field_names(candidate, seen, leaves_only=leaves_only)
    return names


def test_every_config_key_is_documented() -> None:
    text = DOC.read_text()
    # `key`, and table names inside headers such as `[defaults.limits]` or `[[identity.static]]`
    documented: set[str] = set()
    for token in re.findall(r"`([^`\n]+)`", text):
        documented |= set(token.strip("[]").split("."))
    names = _all_field_names(Config)
    assert {"admin_password", "max_bytes_per_conn", "grants_json", "cidr"} <= names
    missing = sorted(names - documented)
    assert missing == [], f"undocumented keys in {DOC}: {missing}"


def test_every_config_key_has_a_table_row() -> None:
    text = DOC.read_text()
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))
    missing = sorted(_all_field_names(Config, leaves_only=True) - rows)
    assert missing == [], f"keys without a reference row: {missing}"


def test_toml_examples_in_the_docs_load() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 2
    listener = (
        '[[listeners]]\nname = "pg-main"\nlisten = "127.0.0.1:5432"\nbackend = "h:5432"\n'
        '[listeners.postgres]\nadmin_user = "a"\nadmin_password = "p"\n'
    )
    for block in blocks:
        full = block if "[[listeners]]" in block else block + listener
        config = load_config_text(full, source="docs", environ={"PG_ADMIN_PASSWORD": "x"})
        assert config.listeners
