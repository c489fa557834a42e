"""PostgreSQL role and group names, and the ownership markers on them (docs/design.md).

Every name is decided here, once:

- user roles: ``{prefix}{listener}_{login}_{node}_{db}[_preset_{p}]``, parts
  sanitized (lowercase, everything outside ``[a-z0-9]`` → ``_``; the node's
  first DNS label);
- preset groups: ``{prefix}grp_{preset}_{schema}_{db}_{h}``, ``h`` = 8 hex of
  sha256(``preset \\0 schema \\0 db``) over the exact, unsanitized values;
- raw-SQL groups: ``{prefix}grp_perms_{16 hex of sha256(canonical JSON)}_{db}``;
- anything over 63 bytes: the first 52 bytes, ``_``, 10 hex of sha256 of the
  dropped remainder (never splitting a UTF-8 character).

Sanitizing is lossy (``john.doe`` and ``john_doe``; databases ``App`` and
``app``), so Waypoint writes the exact owner into ``COMMENT ON ROLE``
(:func:`role_comment`) and falls back to :func:`collision_role_name` when a
name is owned by someone else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from attrs import frozen

from waypoint.grants.model import CustomGrant, Preset
from waypoint.identity.model import Identity

MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1
_KEEP_BYTES = 52
_HASH_HEX = 10
MAX_PREFIX_BYTES = 40

COMMENT_MARKER = "waypoint:v1"
_ROLE_COMMENT_PREFIX = COMMENT_MARKER + " "
_GROUP_COMMENT_PREFIX = COMMENT_MARKER + " group "
_RETIRED_COMMENT_PREFIX = COMMENT_MARKER + " retired "

_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sanitize(part: str) -> str:
    """Lowercase; every character outside ``[a-z0-9]`` becomes ``_``."""
    return "".join(ch if ch in _ALLOWED else "_" for ch in part.lower())


def sanitize_node(node: str) -> str:
    """The node's first DNS label, sanitized (``alice-laptop.tail1.ts.net`` → ``alice_laptop``)."""
    return sanitize(node.split(".", 1)[0])


def validate_prefix(prefix: str) -> str | None:
    """Why ``prefix`` cannot be a ``user_prefix`` (None when it can).

    It must be non-empty, only ``[a-z0-9_]`` (so every name stays in that set
    and the reaper's LIKE match works), at most 40 bytes (so it survives the
    63-byte truncation), and must not start with ``pg_`` (PostgreSQL reserves
    those role names).
    """
    if not prefix:
        return "user_prefix must not be empty (role names would collide with other roles)"
    if any(ch != "_" and ch not in _ALLOWED for ch in prefix):
        return f"user_prefix {prefix!r} may contain only lowercase letters, digits and _"
    if len(prefix) > MAX_PREFIX_BYTES:
        return f"user_prefix is {len(prefix)} bytes; at most {MAX_PREFIX_BYTES} are allowed"
    if prefix.startswith("pg_"):
        return (
            f"user_prefix {prefix!r} starts with pg_, which PostgreSQL reserves for its own roles"
        )
    return None


def _check_prefix(prefix: str) -> None:
    problem = validate_prefix(prefix)
    if problem is not None:
        raise ValueError(problem)


