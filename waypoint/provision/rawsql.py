"""Raw SQL grants: render the two template variables, then validate the final text (docs/policy.md).

There is no template logic. ``{{.Role}}`` and ``{{.Database}}`` are replaced,
in one pass, by double-quoted identifiers; any other ``{{...}}`` is an error.
The text that comes out is parsed with PostgreSQL's own parser (pglast) and
must be exactly one statement of an allowed shape; the very same text is what
runs. (The Go reference validates one rendering and runs another, so a
template conditional could smuggle SQL past its check. Here the check and the
execution see identical bytes.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import pglast
from pg8000.exceptions import InterfaceError
from pg8000.native import identifier
from pglast import ast
from pglast.enums import DropBehavior, GrantTargetType, ObjectType, RoleSpecType

from waypoint.provision.dialect import Dialect

_TEMPLATE_RE: Final = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# Bounds on what reaches pglast's AST builder, which recurses on the C stack: a deep tree
# (``SELECT 1+1+...`` with ~30,000 terms) crashes the process with SIGSEGV, where
# PostgreSQL's own parser returns it fine. Allowed statements are about 8..20 deep.
_MAX_STATEMENT_LENGTH: Final = 64 * 1024
_MAX_TREE_DEPTH: Final = 64
_JSON_STRING_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
_FOR_ALL_ROLES_RE: Final = re.compile(r"\bFOR\s+ALL\s+ROLES\b", re.IGNORECASE)
_ENTRY_PREVIEW: Final = 160

# Object types that GRANT/REVOKE may name, per target kind.
_OBJECT_TYPES: Final = frozenset(
    {
        ObjectType.OBJECT_TABLE,
        ObjectType.OBJECT_SEQUENCE,
        ObjectType.OBJECT_FUNCTION,
        ObjectType.OBJECT_PROCEDURE,
        ObjectType.OBJECT_ROUTINE,
        ObjectType.OBJECT_SCHEMA,
        ObjectType.OBJECT_TYPE,
        ObjectType.OBJECT_DOMAIN,
        ObjectType.OBJECT_DATABASE,
    }
)
_ALL_IN_SCHEMA_TYPES: Final = frozenset(
    {
        ObjectType.OBJECT_TABLE,
        ObjectType.OBJECT_SEQUENCE,
        ObjectType.OBJECT_FUNCTION,
        ObjectType.OBJECT_PROCEDURE,
        ObjectType.OBJECT_ROUTINE,
    }
)
_DEFAULTS_TYPES: Final = frozenset(
    {
        ObjectType.OBJECT_TABLE,
        ObjectType.OBJECT_SEQUENCE,
        ObjectType.OBJECT_FUNCTION,
        ObjectType.OBJECT_ROUTINE,
        ObjectType.OBJECT_PROCEDURE,
        ObjectType.OBJECT_TYPE,
        ObjectType.OBJECT_SCHEMA,
    }
)
_DATABASE_PRIVILEGES: Final = frozenset({"temporary", "temp", "create"})
_KNOWN_PRIVILEGES: Final = frozenset(
    {
        "select", "insert", "update", "delete", "truncate", "references", "trigger",
        "maintain", "usage", "execute", "create", "temporary", "temp", "connect",
    }
)  # fmt: skip
_REFUSED_NAMES: Final = {
    ObjectType.OBJECT_PARAMETER_ACL: "PARAMETER",
    ObjectType.OBJECT_LARGEOBJECT: "LARGE OBJECT",
    ObjectType.OBJECT_TABLESPACE: "TABLESPACE",
    ObjectType.OBJECT_LANGUAGE: "LANGUAGE",
    ObjectType.OBJECT_FDW: "FOREIGN DATA WRAPPER",
    ObjectType.OBJECT_FOREIGN_SERVER: "FOREIGN SERVER",
}


class RawSqlError(ValueError):
    """A raw SQL entry was refused. ``index`` and ``entry`` name it; ``reason`` says why."""

    def __init__(self, index: int, entry: str, reason: str) -> None:
        preview = entry if len(entry) <= _ENTRY_PREVIEW else entry[:_ENTRY_PREVIEW] + "…"
        super().__init__(f"raw SQL entry {index} ({preview!r}) refused: {reason}")
        self.index = index
        self.entry = entry
        self.reason = reason


def render(entry: str, *, role: str, database: str) -> str:
    """Substitute ``{{.Role}}`` / ``{{.Database}}`` (one pass). Raises ValueError otherwise."""
    try:  # always quoted, as all DDL here (keywords and mixed case stay what they are)
        role_q, db_q = str(identifier(role)), str(identifier(database))
    except InterfaceError as exc:  # empty, or a NUL in it
        raise ValueError(str(exc)) from None

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1).strip()
        if name == ".Role":
            return role_q
        if name == ".Database":
            return db_q
        if name == ".User":
            raise ValueError(
                "template variable {{.User}} is not supported: grants go to the private "
                "group {{.Role}}, of which the user is a member"
            )
        raise ValueError(
            f"unsupported template text {m.group(0)!r}: only {{{{.Role}}}} and "
            "{{.Database}} are substituted; there is no template logic"
        )

    # Scan the ORIGINAL text only; substituted values are never re-scanned.
    pieces: list[str] = []
    pos = 0
    for m in _TEMPLATE_RE.finditer(entry):
        literal_part = entry[pos : m.start()]
        _reject_stray_delimiters(literal_part)
        pieces.append(literal_part)
        pieces.append(substitute(m))
        pos = m.end()
    tail = entry[pos:]
    _reject_stray_delimiters(tail)
    pieces.append(tail)
    return "".join(pieces)


def _reject_stray_delimiters(text: str) -> None:
    if "{{" in text or "}}" in text:
        raise ValueError("unbalanced template delimiters '{{' / '}}'")


def render_and_validate(
    entries: Sequence[str], *, role: str, database: str, dialect: Dialect
) -> list[str]:
    """Render every entry for ``role`` in ``database`` and validate the final text.

    Returns the statements exactly as they must run. Raises :class:`RawSqlError`
    naming the first refused entry.
    """
    out: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise RawSqlError(index, repr(entry), "an entry must be a string")
        try:
            final = render(entry, role=role, database=database)
        except ValueError as exc:
            raise RawSqlError(index, entry, str(exc)) from None
        try:
            validate_statement(final, role=role, database=database, dialect=dialect)
        except ValueError as exc:
            raise RawSqlError(index, entry, str(exc)) from None
        out.append(final)
    return out


def validate_statement(sql: str, *, role: str, database: str, dialect: Dialect) -> None:
    """Validate one final statement. Raises ValueError with the reason."""
    if "\x00" in sql:
        raise ValueError("NUL character in statement")
    if dialect.refuses_for_all_roles and _FOR_ALL_ROLES_RE.search(sql):
        raise ValueError("FOR ALL ROLES is refused: it changes other roles' default privileges")
    if len(sql) > _MAX_STATEMENT_LENGTH:
        raise ValueError(
            f"statement of {len(sql)} characters is longer than the limit of "
            f"{_MAX_STATEMENT_LENGTH}"
        )
    try:
        depth = _parse_tree_depth(sql)
        if depth > _MAX_TREE_DEPTH:
            raise ValueError(
                f"statement nests {depth} levels deep, more than any allowed statement "
                f"({_MAX_TREE_DEPTH})"
            )
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError as exc:
        raise ValueError(f"not valid SQL: {exc}") from None
    if len(stmts) != 1:
        raise ValueError(f"exactly one statement is allowed, found {len(stmts)}")
    stmt = stmts[0].stmt
    if isinstance(stmt, ast.GrantStmt):
        _check_grant(stmt, role=role, database=database, defaults=False)
    elif isinstance(stmt, ast.AlterDefaultPrivilegesStmt):
        _check_default_privileges(stmt, role=role)
    elif isinstance(stmt, ast.GrantRoleStmt):
        raise ValueError("granting or revoking role membership is not allowed")
    else:
        raise ValueError(
            f"{type(stmt).__name__} is not allowed: only GRANT/REVOKE of privileges and "
            "ALTER DEFAULT PRIVILEGES"
        )


def _parse_tree_depth(sql: str) -> int:
    """Nesting depth of the parse tree, read from the parser's JSON output without
    recursion (no Python AST is built). Raises ``pglast.parser.ParseError``."""
    tree = _JSON_STRING_RE.sub('""', pglast.parser.parse_sql_json(sql))
    depth = deepest = 0
    for ch in tree:
        if ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth -= 1
    return deepest


def _check_default_privileges(stmt: ast.AlterDefaultPrivilegesStmt, *, role: str) -> None:
    for opt in stmt.options or ():
        if not isinstance(opt, ast.DefElem):
            raise ValueError("unexpected ALTER DEFAULT PRIVILEGES option")
        if opt.defname == "roles":
            raise ValueError(
                "ALTER DEFAULT PRIVILEGES FOR ROLE/USER is not allowed: it changes another "
                "role's defaults"
            )
        if opt.defname != "schemas":
            raise ValueError(f"ALTER DEFAULT PRIVILEGES option {opt.defname!r} is not allowed")
    action = stmt.action
    if not isinstance(action, ast.GrantStmt):
        raise ValueError("ALTER DEFAULT PRIVILEGES must hold one GRANT or REVOKE")
    if action.objtype == ObjectType.OBJECT_LARGEOBJECT:
        raise ValueError("ALTER DEFAULT PRIVILEGES ... ON LARGE OBJECTS is not allowed")
    _check_grant(action, role=role, database="", defaults=True)


def _check_grant(stmt: ast.GrantStmt, *, role: str, database: str, defaults: bool) -> None:
    verb = "GRANT" if stmt.is_grant else "REVOKE"
    if stmt.grant_option:
        raise ValueError(
            "WITH GRANT OPTION is not allowed"
            if stmt.is_grant
            else "REVOKE GRANT OPTION FOR is not allowed"
        )
    if stmt.grantor is not None:
        raise ValueError("GRANTED BY is not allowed")
    if stmt.behavior == DropBehavior.DROP_CASCADE:
        raise ValueError("CASCADE is not allowed")
    _check_grantees(stmt.grantees, role=role, verb=verb)

    objtype = stmt.objtype
    if objtype in _REFUSED_NAMES:
        raise ValueError(f"{verb} on {_REFUSED_NAMES[objtype]} is not allowed")
    for priv in stmt.privileges or ():
        if not isinstance(priv, ast.AccessPriv) or priv.priv_name not in _KNOWN_PRIVILEGES:
            raise ValueError(f"unknown privilege {getattr(priv, 'priv_name', '?')!r}")
    targtype = stmt.targtype
    if defaults:
        if targtype != GrantTargetType.ACL_TARGET_DEFAULTS or objtype not in _DEFAULTS_TYPES:
            raise ValueError(f"default privileges on {_objtype_name(objtype)} are not allowed")
        return
    if targtype == GrantTargetType.ACL_TARGET_ALL_IN_SCHEMA:
        if objtype not in _ALL_IN_SCHEMA_TYPES:
            raise ValueError(f"ALL ... IN SCHEMA on {_objtype_name(objtype)} is not allowed")
        for obj in stmt.objects or ():
            _string_value(obj, what="schema name")
        return
    if targtype != GrantTargetType.ACL_TARGET_OBJECT:
        raise ValueError("unsupported GRANT target")
    if objtype not in _OBJECT_TYPES:
        raise ValueError(f"{verb} on {_objtype_name(objtype)} is not allowed")
    objects = stmt.objects or ()
    if not objects:
        raise ValueError("no objects named")
    if objtype == ObjectType.OBJECT_DATABASE:
        _check_database_grant(stmt, database=database, verb=verb)
        return
    if objtype == ObjectType.OBJECT_SCHEMA:
        for obj in objects:
            _string_value(obj, what="schema name")
        return
    for obj in objects:
        _check_qualified(obj, objtype)


def _check_database_grant(stmt: ast.GrantStmt, *, database: str, verb: str) -> None:
    """ON DATABASE: only the client's own database, only TEMPORARY / CREATE."""
    for obj in stmt.objects or ():
        name = _string_value(obj, what="database name")
        if name != database:
            raise ValueError(
                f"{verb} ON DATABASE is allowed only for the client's database "
                "({{.Database}}), not another database"
            )
    privs = stmt.privileges
    if privs is None:
        raise ValueError("ALL PRIVILEGES ON DATABASE is not allowed: only TEMPORARY / CREATE")
    for p in privs:
        if not isinstance(p, ast.AccessPriv) or p.priv_name not in _DATABASE_PRIVILEGES:
            name = getattr(p, "priv_name", "?")
            raise ValueError(
                f"privilege {str(name).upper()} ON DATABASE is not allowed: only "
                "TEMPORARY / CREATE"
            )


