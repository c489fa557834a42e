"""The provisioning engine: one :class:`Provisioner` per listener.

Lock order, never violated here:

1. the in-process per-role lock (single flight; a :class:`trio.Semaphore` per
   role that the reaper takes through :meth:`Provisioner.role_guard`),
2. the cross-instance role lock (:class:`~waypoint.provision.locks.RoleLockBackend`,
   by default a session-level advisory lock on a dedicated connection to
   ``admin_database``), held across COMMIT and the caller's upstream login,
3. before the one transaction in the target database starts, the group locks
   ``(2, h(db, schema))`` in sorted order (:class:`~waypoint.provision.locks.GroupLocks`:
   session-level advisory locks on another dedicated connection to ``admin_database``),
   released after it ends.

No lock lives in a target database: advisory locks are per database and their keys are
computable, so a caller's session there could take or block them.

A provision runs for a new role, a changed grant, no cached secret, a cached
secret whose ``VALID UNTIL`` is within ``handshake_timeout``, or ``rotate=True``.
Otherwise :meth:`Provisioner.credentials` answers from the cache with no admin
round trip. The plaintext secret never leaves this process: the server gets a
verifier computed here (SCRAM, or md5 when configured/required).
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import UTC, datetime
from typing import Final, Literal

import trio
from attrs import define, evolve, field, frozen

from waypoint.config.model import ListenerConfig
from waypoint.errors import Refusal, bad_grant, provisioning_failed
from waypoint.grants import naming
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.observability.log import get_logger
from waypoint.pgwire.scram import ScramKeys, make_md5_verifier, make_scram_verifier
from waypoint.provision import sql
from waypoint.provision.admin import AdminError, AdminPools, AdminSession
from waypoint.provision.dialect import CockroachDialect, Dialect, PostgresDialect, detect_dialect
from waypoint.provision.locks import (
    GroupLocks,
    PgAdvisoryRoleLock,
    RoleLease,
    RoleLockBackend,
    RoleLockTimeout,
)
from waypoint.provision.rawsql import RawSqlError, render_and_validate, touched_schemas

log = get_logger("provision")

RETRYABLE_SQLSTATES: Final = frozenset({"23505", "XX000", "40P01"})
SECRET_BYTES: Final = 32
EXTEND_BATCH: Final = 8


# -- public values -------------------------------------------------------------


@frozen
class Credentials:
    """What the proxy logs in to the backend with. The secret is never in a repr."""

    role: str
    secret: str = field(repr=False)
    scram_keys: ScramKeys | None = field(repr=False)
    valid_until: datetime
    provisioned: bool


class ProvisionError(Exception):
    """Provisioning failed; ``refusal`` is what the client sees (58000 unless said otherwise)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"{refusal.sqlstate}: {refusal.message}")
        self.refusal = refusal


