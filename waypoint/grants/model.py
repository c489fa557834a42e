"""What a caller may do on one listener and database: the effective grant."""

from __future__ import annotations

import enum

from attrs import field, frozen


class Preset(enum.IntEnum):
    READONLY = 1
    READWRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@frozen(order=True)
class SchemaPrivilege:
    """One (preset, schema) pair, kept paired per rule (docs/design.md#grants)."""

    preset: Preset
    schema: str


@frozen
class CustomGrant:
    """A database entry that carries raw SQL: its own private group (docs/design.md#grants)."""

    privileges: frozenset[SchemaPrivilege]
    sql: tuple[str, ...]


@frozen
class Limits:
    """Merged limits; 0 means unset (no limit)."""

    max_conns_user: int = 0  # rule-level max_conns / defaults max_conns_per_user (across listeners)
    max_conns_listener: int = 0  # backend-entry max_conns (this listener)
    max_conn_duration: float = 0.0
    max_bytes_per_conn: int = 0


@frozen
class EffectiveGrant:
    listener: str
    database: str
    # Preset grants through shared groups (one group per (preset, schema, db)).
    privileges: frozenset[SchemaPrivilege] = frozenset()
    # Entries with raw SQL; empty when raw SQL was dropped by a preset cap.
    custom: tuple[CustomGrant, ...] = ()
    limits: Limits = field(factory=Limits)
    preset_cap: Preset | None = None

    @property
    def has_raw_sql(self) -> bool:
        return any(c.sql for c in self.custom)