def _check_grantees(grantees: Any, *, role: str, verb: str) -> None:
    where = "TO" if verb == "GRANT" else "FROM"
    if not grantees or len(grantees) != 1:
        raise ValueError(f"{verb} must name exactly one grantee: {where} {{{{.Role}}}}")
    g = grantees[0]
    if not isinstance(g, ast.RoleSpec):
        raise ValueError("unexpected grantee")
    if g.roletype == RoleSpecType.ROLESPEC_PUBLIC:
        raise ValueError(f"{verb} {where} PUBLIC is not allowed; the grantee must be {{{{.Role}}}}")
    if g.roletype != RoleSpecType.ROLESPEC_CSTRING or g.rolename != role:
        raise ValueError("the grantee must be exactly {{.Role}}")


def _string_value(obj: Any, *, what: str) -> str:
    if isinstance(obj, ast.String):
        return str(obj.sval)
    raise ValueError(f"unexpected {what}")


def _check_qualified(obj: Any, objtype: Any) -> None:
    kind = _objtype_name(objtype)
    if isinstance(obj, ast.RangeVar):
        if obj.catalogname is not None:
            raise ValueError(f"{kind} name must not name a database (use schema.name)")
        if not obj.schemaname:
            raise ValueError(f"{kind} {obj.relname!r} must be schema-qualified (schema.name)")
        return
    if isinstance(obj, ast.ObjectWithArgs):
        names = obj.objname or ()
        if len(names) != 2:
            raise ValueError(f"{kind} name must be schema-qualified (schema.name)")
        return
    if isinstance(obj, tuple):  # TYPE / DOMAIN: a list of String parts
        if len(obj) != 2 or not all(isinstance(p, ast.String) for p in obj):
            raise ValueError(f"{kind} name must be schema-qualified (schema.name)")
        return
    raise ValueError(f"unexpected {kind} name")