class DatabaseMissing(ProvisionError):
    """The target database does not exist: ``fields`` are the server's 3D000 error fields,
    for the proxy to forward as the FATAL the client would have got directly."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields = dict(fields)
        super().__init__(
            Refusal(
                self.fields.get("C", "3D000"),
                self.fields.get("M", "database does not exist"),
            )
        )


def new_correlation_id() -> str:
    return secrets.token_hex(6)


def grant_fingerprint(grant: EffectiveGrant) -> str:
    """What decides a role's privileges (limits excluded): changes force a new secret."""
    doc = {
        "listener": grant.listener,
        "database": grant.database,
        "cap": grant.preset_cap.label if grant.preset_cap is not None else None,
        "privileges": sorted([p.preset.label, p.schema] for p in grant.privileges),
        "custom": sorted(
            [sorted([p.preset.label, p.schema] for p in c.privileges), list(c.sql)]
            for c in grant.custom
        ),
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the plan: what groups a grant needs (pure) ----------------------------------


@frozen
class GroupPlan:
    name: str
    comment: str
    # (schema, statements that need the schema to exist); applied in order.
    schema_grants: tuple[tuple[str, tuple[str, ...]], ...]
    raw_sql: tuple[str, ...]
    schemas: frozenset[str]  # what its ACL statements touch (group locks and signature)


@frozen
class ProvisionPlan:
    role: str
    database: str
    owner: naming.RoleOwner
    comment: str
    groups: tuple[GroupPlan, ...]

    @property
    def schemas(self) -> frozenset[str]:
        out: set[str] = set()
        for g in self.groups:
            out |= g.schemas
        return frozenset(out)


def build_plan(
    prefix: str, role: str, identity: Identity, grant: EffectiveGrant, dialect: Dialect
) -> ProvisionPlan:
    """The groups for ``grant``. Raises RawSqlError for a refused raw-SQL entry."""
    db = grant.database
    groups: list[GroupPlan] = []
    for sp in sorted(grant.privileges):
        name = naming.group_name(prefix, sp.preset, sp.schema, db)
        groups.append(
            GroupPlan(
                name=name,
                comment=naming.group_comment(sp.preset, sp.schema, db),
                schema_grants=((sp.schema, tuple(sql.preset_grants(sp.preset, sp.schema, name))),),
                raw_sql=(),
                schemas=frozenset({sp.schema}),
            )
        )
    for custom in grant.custom:
        name = naming.custom_group_name(prefix, custom, db)
        raw = tuple(render_and_validate(custom.sql, role=name, database=db, dialect=dialect))
        pairs = sorted(custom.privileges)
        groups.append(
            GroupPlan(
                name=name,
                comment=naming.custom_group_comment(custom, db),
                schema_grants=tuple(
                    (sp.schema, tuple(sql.preset_grants(sp.preset, sp.schema, name)))
                    for sp in pairs
                ),
                raw_sql=raw,
                schemas=frozenset({sp.schema for sp in pairs} | touched_schemas(raw)),
            )
        )
    # One group per name (two identical custom entries share their group).
    unique = {g.name: g for g in groups}
    owner = naming.role_owner(identity, grant.listener, db, grant.preset_cap)
    comment = naming.role_comment(identity, grant.listener, db, grant.preset_cap)
    return ProvisionPlan(role, db, owner, comment, tuple(unique.values()))


# -- the transaction (runs in a worker thread) ----------------------------------


class _RoleNotOurs(Exception):
    def __init__(self, role: str) -> None:
        super().__init__(
            f"role {role!r} exists but is not owned by this identity (or not Waypoint's)"
        )


class _GroupNotOurs(Exception):
    def __init__(self, group: str) -> None:
        super().__init__(f"group {group!r} exists without Waypoint's group marker")


class _NameTaken(ProvisionError):
    """The role name this caller was about to use carries another caller's marker (it was
    dropped and recreated for someone else, or a look-alike won a race for it): the caller's
    name is resolved again."""


class _RoleMissing(Exception):
    def __init__(self, role: str) -> None:
        super().__init__(f"role {role!r} does not exist")


Signature = tuple[tuple[str, int, int], ...]


@frozen
class _PasswordChange:
    verifier: str = field(repr=False)
    valid_until: datetime
    #: ``ALTER ROLE ... SET`` statements applied with the secret (created or rotated).
    settings: tuple[str, ...] = ()


@frozen
class _TxnResult:
    created: bool
    signatures: dict[str, Signature]
    dropped_triggers: tuple[str, ...]
    granted: tuple[str, ...]
    revoked: tuple[str, ...]


def _provision_txn(
    sess: AdminSession,
    plan: ProvisionPlan,
    password: _PasswordChange | None,
    known_signatures: Mapping[str, Signature],
    inherit_clause: str,
    member_clause: str = "",
    disarm: bool = True,
) -> _TxnResult:
    """One transaction in the target database, under the group locks of ``plan.schemas``
    (held by the caller in ``admin_database``). Blocking; call in a worker thread."""
    sess.run("BEGIN")

    names = [plan.role, *(g.name for g in plan.groups)]
    existing = {
        str(r[0]): (r[1] if r[1] is None else str(r[1]))
        for r in sess.run(sql.ROLES_QUERY, names=names)
    }
    role_exists = plan.role in existing
    if role_exists and naming.parse_role_comment(existing[plan.role] or "") != plan.owner:
        raise _RoleNotOurs(plan.role)
    retired = role_exists and naming.is_retired_comment(existing[plan.role] or "")
    if (not role_exists or retired) and password is None:
        raise _RoleMissing(plan.role)  # a retired role comes back only with a new secret

    schemas = sorted(s for s in plan.schemas if s)
    present: dict[str, tuple[int, int]] = {}
    if schemas:
        for nsp, count, maxoid in sess.run(sql.SCHEMA_SIGNATURE_QUERY, schemas=schemas):
            present[str(nsp)] = (int(count), int(maxoid))

    signatures: dict[str, Signature] = {}
    for group in plan.groups:
        sig: Signature = tuple(
            (s, *present.get(s, (-1, -1))) for s in sorted(x for x in group.schemas if x)
        )
        signatures[group.name] = sig
        if group.name not in existing:
            for stmt in sql.create_group(group.name, plan.database, group.comment):
                sess.run(stmt)
        else:
            if naming.parse_group_comment(existing[group.name] or "") is None:
                raise _GroupNotOurs(group.name)
            if known_signatures.get(group.name) == sig:
                continue
        for schema, stmts in group.schema_grants:
            if schema not in present:
                continue  # a schema that does not exist (yet): its signature will change
            for stmt in stmts:
                sess.run(stmt)
        for stmt in group.raw_sql:
            sess.run(stmt)

    if password is not None:
        if role_exists:
            sess.run(sql.set_password(plan.role, password.verifier, password.valid_until))
            if retired:  # its own caller again (the marker matched): active once more
                sess.run(sql.comment_on_role(plan.role, plan.comment))
        else:
            sess.run(sql.create_login_role(plan.role, password.verifier, password.valid_until))
            sess.run(sql.comment_on_role(plan.role, plan.comment))
            sess.run(sql.grant_role_to_admin(plan.role, inherit_clause))
        for stmt in password.settings:
            sess.run(stmt)

    current: set[str] = set()
    if role_exists:
        for gname, comment in sess.run(sql.MEMBERSHIPS_QUERY, role=plan.role):
            if naming.parse_group_comment(str(comment or "")) is not None:
                current.add(str(gname))
    desired = {g.name for g in plan.groups}
    extra = sorted(current - desired)
    missing = sorted(desired - current)
    # Objects the role created stay its own: nothing is ever reassigned (to the admin or
    # anyone), so its SECURITY DEFINER functions, views and rules run with the privileges the
    # role holds from now on. Its triggers on tables it no longer may put triggers on go.
    # A group's own code (a member may have created it after SET ROLE on 15; 16+ grants no
    # SET) is disarmed whenever a member leaves, so no former member keeps its privileges.
    dropped: tuple[str, ...] = ()
    for g in extra:
        sess.run(sql.revoke_membership(g, plan.role))
    if extra and disarm:  # PostgreSQL (CockroachDB has no functions owned this way)
        dropped = drop_foreign_triggers(
            sess, plan.role, lost_only=True, inherit_clause=inherit_clause
        )
        for g in extra:
            dropped += drop_foreign_triggers(
                sess, g, lost_only=False, inherit_clause=inherit_clause
            )
            disarm_code(sess, g, inherit_clause)
    for g in missing:
        sess.run(sql.grant_membership(g, plan.role, member_clause))
    sess.run("COMMIT")
    return _TxnResult(not role_exists, signatures, dropped, tuple(missing), tuple(extra))


def _act_as(sess: AdminSession, owner: str, inherit_clause: str) -> None:
    """Give the admin the privileges of ``owner`` (it created the role, so it may: 15
    CREATEROLE, 16+ its ADMIN OPTION) unless it has them: needed to alter or drop what
    ``owner`` owns. Waypoint's login roles have it from creation, its groups not."""
    if not sess.run(sql.ADMIN_HAS_ROLE_QUERY, role=owner)[0][0]:
        sess.run(sql.grant_role_to_admin(owner, inherit_clause))


def disarm_code(sess: AdminSession, owner: str, inherit_clause: str = "") -> int:
    """In the current database and transaction: make the code ``owner`` owns run as whoever
    calls it (SECURITY INVOKER routines, ``security_invoker`` views) and drop the rules on its
    tables (see :data:`sql.DEFINER_ROUTINES_QUERY`). Returns how many objects changed."""
    routines = [str(r[0]) for r in sess.run(sql.DEFINER_ROUTINES_QUERY, role=owner)]
    views = [(str(a), str(b)) for a, b in sess.run(sql.OWNED_VIEWS_QUERY, role=owner)]
    rules = [(str(a), str(b), str(c)) for a, b, c in sess.run(sql.OWNED_RULES_QUERY, role=owner)]
    if routines or views or rules:
        _act_as(sess, owner, inherit_clause)
    for sig in routines:
        sess.run(sql.make_invoker(sig))
    for schema, view in views:
        sess.run(sql.view_as_invoker(schema, view))
    for schema, table, rule in rules:
        sess.run(sql.drop_rule(schema, table, rule))
    return len(routines) + len(views) + len(rules)


async def disarm_everywhere(
    pools: AdminPools,
    owner: str,
    *,
    group: bool,
    inherit_clause: str,
    check: Callable[[AdminSession], object] | None = None,
) -> None:
    """In every connectable database where ``owner`` owns objects, one transaction each:
    ``check`` (raising stops it), its trigger functions on tables it does not own dropped,
    and for a Waypoint group (``group``) its code disarmed (:func:`disarm_code`)."""

    def owned_in(sess: AdminSession) -> list[str]:
        return [str(r[0]) for r in sess.run(sql.OWNED_DATABASES_QUERY, role=owner)]

    def txn(sess: AdminSession, database: str) -> None:
        sess.run("BEGIN")
        if check is not None:
            check(sess)
        dropped = drop_foreign_triggers(sess, owner, lost_only=False, inherit_clause=inherit_clause)
        changed = disarm_code(sess, owner, inherit_clause) if group else 0
        sess.run("COMMIT")
        if dropped or changed:
            log.info(
                "role_triggers_dropped",
                role=owner,
                db=database,
                triggers=list(dropped),
                disarmed=changed,
            )

    for database in await pools.run(pools.admin_database, owned_in):
        try:
            await pools.run(database, functools.partial(txn, database=database))
        except AdminError as exc:
            if exc.sqlstate != "3D000":  # a database dropped meanwhile has nothing left
                raise


def drop_foreign_triggers(
    sess: AdminSession, role: str, *, lost_only: bool, inherit_clause: str = ""
) -> tuple[str, ...]:
    """In the current database and transaction: drop the trigger functions ``role`` owns that
    fire on tables it does not own (with their triggers; see
    :data:`sql.FOREIGN_TRIGGER_FUNCTIONS_QUERY`). ``lost_only``: only those on tables where
    the role no longer holds TRIGGER. Returns the functions dropped. Blocking."""
    found = sess.run(sql.FOREIGN_TRIGGER_FUNCTIONS_QUERY, role=role, lost=lost_only)
    names = tuple(str(r[0]) for r in found)
    if names:
        _act_as(sess, role, inherit_clause)
    for name in names:
        sess.run(sql.drop_function_cascade(name))
    return names


# -- single flight ---------------------------------------------------------------

Phase = Literal["provisioning", "holding", "failed", "done"]


class _LeaderGone(Exception):
    """The task running a shared provision was cancelled; a waiter retries on its own."""


@define
class _Flight:
    fingerprint: str
    owner: naming.RoleOwner
    phase: Phase = "provisioning"
    participants: int = 1
    done: trio.Event = field(factory=trio.Event)
    creds: Credentials | None = None
    error: BaseException | None = None
    lease: RoleLease | None = None


@define
class _RoleState:
    sem: trio.Semaphore = field(factory=lambda: trio.Semaphore(1))
    flight: _Flight | None = None
    changed: trio.Event = field(factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@frozen
class _Cached:
    """A secret this process set, for the caller ``owner`` (the role's marker when it was set)."""

    secret: str = field(repr=False)
    scram_keys: ScramKeys | None = field(repr=False)
    valid_until: datetime
    fingerprint: str
    owner: naming.RoleOwner


@frozen
class _ServerInfo:
    dialect: Dialect
    password_encryption: str


# -- the provisioner ---------------------------------------------------------------


class Provisioner:
    """Creates and maintains the short-lived roles of one listener."""

    def __init__(
        self,
        listener: ListenerConfig,
        *,
        handshake_timeout: float,
        clock: Callable[[], float] = time.time,
        limiter: trio.CapacityLimiter | None = None,
        lock_backend: RoleLockBackend | None = None,
        statement_timeout: float | None = None,
    ) -> None:
        self._listener = listener
        self._pg = listener.postgres
        self._handshake_timeout = handshake_timeout
        self._clock = clock
        self._limiter = limiter or trio.CapacityLimiter(8)
        st = statement_timeout if statement_timeout is not None else max(handshake_timeout, 5.0)
        self._pools = AdminPools(
            listener,
            limiter=self._limiter,
            connect_timeout=handshake_timeout,
            statement_timeout=st,
            lock_timeout=max(1.0, st / 2),
            idle_timeout=self._pg.admin_idle_timeout,
        )
        self._custom_lock_backend = lock_backend is not None
        pg_locks = PgAdvisoryRoleLock(self._pools)
        self._locks: RoleLockBackend = lock_backend or pg_locks
        self._pg_locks = pg_locks
        self._group_locks = GroupLocks(pg_locks.sessions)
        self._states: dict[str, _RoleState] = {}
        self._cache: dict[str, _Cached] = {}
        self._resolved: dict[tuple[str, str, str, str, str | None], str] = {}
        self._group_signatures: dict[str, Signature] = {}
        self._info: _ServerInfo | None = None
        self._info_lock = trio.Lock()

    # -- naming ----------------------------------------------------------------

    def _name_key(
        self, identity: Identity, grant: EffectiveGrant
    ) -> tuple[str, str, str, str, str | None]:
        cap = grant.preset_cap.label if grant.preset_cap is not None else None
        return (identity.login, identity.node, grant.listener, grant.database, cap)

    def _base_name(self, identity: Identity, grant: EffectiveGrant) -> str:
        return naming.role_name(
            self._pg.user_prefix,
            self._listener.name,
            identity.login,
            identity.node,
            grant.database,
            grant.preset_cap,
        )

    def role_for(self, identity: Identity, grant: EffectiveGrant) -> str:
        """The role name for this caller (the collision fallback once it has been resolved)."""
        return self._resolved.get(self._name_key(identity, grant)) or self._base_name(
            identity, grant
        )

    async def _resolve_role(self, identity: Identity, grant: EffectiveGrant) -> str:
        """The role name for this caller: the remembered one, else the deterministic name when it
        is free or carries this caller's marker, else the collision name.

        What is remembered is only a hint: every use is checked again (a cached secret only
        for the caller it was set for, a provision against the marker under the role lock),
        and a name found to carry another caller's marker is forgotten (:class:`_NameTaken`).
        """
        key = self._name_key(identity, grant)
        if key in self._resolved:
            return self._resolved[key]
        base = self._base_name(identity, grant)
        owner = naming.role_owner(identity, grant.listener, grant.database, grant.preset_cap)
        fallback = naming.collision_role_name(base, owner.key())

        def lookup(sess: AdminSession) -> dict[str, str | None]:
            rows = sess.run(sql.ROLES_QUERY, names=[base, fallback])
            return {str(r[0]): (None if r[1] is None else str(r[1])) for r in rows}

        found = await self._pools.run(self._pools.admin_database, lookup)
        for candidate in (base, fallback):
            if candidate in found and naming.parse_role_comment(found[candidate] or "") != owner:
                continue
            self._resolved[key] = candidate
            if candidate != base:
                log.info(
                    "role_name_taken",
                    listener=grant.listener,
                    db=grant.database,
                    taken=base,
                    role=candidate,
                )
            return candidate
        raise _RoleNotOurs(fallback)

    def _forget_names_of(self, role: str) -> None:
        """Forget every remembered caller-to-name mapping that points at ``role``."""
        for key in [k for k, v in self._resolved.items() if v == role]:
            del self._resolved[key]

    # -- server info -------------------------------------------------------------

    async def _server_info(self) -> _ServerInfo:
        if self._info is not None:
            return self._info
        async with self._info_lock:
            if self._info is None:

                def probe(sess: AdminSession) -> tuple[str, str]:
                    rows = sess.run(
                        "SELECT pg_catalog.version(), "
                        "pg_catalog.current_setting('password_encryption', true)"
                    )
                    return str(rows[0][0]), str(rows[0][1] or "scram-sha-256")

                version, enc = await self._pools.run(self._pools.admin_database, probe)
                dialect = detect_dialect(version)
                if isinstance(dialect, CockroachDialect) and not self._custom_lock_backend:
                    raise ProvisionError(
                        provisioning_failed(
                            new_correlation_id(),
                            "CockroachDB has no advisory locks and Waypoint has no other role "
                            "lock for it: provisioning on CockroachDB is not supported",
                        )
                    )
                self._info = _ServerInfo(dialect, enc)
            return self._info

    def _role_settings(self, role: str, info: _ServerInfo) -> tuple[str, ...]:
        """Per-role settings: ``client_connection_check_interval`` (PostgreSQL 14+), so a
        backend whose client is gone notices it during a long statement. A first line only:
        the caller can change it for its own session, and Waypoint's session end does not
        rely on it."""
        interval = self._pg.client_connection_check_interval
        dialect = info.dialect
        if interval <= 0 or not isinstance(dialect, PostgresDialect) or dialect.major < 14:
            return ()
        return (
            sql.set_role_setting(
                role, "client_connection_check_interval", f"{interval * 1000:.0f}ms"
            ),
        )

    def _use_md5(self, info: _ServerInfo) -> bool:
        mode = self._pg.password_encryption
        if mode == "md5":
            return True
        if mode == "scram-sha-256":
            return False
        return info.password_encryption.lower() == "md5"

    # -- the cache ----------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _cached(self, role: str, fingerprint: str, owner: naming.RoleOwner) -> _Cached | None:
        """The cached secret of ``role`` for this very caller and grant (never another's)."""
        entry = self._cache.get(role)
        if entry is None or entry.fingerprint != fingerprint or entry.owner != owner:
            return None
        if entry.valid_until.timestamp() - self._clock() <= self._handshake_timeout:
            return None
        return entry

    @staticmethod
    def owner_of(identity: Identity, grant: EffectiveGrant) -> naming.RoleOwner:
        """The caller as a role's marker records it."""
        return naming.role_owner(identity, grant.listener, grant.database, grant.preset_cap)

    def peek(self, role: str, owner: naming.RoleOwner | None) -> Credentials | None:
        """The cached credentials of ``role`` if they are valid for a handshake and were set
        for ``owner`` (None: nobody; nothing is given), whatever grant they were provisioned
        for; no database access and no lock. For a login made ahead of need:
        :meth:`credentials` still decides whether the caller gets that session, and it answers
        with a cached secret only for the caller that secret was set for, so a session logged
        in with a secret that is not the caller's own is never handed over."""
        entry = self._cache.get(role)
        if entry is None or owner is None or entry.owner != owner:
            return None
        if entry.valid_until.timestamp() - self._clock() <= self._handshake_timeout:
            return None
        return Credentials(role, entry.secret, entry.scram_keys, entry.valid_until, False)

    def _state(self, role: str) -> _RoleState:
        st = self._states.get(role)
        if st is None:
            st = self._states[role] = _RoleState()
        return st

    def _deadline(self) -> float:
        return min(trio.current_effective_deadline(), trio.current_time() + self._handshake_timeout)

    # -- credentials ----------------------------------------------------------------

    @asynccontextmanager
    async def credentials(
        self, identity: Identity, grant: EffectiveGrant, *, rotate: bool = False
    ) -> AsyncIterator[Credentials]:
        """Credentials for logging in as this caller's role (see the module docstring).

        When a provision ran, the role lock stays held while the ``async with`` body
        runs and is released on exit (also on error or cancellation).
        """
        cid = new_correlation_id()
        creds, st, flight = await self._obtain(identity, grant, rotate, cid)
        if flight is None:
            yield creds
            return
        try:
            yield creds
        finally:
            await self._leave(st, flight)

    async def _obtain(
        self, identity: Identity, grant: EffectiveGrant, rotate: bool, cid: str
    ) -> tuple[Credentials, _RoleState, _Flight | None]:
        """The caller's credentials, and the flight to leave when done (None: a cache hit).

        A role name whose marker turns out to name another caller is forgotten and the name
        resolved again (at most twice more): by then the marker decides the name.
        """
        fingerprint = grant_fingerprint(grant)
        owner = naming.role_owner(identity, grant.listener, grant.database, grant.preset_cap)
        deadline = self._deadline()
        last: _NameTaken | None = None
        for _attempt in range(3):
            try:
                with trio.fail_at(deadline):
                    role = await self._resolve_role(identity, grant)
            except trio.TooSlowError:
                raise ProvisionError(
                    provisioning_failed(cid, "timed out resolving the role name")
                ) from None
            except _RoleNotOurs as exc:
                raise ProvisionError(provisioning_failed(cid, str(exc))) from None
            except AdminError as exc:
                raise self._admin_failure(cid, exc) from None
            try:
                return await self._obtain_role(
                    identity, grant, role, owner, fingerprint, rotate, deadline, cid
                )
            except _NameTaken as exc:
                last = exc
                if self._resolved.get(self._name_key(identity, grant)) == role:
                    del self._resolved[self._name_key(identity, grant)]
        assert last is not None
        raise ProvisionError(last.refusal) from None

    async def _obtain_role(
        self,
        identity: Identity,
        grant: EffectiveGrant,
        role: str,
        owner: naming.RoleOwner,
        fingerprint: str,
        rotate: bool,
        deadline: float,
        cid: str,
    ) -> tuple[Credentials, _RoleState, _Flight | None]:
        st = self._state(role)
        while True:
            flight = st.flight
            if flight is not None and flight.phase == "provisioning":
                if flight.fingerprint != fingerprint or flight.owner != owner:
                    # Another grant, or another caller whose name looks the same: never join
                    # it; wait for it to finish, then the marker decides.
                    await self._wait(flight.done, deadline, cid)
                    continue
                flight.participants += 1
                try:
                    await self._wait(flight.done, deadline, cid)
                except BaseException:
                    await self._leave(st, flight)
                    raise
                if flight.creds is None:
                    await self._leave(st, flight)
                    if isinstance(flight.error, ProvisionError):
                        raise flight.error
                    continue  # the leader was cancelled: try again ourselves
                return flight.creds, st, flight
            if not rotate:
                entry = self._cached(role, fingerprint, owner)
                if entry is not None:
                    creds = Credentials(
                        role, entry.secret, entry.scram_keys, entry.valid_until, False
                    )
                    return creds, st, None
            try:
                st.sem.acquire_nowait()
            except trio.WouldBlock:
                await self._wait(st.changed, deadline, cid)
                continue
            break

        # We lead a new flight.
        flight = _Flight(fingerprint, owner)
        st.flight = flight
        st.notify()
        try:
            creds, lease = await self._provision(identity, grant, role, fingerprint, deadline, cid)
        except BaseException as exc:
            flight.phase = "failed"
            flight.error = exc if isinstance(exc, ProvisionError) else _LeaderGone()
            flight.participants -= 1
            if st.flight is flight:
                st.flight = None
            st.sem.release()
            flight.done.set()
            st.notify()
            raise
        flight.creds = creds
        flight.lease = lease
        flight.phase = "holding"
        flight.done.set()
        st.notify()
        return creds, st, flight

    async def _wait(self, event: trio.Event, deadline: float, cid: str) -> None:
        try:
            with trio.fail_at(deadline):
                await event.wait()
        except trio.TooSlowError:
            raise ProvisionError(
                provisioning_failed(cid, "timed out waiting for a concurrent provision")
            ) from None

    async def _leave(self, st: _RoleState, flight: _Flight) -> None:
        if flight.phase in ("failed", "done"):
            flight.participants -= 1
            return
        flight.participants -= 1
        if flight.participants > 0 or flight.phase != "holding":
            return
        flight.phase = "done"
        if st.flight is flight:
            st.flight = None
        try:
            if flight.lease is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await self._locks.release(flight.lease)
        finally:
            st.sem.release()
            st.notify()

    # -- the provision ------------------------------------------------------------

    async def _provision(
        self,
        identity: Identity,
        grant: EffectiveGrant,
        role: str,
        fingerprint: str,
        deadline: float,
        cid: str,
    ) -> tuple[Credentials, RoleLease]:
        try:
            with trio.fail_at(deadline):
                info = await self._server_info()
                plan = self._plan(identity, grant, role, info, cid)
                secret = secrets.token_urlsafe(SECRET_BYTES)
                valid_until = datetime.fromtimestamp(self._clock() + self._pg.user_ttl, UTC)
                use_md5 = self._use_md5(info)

                def make_verifier() -> tuple[str, ScramKeys | None]:
                    if use_md5:
                        return make_md5_verifier(secret, role), None
                    return make_scram_verifier(secret)

                verifier, keys = await trio.to_thread.run_sync(make_verifier, limiter=self._limiter)
                lease = await self._locks.acquire(role, deadline)
                try:
                    change = _PasswordChange(verifier, valid_until, self._role_settings(role, info))
                    await self._run_txn(plan, change, info)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self._locks.release(lease)
                    raise
        except (trio.TooSlowError, RoleLockTimeout):
            raise ProvisionError(
                provisioning_failed(cid, f"timed out provisioning role {role}")
            ) from None
        except AdminError as exc:
            raise self._admin_failure(cid, exc) from None
        except _RoleNotOurs as exc:
            # The name carries another caller's marker: whatever this process remembers
            # about it is someone else's now.
            self._forget_names_of(role)
            self._cache.pop(role, None)
            raise _NameTaken(provisioning_failed(cid, str(exc))) from None
        except (_GroupNotOurs, _RoleMissing) as exc:
            self._resolved.pop(self._name_key(identity, grant), None)
            raise ProvisionError(provisioning_failed(cid, str(exc))) from None
        owner = naming.role_owner(identity, grant.listener, grant.database, grant.preset_cap)
        self._cache[role] = _Cached(secret, keys, valid_until, fingerprint, owner)
        return Credentials(role, secret, keys, valid_until, True), lease

    def _plan(
        self,
        identity: Identity,
        grant: EffectiveGrant,
        role: str,
        info: _ServerInfo,
        cid: str,
    ) -> ProvisionPlan:
        try:
            return build_plan(self._pg.user_prefix, role, identity, grant, info.dialect)
        except RawSqlError as exc:
            raise ProvisionError(bad_grant(str(exc), f"correlation id {cid}")) from None

    async def _run_txn(
        self, plan: ProvisionPlan, password: _PasswordChange | None, info: _ServerInfo
    ) -> _TxnResult:
        inherit = info.dialect.admin_inherit_clause
        member = info.dialect.member_clause
        disarm = not isinstance(info.dialect, CockroachDialect)
        for attempt in (1, 2):
            known = {
                g.name: self._group_signatures[g.name]
                for g in plan.groups
                if g.name in self._group_signatures
            }

            def txn(sess: AdminSession, known: dict[str, Signature] = known) -> _TxnResult:
                return _provision_txn(sess, plan, password, known, inherit, member, disarm)

            try:
                async with self.group_locks(plan.database, plan.schemas, info.dialect):
                    result = await self._pools.run(plan.database, txn)
            except AdminError as exc:
                if exc.sqlstate == "3D000":
                    raise DatabaseMissing(exc.fields) from None
                if attempt == 1 and exc.sqlstate in RETRYABLE_SQLSTATES:
                    log.info(
                        "provision_retry",
                        listener=self._listener.name,
                        db=plan.database,
                        role=plan.role,
                        error_sqlstate=exc.sqlstate,
                    )
                    continue
                raise
            self._group_signatures.update(result.signatures)
            where = {"listener": self._listener.name, "db": plan.database, "role": plan.role}
            if result.created:
                log.info("role_created", **where)
            if result.granted or result.revoked:
                log.info(
                    "role_grants_changed",
                    **where,
                    granted=list(result.granted),
                    revoked=list(result.revoked),
                )
            if result.dropped_triggers:
                log.info("role_triggers_dropped", **where, triggers=list(result.dropped_triggers))
            return result
        raise AssertionError("unreachable")

    def _admin_failure(self, cid: str, exc: AdminError) -> ProvisionError:
        if exc.sqlstate == "3D000":
            return DatabaseMissing(exc.fields)
        log.warning(
            "provision_admin_error",
            listener=self._listener.name,
            correlation_id=cid,
            error_sqlstate=exc.sqlstate,
            error=str(exc),
        )
        return ProvisionError(provisioning_failed(cid, str(exc)))

    # -- other operations ----------------------------------------------------------

    @asynccontextmanager
    async def _role_lock(self, role: str, deadline: float) -> AsyncIterator[None]:
        """Hold the cross-instance lock of ``role`` for the block (acquired by ``deadline``,
        raising RoleLockTimeout after it; released shielded from cancellation)."""
        lease = await self._locks.acquire(role, deadline)
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self._locks.release(lease)

    @asynccontextmanager
    async def role_guard(self, role: str) -> AsyncIterator[None]:
        """Lock order step 1 for ``role`` (the reaper takes it before the role lock)."""
        st = self._state(role)
        await st.sem.acquire()
        try:
            yield
        finally:
            st.sem.release()
            st.notify()

    @property
    def lock_backend(self) -> RoleLockBackend:
        return self._locks

    def group_locks(
        self, database: str, schemas: Iterable[str], dialect: Dialect
    ) -> AbstractAsyncContextManager[None]:
        """Lock order step 3 for a transaction in ``database`` touching ``schemas`` (none on
        a server without advisory locks, where the role lock serializes provisioning)."""
        if not dialect.has_advisory_locks:
            return nullcontext()
        return self._group_locks.hold(database, schemas)

    @property
    def pools(self) -> AdminPools:
        return self._pools

    async def reconcile(self, identity: Identity, grant: EffectiveGrant) -> None:
        """Bring the role's memberships to ``grant`` (a revalidation downgrade); no new secret."""
        cid = new_correlation_id()
        role = self.role_for(identity, grant)
        deadline = trio.current_time() + self._handshake_timeout
        try:
            with trio.fail_at(deadline):
                async with self.role_guard(role):
                    info = await self._server_info()
                    plan = self._plan(identity, grant, role, info, cid)
                    async with self._role_lock(role, deadline):
                        await self._run_txn(plan, None, info)
        except (trio.TooSlowError, RoleLockTimeout):
            raise ProvisionError(
                provisioning_failed(cid, f"timed out reconciling role {role}")
            ) from None
        except AdminError as exc:
            raise self._admin_failure(cid, exc) from None
        except (_RoleNotOurs, _GroupNotOurs, _RoleMissing) as exc:
            raise ProvisionError(provisioning_failed(cid, str(exc))) from None
        entry = self._cache.get(role)
        if entry is not None:
            self._cache[role] = evolve(entry, fingerprint=grant_fingerprint(grant))

    async def extend_validity(self, roles: Iterable[str]) -> None:
        """Push ``VALID UNTIL`` to now + user_ttl for Waypoint's roles among ``roles``.

        Batched; a role that is busy (a provision in this process, or its role lock held
        elsewhere) is skipped this round.
        """
        pending = sorted(set(roles))
        for i in range(0, len(pending), EXTEND_BATCH):
            await self._extend_batch(pending[i : i + EXTEND_BATCH])

    async def _extend_batch(self, roles: list[str]) -> None:
        held: list[tuple[str, RoleLease]] = []
        guarded: list[_RoleState] = []
        try:
            for role in roles:
                st = self._state(role)
                try:
                    st.sem.acquire_nowait()
                except trio.WouldBlock:
                    continue
                guarded.append(st)
                lease = await self._locks.try_acquire(role)
                if lease is not None:
                    held.append((role, lease))
            if not held:
                return
            until = datetime.fromtimestamp(self._clock() + self._pg.user_ttl, UTC)
            names = [r for r, _ in held]

            def txn(sess: AdminSession) -> list[str]:
                sess.run("BEGIN")
                done: list[str] = []
                for name, comment, _login in sess.run(sql.ROLES_QUERY, names=names):
                    if naming.parse_role_comment(str(comment or "")) is None:
                        continue
                    sess.run(sql.set_valid_until(str(name), until))
                    done.append(str(name))
                sess.run("COMMIT")
                return done

            with trio.fail_after(self._handshake_timeout):
                extended = await self._pools.run(self._pools.admin_database, txn)
            for name in extended:
                entry = self._cache.get(name)
                if entry is not None:
                    self._cache[name] = evolve(entry, valid_until=until)
        finally:
            with trio.CancelScope(shield=True):
                for _, lease in held:
                    await self._locks.release(lease)
            for st in guarded:
                st.sem.release()
                st.notify()

    async def strip(self, role: str) -> None:
        """Access revoked: drop Waypoint group memberships, expire the role now, and drop its
        trigger functions on tables it does not own, in every database where it owns objects.
        Its objects stay its own (nothing is reassigned)."""
        cid = new_correlation_id()
        deadline = trio.current_time() + self._handshake_timeout
        now = self._now()
        self._cache.pop(role, None)

        def txn(sess: AdminSession) -> list[str] | None:
            sess.run("BEGIN")
            rows = sess.run(sql.ROLES_QUERY, names=[role])
            if not rows:
                sess.run("ROLLBACK")
                return None
            if naming.parse_role_comment(str(rows[0][1] or "")) is None:
                raise _RoleNotOurs(role)
            revoked: list[str] = []
            for gname, comment in sess.run(sql.MEMBERSHIPS_QUERY, role=role):
                if naming.parse_group_comment(str(comment or "")) is not None:
                    sess.run(sql.revoke_membership(str(gname), role))
                    revoked.append(str(gname))
            sess.run(sql.set_valid_until(role, now))
            sess.run("COMMIT")
            return revoked

        try:
            with trio.fail_at(deadline):
                async with self.role_guard(role), self._role_lock(role, deadline):
                    info = await self._server_info()
                    inherit = info.dialect.admin_inherit_clause
                    revoked = await self._pools.run(self._pools.admin_database, txn)
                    if revoked is not None and not isinstance(info.dialect, CockroachDialect):
                        await disarm_everywhere(
                            self._pools, role, group=False, inherit_clause=inherit
                        )
                        for g in revoked:
                            await disarm_everywhere(
                                self._pools, g, group=True, inherit_clause=inherit
                            )
        except (trio.TooSlowError, RoleLockTimeout):
            raise ProvisionError(
                provisioning_failed(cid, f"timed out stripping role {role}")
            ) from None
        except AdminError as exc:
            raise self._admin_failure(cid, exc) from None
        except _RoleNotOurs as exc:
            raise ProvisionError(provisioning_failed(cid, str(exc))) from None

    def forget(self, role: str) -> None:
        """Drop the cached secret of ``role`` and every caller-to-name mapping that points at
        it (the role was dropped: the next connection resolves its name and provisions)."""
        self._cache.pop(role, None)
        self._forget_names_of(role)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._locks.aclose()
            if self._pg_locks is not self._locks:
                await self._pg_locks.aclose()
            await self._pools.aclose()