def _utf8_cut(encoded: bytes, limit: int) -> int:
    """The largest index <= limit that does not split a UTF-8 character of ``encoded``."""
    cut = min(limit, len(encoded))
    while cut > 0 and cut < len(encoded) and (encoded[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def fit_identifier(name: str) -> str:
    """``name`` if it fits in 63 bytes; else its first 52 bytes + ``_`` + 10 hex.

    The hex digits are the start of sha256 over the UTF-8 bytes of the dropped
    remainder. The cut never splits a UTF-8 character (it moves left instead).
    """
    encoded = name.encode("utf-8")
    if len(encoded) <= MAX_IDENTIFIER_BYTES:
        return name
    cut = _utf8_cut(encoded, _KEEP_BYTES)
    head, rest = encoded[:cut], encoded[cut:]
    return head.decode("utf-8") + "_" + _sha256_hex(rest)[:_HASH_HEX]


def role_name(
    prefix: str,
    listener: str,
    login: str,
    node: str,
    database: str,
    preset_cap: Preset | None,
) -> str:
    """``{prefix}{listener}_{login}_{node}_{db}[_preset_{p}]``, sanitized and fitted to 63 bytes.

    Raises ValueError for an invalid prefix (see :func:`validate_prefix`).
    """
    _check_prefix(prefix)
    name = "_".join(
        (prefix + sanitize(listener), sanitize(login), sanitize_node(node), sanitize(database))
    )
    if preset_cap is not None:
        name += f"_preset_{preset_cap.label}"
    return fit_identifier(name)


def collision_role_name(base: str, identity_key: str) -> str:
    """The deterministic fallback when ``base`` is owned by another identity.

    ``base`` (cut at 52 bytes on a character boundary) + ``_`` + 10 hex of
    sha256(``identity_key``); always <= 63 bytes and never equal to ``base``.
    Use :meth:`RoleOwner.key` as ``identity_key``.
    """
    encoded = base.encode("utf-8")
    head = encoded[: _utf8_cut(encoded, _KEEP_BYTES)].decode("utf-8")
    return f"{head}_{_sha256_hex(identity_key.encode('utf-8'))[:_HASH_HEX]}"


def group_name(prefix: str, preset: Preset, schema: str, database: str) -> str:
    """``{prefix}grp_{preset}_{schema}_{db}_{h}`` with ``h`` over the exact values."""
    _check_prefix(prefix)
    digest = _sha256_hex(f"{preset.label}\0{schema}\0{database}".encode())[:8]
    return fit_identifier(
        f"{prefix}grp_{preset.label}_{sanitize(schema)}_{sanitize(database)}_{digest}"
    )


def custom_grant_digest(custom: CustomGrant, database: str) -> str:
    """16 hex of sha256 over the canonical JSON of (sorted pairs, sql, exact database)."""
    canonical = _canonical_json(
        {
            "database": database,
            "privileges": [[p.preset.label, p.schema] for p in sorted(custom.privileges)],
            "sql": list(custom.sql),
        }
    )
    return _sha256_hex(canonical.encode("utf-8"))[:16]


def custom_group_name(prefix: str, custom: CustomGrant, database: str) -> str:
    """``{prefix}grp_perms_{16 hex}_{db}``: one private group per distinct raw-SQL grant."""
    _check_prefix(prefix)
    return fit_identifier(
        f"{prefix}grp_perms_{custom_grant_digest(custom, database)}_{sanitize(database)}"
    )


# -- ownership markers (COMMENT ON ROLE) -------------------------------------


@frozen
class RoleOwner:
    """Whom a user role belongs to, exactly (unsanitized)."""

    login: str
    node: str
    listener: str
    database: str
    preset: str | None = None  # the preset cap's label, if any

    def as_json(self) -> dict[str, str | None]:
        return {
            "database": self.database,
            "listener": self.listener,
            "login": self.login,
            "node": self.node,
            "preset": self.preset,
        }

    def key(self) -> str:
        """A canonical string naming this owner (for :func:`collision_role_name`)."""
        return _canonical_json(self.as_json())


@frozen
class GroupOwner:
    """What a Waypoint group role stands for."""

    kind: str  # "preset" or "perms"
    database: str
    preset: str | None = None  # kind "preset"
    schema: str | None = None  # kind "preset"
    digest: str | None = None  # kind "perms": custom_grant_digest

    def as_json(self) -> dict[str, str | None]:
        return {
            "database": self.database,
            "digest": self.digest,
            "kind": self.kind,
            "preset": self.preset,
            "schema": self.schema,
        }


def role_owner(
    identity: Identity, listener: str, database: str, preset_cap: Preset | None = None
) -> RoleOwner:
    return RoleOwner(
        login=identity.login,
        node=identity.node,
        listener=listener,
        database=database,
        preset=preset_cap.label if preset_cap is not None else None,
    )


def role_comment(
    identity: Identity, listener: str, database: str, preset_cap: Preset | None = None
) -> str:
    """``waypoint:v1 {"database":...,"listener":...,"login":...,"node":...,"preset":...}``."""
    owner = role_owner(identity, listener, database, preset_cap)
    return _ROLE_COMMENT_PREFIX + owner.key()


def _load_object(text: str, prefix: str) -> dict[str, Any] | None:
    if not text.startswith(prefix):
        return None
    try:
        value = json.loads(text[len(prefix) :])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def retired_role_comment(owner: RoleOwner) -> str:
    """``waypoint:v1 retired {...}``: the marker of a role the reaper retired instead of
    dropping (it still owns objects); the same owner as :func:`role_comment`."""
    return _RETIRED_COMMENT_PREFIX + owner.key()


def is_retired_comment(text: str) -> bool:
    """Whether ``text`` is a valid :func:`retired_role_comment` marker."""
    return text.startswith(_RETIRED_COMMENT_PREFIX) and parse_role_comment(text) is not None


def parse_role_comment(text: str) -> RoleOwner | None:
    """The owner recorded by :func:`role_comment` (or :func:`retired_role_comment`); None for
    anything else (not ours)."""
    if text.startswith(_RETIRED_COMMENT_PREFIX):
        text = _ROLE_COMMENT_PREFIX + text[len(_RETIRED_COMMENT_PREFIX) :]
    data = _load_object(text, _ROLE_COMMENT_PREFIX)
    if data is None or set(data) != {"database", "listener", "login", "node", "preset"}:
        return None
    required = (data["login"], data["node"], data["listener"], data["database"])
    if not all(isinstance(v, str) for v in required) or not _optional_str(data["preset"]):
        return None
    return RoleOwner(
        login=data["login"],
        node=data["node"],
        listener=data["listener"],
        database=data["database"],
        preset=data["preset"],
    )


def group_comment(preset: Preset, schema: str, database: str) -> str:
    """``waypoint:v1 group {...}`` for a preset group."""
    owner = GroupOwner(kind="preset", database=database, preset=preset.label, schema=schema)
    return _GROUP_COMMENT_PREFIX + _canonical_json(owner.as_json())


def custom_group_comment(custom: CustomGrant, database: str) -> str:
    """``waypoint:v1 group {...}`` for a raw-SQL group (the SQL itself is not repeated)."""
    owner = GroupOwner(
        kind="perms", database=database, digest=custom_grant_digest(custom, database)
    )
    return _GROUP_COMMENT_PREFIX + _canonical_json(owner.as_json())


def parse_group_comment(text: str) -> GroupOwner | None:
    """The group recorded by :func:`group_comment` / :func:`custom_group_comment`; else None."""
    data = _load_object(text, _GROUP_COMMENT_PREFIX)
    if data is None or set(data) != {"database", "digest", "kind", "preset", "schema"}:
        return None
    if not isinstance(data["database"], str) or data["kind"] not in ("preset", "perms"):
        return None
    if not all(_optional_str(data[k]) for k in ("digest", "preset", "schema")):
        return None
    if data["kind"] == "preset" and (data["preset"] is None or data["schema"] is None):
        return None
    if data["kind"] == "perms" and data["digest"] is None:
        return None
    return GroupOwner(
        kind=data["kind"],
        database=data["database"],
        preset=data["preset"],
        schema=data["schema"],
        digest=data["digest"],
    )