def _objtype_name(objtype: Any) -> str:
    if objtype in _REFUSED_NAMES:
        return _REFUSED_NAMES[objtype]
    name = getattr(objtype, "name", str(objtype))
    return str(name).removeprefix("OBJECT_").replace("_", " ")


DATABASE_LEVEL: Final = ""


def touched_schemas(statements: Sequence[str]) -> set[str]:
    """Schemas that validated statements change ACLs in (for the group locks, docs/design.md).

    Database-level forms (``ON DATABASE``, ``ALTER DEFAULT PRIVILEGES`` without
    ``IN SCHEMA``) are reported as :data:`DATABASE_LEVEL` (the empty string).
    """
    out: set[str] = set()
    for sql in statements:
        for raw in pglast.parse_sql(sql):
            stmt = raw.stmt
            if isinstance(stmt, ast.AlterDefaultPrivilegesStmt):
                schemas = [
                    _string_value(v, what="schema name")
                    for opt in stmt.options or ()
                    if isinstance(opt, ast.DefElem) and opt.defname == "schemas"
                    for v in opt.arg or ()
                ]
                out.update(schemas or [DATABASE_LEVEL])
            elif isinstance(stmt, ast.GrantStmt):
                out.update(_grant_schemas(stmt))
    return out


def _grant_schemas(stmt: ast.GrantStmt) -> set[str]:
    objects = stmt.objects or ()
    if stmt.objtype == ObjectType.OBJECT_DATABASE:
        return {DATABASE_LEVEL}
    if (
        stmt.targtype == GrantTargetType.ACL_TARGET_ALL_IN_SCHEMA
        or stmt.objtype == ObjectType.OBJECT_SCHEMA
    ):
        return {_string_value(o, what="schema name") for o in objects}
    out: set[str] = set()
    for obj in objects:
        if isinstance(obj, ast.RangeVar) and obj.schemaname:
            out.add(str(obj.schemaname))
        elif isinstance(obj, ast.ObjectWithArgs) and obj.objname:
            out.add(str(obj.objname[0].sval))
        elif isinstance(obj, tuple) and obj and isinstance(obj[0], ast.String):
            out.add(str(obj[0].sval))
    return out
