"""One reaper pass (docs/operations.md): drop or retire the expired roles Waypoint
created.

A pass, for one listener:

1. list the roles whose name starts with ``user_prefix`` **and** that carry Waypoint's
   marker (:func:`waypoint.grants.naming.parse_role_comment`); a role with the prefix but
   no marker is never touched;
2. candidates: ``VALID UNTIL`` passed (the server's clock), no session in
   ``pg_stat_activity``, not in use by this instance (``roles_in_use()``). An expired role
   whose only backends are idle ones this instance keeps for reuse (``release_idle``) has
   those ended first and the roles are listed again: a kept backend never keeps a role
   alive;
3. for each candidate, in lock order: the in-process role guard
   (:meth:`Provisioner.role_guard`, waited for briefly), then one attempt at the
   cross-instance role lock (``try_acquire``; busy → skipped this pass), then under both
   its prepared transactions are rolled back, as the role (``DROP ROLE`` would leave them
   with no owner, for only a superuser to end; a rollback that fails keeps the role for the
   next pass), then, re-checked in every transaction (one prepared since: next pass), one
   of:

   - the role owns nothing anywhere (``pg_shdepend`` owner rows): in every database where it
     holds privileges ``DROP OWNED BY r`` (which then only revokes), each transaction run
     under the group locks ``(2, h(db, schema))`` of the schemas involved (sorted; held in
     ``admin_database``, see :class:`waypoint.provision.locks.GroupLocks`); finally in
     ``admin_database`` ``DROP ROLE r``;
   - it owns objects and ``reassign_to`` is set (and passes its checks now): in every such
     database its trigger functions on tables it does not own are dropped, the code it owns
     is made to run as its invoker (SECURITY INVOKER routines, ``security_invoker`` views,
     no rules), then ``REASSIGN OWNED BY r TO reassign_to`` and ``DROP OWNED BY r``; then
     ``DROP ROLE r``;
   - otherwise it is **retired**: every membership revoked, NOLOGIN, no password,
     ``VALID UNTIL`` in the past, per-role settings reset, its trigger functions on tables
     it does not own dropped, and its marker turned into the retired marker. Its objects and
     data stay its own; a later pass drops it once it owns nothing. Nothing is ever
     reassigned to the admin;
4. Waypoint's group roles (``{prefix}grp_*`` with the group marker) that no role is a
   member of any more (the admin's own ADMIN OPTION row excluded) and that own nothing are
   dropped the same way (their prepared transactions rolled back first: a member on 15 may
   ``SET ROLE`` to one), in their own database under their group locks, membership
   re-checked under them.

A failure on one role is logged, reported and the pass goes on; the next pass retries (the
``VALID UNTIL`` backstop keeps an undropped role harmless). ``dry_run`` computes the same
plan and changes nothing.

This module decides, orders and holds the locks; what runs on an admin session (the catalog
reads, each transaction) is in :mod:`waypoint.reaper.transactions`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from functools import partial
from typing import Final, Literal

import trio
from attrs import define, field, frozen

from waypoint.config.model import ListenerConfig
from waypoint.observability.log import get_logger
from waypoint.provision import sql as provision_sql
from waypoint.provision.admin import AdminError, AdminPools, AdminSession
from waypoint.provision.backends import rollback_prepared, server_now
from waypoint.provision.dialect import Dialect, detect_dialect
from waypoint.provision.disarm import disarm_everywhere
from waypoint.provision.engine import Provisioner
from waypoint.provision.locks import RoleLease
from waypoint.reaper import transactions as txn
from waypoint.reaper.transactions import (
    Check,
    MoreSchemas,
    NotEligible,
    Owned,
    Recheck,
    Refused,
    RoleInfo,
)

GUARD_WAIT: Final = 1.0
ROLE_TIMEOUT: Final = 60.0
MAX_DROPS_PER_PASS: Final = 200
RELEASE_TIMEOUT: Final = 5.0
RETIRED_VALID_UNTIL: Final = datetime(2000, 1, 1, tzinfo=UTC)


# -- values ------------------------------------------------------------------------


@frozen
class RoleListing:
    """Waypoint's user roles and group roles under one prefix (unmarked roles left out)."""

    roles: tuple[RoleInfo, ...]
    groups: tuple[RoleInfo, ...]


@frozen
class Skipped:
    role: str
    reason: str


@frozen
class Failure:
    role: str
    reason: str


@frozen
class ReapReport:
    """What one pass did (or, with ``dry_run``, would do)."""

    listener: str
    dry_run: bool
    dropped_roles: tuple[str, ...] = ()
    retired_roles: tuple[str, ...] = ()  # owned objects: retired, not dropped
    dropped_groups: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    failed: tuple[Failure, ...] = ()
    deferred: int = 0  # candidates left for the next pass (the per-pass bound)
    disabled: str | None = None  # why the pass did nothing at all (CockroachDB)
    # (role or group, how many of its prepared transactions were, or would be, rolled back)
    rolled_back: tuple[tuple[str, int], ...] = ()


class ReapError(Exception):
    """The pass could not run at all (e.g. listing the roles failed)."""


# -- internals -------------------------------------------------------------------------


_Outcome = Literal["dropped", "retired"] | Skipped | Failure


@define
class _Tally:
    """What a pass has done so far, and how many more roles it may reap (``budget``)."""

    budget: int
    dropped: list[str] = field(factory=list)
    retired: list[str] = field(factory=list)
    dropped_groups: list[str] = field(factory=list)
    skipped: list[Skipped] = field(factory=list)
    failed: list[Failure] = field(factory=list)
    deferred: int = 0
    rolled_back: list[tuple[str, int]] = field(factory=list)

    def report(self, listener: str, dry_run: bool) -> ReapReport:
        return ReapReport(
            listener,
            dry_run,
            dropped_roles=tuple(self.dropped),
            retired_roles=tuple(self.retired),
            dropped_groups=tuple(self.dropped_groups),
            skipped=tuple(self.skipped),
            failed=tuple(self.failed),
            deferred=self.deferred,
            rolled_back=tuple(self.rolled_back),
        )


def _admin_reason(exc: AdminError) -> str:
    detail = exc.fields.get("D")
    text = str(exc)
    return f"{text} ({detail})" if detail else text


# -- the reaper -----------------------------------------------------------------------------


class Reaper:
    """Reaps the roles of one listener through its :class:`Provisioner`'s admin sessions and
    locks. ``roles_in_use`` returns the roles this instance's live sessions use;
    ``known_listeners`` are the listener names this instance serves: roles whose marker
    names this listener, or a listener not among them (a removed or renamed listener), are
    this reaper's to drop. ``release_idle`` ends this instance's idle kept (pooled)
    backends of the given roles and returns how many it ended."""

    def __init__(
        self,
        listener: ListenerConfig,
        provisioner: Provisioner,
        *,
        roles_in_use: Callable[[], Collection[str]] = frozenset,
        known_listeners: Collection[str] = (),
        release_idle: Callable[[Collection[str]], Awaitable[int]] | None = None,
        guard_wait: float = GUARD_WAIT,
        role_timeout: float = ROLE_TIMEOUT,
        max_drops_per_pass: int = MAX_DROPS_PER_PASS,
    ) -> None:
        if max_drops_per_pass < 1:
            raise ValueError("max_drops_per_pass must be at least 1")
        self._listener = listener
        self._pg = listener.postgres
        self._prov = provisioner
        self._pools: AdminPools = provisioner.pools
        self._roles_in_use = roles_in_use
        self._release_idle = release_idle
        self._known = frozenset(known_listeners) | {listener.name}
        self._guard_wait = guard_wait
        self._role_timeout = role_timeout
        self._max_drops = max_drops_per_pass
        self._dialect: Dialect | None = None
        self._log = get_logger("reaper", listener=listener.name)

    @property
    def listener_name(self) -> str:
        return self._listener.name

    # -- reading -----------------------------------------------------------------------

    async def dialect(self) -> Dialect:
        """The server's dialect (``SELECT version()`` once)."""
        if self._dialect is None:
            version = await self._pools.run(self._pools.admin_database, txn.server_version)
            self._dialect = detect_dialect(version)
        return self._dialect

    async def list_roles(self) -> RoleListing:
        """Waypoint's roles and groups under this listener's prefix (marker required)."""
        try:
            infos = await self._pools.run(
                self._pools.admin_database, partial(txn.list_roles, prefix=self._pg.user_prefix)
            )
        except AdminError as exc:
            raise ReapError(f"listing roles failed: {_admin_reason(exc)}") from None
        roles = tuple(i for i in infos if i.owner is not None)
        groups = tuple(i for i in infos if i.owner is None and i.group_owner is not None)
        return RoleListing(roles, groups)

    async def owned_summary(self) -> tuple[Owned, ...]:
        """What the roles under this listener's prefix own, per database and kind."""
        try:
            return await self._pools.run(
                self._pools.admin_database,
                partial(txn.owned_summary, prefix=self._pg.user_prefix),
            )
        except AdminError as exc:
            raise ReapError(f"listing owned objects failed: {_admin_reason(exc)}") from None

    async def check_reassign_to(self) -> str | None:
        """Why the configured ``reassign_to`` is refused, read from the catalog now (None: not
        set, or acceptable). Raises AdminError when the server cannot be asked."""
        target = self._pg.reassign_to
        if target is None:
            return None
        return await self._pools.run(
            self._pools.admin_database, partial(txn.reassign_target_problem, target=target)
        )

    def _mine(self, info: RoleInfo) -> bool:
        owner = info.owner
        return owner is not None and (
            owner.listener == self._listener.name or owner.listener not in self._known
        )

    # -- a pass --------------------------------------------------------------------------

    async def run_pass(self, *, dry_run: bool = False) -> ReapReport:
        """One pass. Raises :class:`ReapError` when the roles cannot even be listed."""
        disabled = await self._disabled()
        if disabled is not None:
            return ReapReport(self._listener.name, dry_run, disabled=disabled)
        in_use = set(self._roles_in_use())
        listing = await self._listing_without_kept_backends(in_use, dry_run)
        tally = _Tally(budget=self._max_drops)
        await self._reap_roles(self._candidates(listing, in_use, tally), tally, dry_run)
        await self._reap_groups(listing, tally, dry_run)
        if tally.dropped or tally.retired or tally.dropped_groups or tally.failed or tally.deferred:
            self._log.info(
                "reap_pass",
                dry_run=dry_run,
                dropped_roles=len(tally.dropped),
                retired_roles=len(tally.retired),
                dropped_groups=len(tally.dropped_groups),
                skipped=len(tally.skipped),
                failed=len(tally.failed),
                deferred=tally.deferred,
            )
        return tally.report(self._listener.name, dry_run)

    async def _disabled(self) -> str | None:
        """Why this pass does nothing (None: it runs). Raises :class:`ReapError` when the
        server cannot be reached or ``reassign_to`` is refused (every pass, the first one at
        startup included, refuses then: nothing is reaped)."""
        try:
            dialect = await self.dialect()
        except AdminError as exc:
            raise ReapError(f"cannot reach the server: {_admin_reason(exc)}") from None
        if not dialect.reaper_enabled(self._pg.reap_on_cockroachdb):
            return f"{dialect.name}: the reaper is off (set reap_on_cockroachdb = true)"
        if self._pg.reassign_to is not None:
            try:
                problem = await self.check_reassign_to()
            except AdminError as exc:
                raise ReapError(f"cannot check reassign_to: {_admin_reason(exc)}") from None
            if problem is not None:
                raise ReapError(f"reassign_to refused, nothing reaped: {problem}")
        return None

    async def _listing_without_kept_backends(self, in_use: set[str], dry_run: bool) -> RoleListing:
        """The roles; an expired role whose only backends are idle ones this instance keeps
        has those ended first and the roles are listed again."""
        listing = await self.list_roles()
        if self._release_idle is not None and not dry_run:
            held = [
                info.name
                for info in listing.roles
                if info.expired
                and self._mine(info)
                and info.live_sessions
                and info.name not in in_use
            ]
            if held and await self._release_idle(held):
                listing = await self.list_roles()
        return listing

    def _candidates(self, listing: RoleListing, in_use: set[str], tally: _Tally) -> list[RoleInfo]:
        """This listener's expired roles that may go now; those in use are skipped."""
        candidates: list[RoleInfo] = []
        for info in listing.roles:
            if not info.expired or not self._mine(info):
                continue
            if info.retired and info.owned and self._pg.reassign_to is None:
                continue  # retired and still owning objects: nothing to do until it owns none
            if info.live_sessions:
                tally.skipped.append(Skipped(info.name, f"{info.live_sessions} live session(s)"))
            elif info.name in in_use:
                tally.skipped.append(Skipped(info.name, "in use by this instance"))
            else:
                candidates.append(info)
        return candidates

    async def _reap_roles(self, candidates: list[RoleInfo], tally: _Tally, dry_run: bool) -> None:
        """Drop or retire the candidates, as many as the per-pass bound allows."""
        tally.deferred = max(0, len(candidates) - tally.budget)
        for info in candidates[: tally.budget]:
            tally.budget -= 1
            if dry_run:
                owns = info.owned and self._pg.reassign_to is None
                (tally.retired if owns else tally.dropped).append(info.name)
                if info.prepared:
                    tally.rolled_back.append((info.name, info.prepared))
                continue
            outcome = await self._reap_role(info.name, tally.rolled_back)
            self._record(info.name, outcome, tally, group=False)

    async def _reap_groups(self, listing: RoleListing, tally: _Tally, dry_run: bool) -> None:
        """Drop Waypoint's groups no role is a member of any more, within what is left of the
        per-pass bound (with ``dry_run``: those the roles this pass would reap leave empty)."""
        if dry_run:
            gone = set(tally.dropped) | set(tally.retired)
            groups = [g for g in listing.groups if set(g.members) <= gone]
        else:
            try:
                groups = [g for g in (await self.list_roles()).groups if not g.members]
            except ReapError as exc:
                tally.failed.append(Failure("(groups)", str(exc)))
                groups = []
        group_candidates = groups[: max(0, tally.budget)]
        tally.deferred += len(groups) - len(group_candidates)
        connectable: set[str] | None = None
        for info in group_candidates:
            if dry_run:
                tally.dropped_groups.append(info.name)
                if info.prepared and not (info.owned and self._pg.reassign_to is None):
                    tally.rolled_back.append((info.name, info.prepared))
                continue
            if connectable is None:
                try:
                    connectable = await self._connectable_databases()
                except AdminError as exc:
                    tally.failed.append(Failure("(groups)", _admin_reason(exc)))
                    break
            outcome = await self._reap_group(info, connectable, tally.rolled_back)
            self._record(info.name, outcome, tally, group=True)

    def _record(self, role: str, outcome: _Outcome, tally: _Tally, *, group: bool) -> None:
        if outcome in ("dropped", "retired"):
            # Its secret and any caller-to-name mapping pointing at it are stale: the next
            # connection resolves its name again (the marker decides whose it is).
            self._prov.forget(role)
        if outcome == "dropped":
            (tally.dropped_groups if group else tally.dropped).append(role)
            self._log.info("role_dropped", role=role)
        elif outcome == "retired":
            if not group:  # a group is never retired
                tally.retired.append(role)
            self._log.info("role_retired", role=role)
        elif isinstance(outcome, Skipped):
            tally.skipped.append(outcome)
        elif isinstance(outcome, Failure):
            tally.failed.append(outcome)
            self._log.warning("role_drop_failed", role=role, reason=outcome.reason)

    async def _connectable_databases(self) -> set[str]:
        return await self._pools.run(self._pools.admin_database, txn.connectable_databases)

    async def _dependent_databases(self, role: str) -> list[tuple[str, bool]]:
        return await self._pools.run(
            self._pools.admin_database, partial(txn.dependent_databases, role=role)
        )

    # -- user roles ------------------------------------------------------------------------

    async def _reap_role(self, role: str, rolled_back: list[tuple[str, int]]) -> _Outcome:
        try:
            with trio.fail_after(self._role_timeout):
                async with contextlib.AsyncExitStack() as stack:
                    entered = False
                    with trio.move_on_after(self._guard_wait):
                        await stack.enter_async_context(self._prov.role_guard(role))
                        entered = True
                    if not entered:
                        return Skipped(role, "busy: being provisioned by this instance")
                    lease = await self._prov.lock_backend.try_acquire(role)
                    if lease is None:
                        return Skipped(role, "busy: role lock held (being provisioned)")
                    stack.push_async_callback(self._release, lease)
                    return await self._drop_role_locked(role, rolled_back)
        except Exception as exc:  # one role's trouble never ends the pass
            return self._error_outcome(role, exc)

    def _error_outcome(self, name: str, exc: Exception) -> _Outcome:
        """What the reap of one role or group that raised ``exc`` comes to: a skip when it
        turned out not to be eligible, else a failure with the reason."""
        if isinstance(exc, trio.TooSlowError):
            return Failure(name, f"timed out after {self._role_timeout:g}s")
        if isinstance(exc, NotEligible):
            return Skipped(name, exc.reason)
        if isinstance(exc, AdminError):
            return Failure(name, _admin_reason(exc))
        if isinstance(exc, Refused):
            return Failure(name, str(exc))
        return Failure(name, f"{type(exc).__name__}: {exc}")

    async def _release(self, lease: RoleLease) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
            await self._prov.lock_backend.release(lease)

    async def _roll_back_prepared(self, name: str, rolled_back: list[tuple[str, int]]) -> None:
        """Roll back every transaction ``name`` prepared, as ``name``, before it is dropped or
        retired: each keeps its rows, its locks and the cluster's oldest transaction, and
        ``DROP ROLE`` does not refuse a role that has one but leaves it with no owner, which
        only a superuser can end. The admin makes itself a member first (a group's creator
        may not ``SET ROLE`` to it on 16+). Raises :class:`Refused` when one could not be
        rolled back: the role then stays, for the next pass."""
        inherit = (await self.dialect()).admin_inherit_clause

        def member(sess: AdminSession) -> None:
            sess.run(provision_sql.grant_role_to_admin(name, inherit))

        try:
            await self._pools.run(self._pools.admin_database, member)
            gids = await rollback_prepared(self._pools, name, await server_now(self._pools))
        except AdminError as exc:
            raise Refused(
                "its prepared transaction(s) could not be rolled back, so it is kept (dropped, "
                f"it would leave them with no owner): {_admin_reason(exc)}"
            ) from None
        if gids:
            rolled_back.append((name, len(gids)))
            self._log.info("role_prepared_rolled_back", role=name, count=len(gids), reason="reap")

    async def _drop_role_locked(self, role: str, rolled_back: list[tuple[str, int]]) -> _Outcome:
        admin_db = self._pools.admin_database

        def recheck(sess: AdminSession, in_use: frozenset[str]) -> RoleInfo:
            info = txn.one_role(sess, role)
            if info is None:
                raise NotEligible("already dropped", gone=True)
            if not self._mine(info):
                raise NotEligible("no Waypoint marker for this listener any more")
            if not info.expired:
                raise NotEligible("VALID UNTIL was extended")
            if info.live_sessions:
                raise NotEligible(f"{info.live_sessions} live session(s)")
            if role in in_use:
                raise NotEligible("in use by this instance")
            return info

        def settled(sess: AdminSession, in_use: frozenset[str]) -> RoleInfo:
            info = recheck(sess, in_use)
            if info.prepared:
                raise NotEligible(f"prepared {info.prepared} transaction(s) again; next pass")
            return info

        snapshot = frozenset(self._roles_in_use())
        info = await self._pools.run(admin_db, lambda s: recheck(s, snapshot))
        target = self._pg.reassign_to
        if target is not None:
            problem = await self.check_reassign_to()
            if problem is not None:
                raise Refused(f"reassign_to refused, nothing reaped: {problem}")
        if info.prepared:
            await self._roll_back_prepared(role, rolled_back)
        if target is None and info.owned:
            return await self._retire_locked(role, settled)

        def owns_nothing(sess: AdminSession, in_use: frozenset[str]) -> None:
            now = settled(sess, in_use)
            if target is None and now.owned:
                raise NotEligible(f"owns {now.owned} object(s) now; retired next pass")

        for database, allowconn in await self._dependent_databases(role):
            if database == admin_db or not allowconn:
                continue  # admin_database last; a non-connectable one fails DROP ROLE (2BP01)
            snapshot = frozenset(self._roles_in_use())
            try:
                await self._drop_in(database, role, partial(owns_nothing, in_use=snapshot))
            except AdminError as exc:
                if exc.sqlstate != "3D000":  # dropped meanwhile: nothing left there
                    raise
        snapshot = frozenset(self._roles_in_use())
        await self._drop_in(admin_db, role, partial(owns_nothing, in_use=snapshot), drop_role=True)
        return "dropped"

    async def _retire_locked(self, role: str, recheck: Recheck) -> _Outcome:
        """The role owns objects: keep them (and their data) its own and take away everything
        else. First in ``admin_database``: every membership revoked (verified), NOLOGIN, no
        password, ``VALID UNTIL`` in the past, per-role settings reset; then in every database
        where it owns objects its trigger functions on tables it does not own are dropped;
        last the retired marker, so that a failure on the way is retried by the next pass."""
        admin_db = self._pools.admin_database
        past = provision_sql.timestamp_literal(RETIRED_VALID_UNTIL)
        groups, left = await self._pools.run(
            admin_db,
            partial(
                txn.strip_for_retirement,
                role=role,
                past=past,
                recheck=recheck,
                in_use=frozenset(self._roles_in_use()),
            ),
        )
        snapshot = frozenset(self._roles_in_use())

        def still_eligible(sess: AdminSession) -> None:
            recheck(sess, snapshot)

        inherit = (await self.dialect()).admin_inherit_clause
        await disarm_everywhere(
            self._pools, role, group=False, inherit_clause=inherit, check=still_eligible
        )
        for group in groups:
            await disarm_everywhere(self._pools, group, group=True, inherit_clause=inherit)
        if left:  # not marked retired: the next pass tries again
            raise Refused(
                f"retired except for membership(s) the admin could not revoke ({', '.join(left)}:"
                " granted by another role); revoke them and the next pass finishes"
            )
        await self._pools.run(
            admin_db,
            partial(
                txn.mark_retired, role=role, recheck=recheck, in_use=frozenset(self._roles_in_use())
            ),
        )
        return "retired"

    async def _drop_in(
        self,
        database: str,
        role: str,
        check: Check,
        *,
        extra_schemas: Collection[str] = (),
        drop_role: bool = False,
    ) -> None:
        dialect = await self.dialect()

        def drop(sess: AdminSession, locked: frozenset[str]) -> None:
            txn.drop_txn(
                sess,
                role,
                database=database,
                reassign_to=self._pg.reassign_to,
                locked=locked,
                check=check,
                drop_role=drop_role,
                inherit_clause=dialect.admin_inherit_clause,
            )

        # The schemas to lock are read first; the transaction re-reads them under the locks
        # and asks again when objects appeared elsewhere (bounded by the role's timeout).
        locked = set(extra_schemas) | await self._pools.run(
            database, partial(txn.dependent_schemas, role=role)
        )
        while True:
            held = frozenset(locked)
            try:
                async with self._prov.group_locks(database, held, dialect):
                    await self._pools.run(database, partial(drop, locked=held))
                return
            except MoreSchemas as exc:
                locked |= exc.schemas

    # -- groups --------------------------------------------------------------------------

    async def _reap_group(
        self, info: RoleInfo, connectable: set[str], rolled_back: list[tuple[str, int]]
    ) -> _Outcome:
        group = info.name
        owner = info.group_owner
        if owner is None:  # listed as a group, so it had the marker
            return Skipped(group, "no Waypoint group marker")

        def recheck(sess: AdminSession) -> RoleInfo:
            now = txn.one_role(sess, group)
            if now is None:
                raise NotEligible("already dropped", gone=True)
            if now.group_owner is None:
                raise NotEligible("no Waypoint group marker any more")
            if now.members:
                raise NotEligible(f"has {len(now.members)} member(s) again")
            return now

        def settled(sess: AdminSession) -> None:
            prepared = recheck(sess).prepared
            if prepared:
                raise NotEligible(f"prepared {prepared} transaction(s) again; next pass")

        # The group's privileges live in its own database, where provisioning takes the group
        # locks; a database that is gone (or not connectable) cannot be provisioned into.
        home = owner.database if owner.database in connectable else self._pools.admin_database
        home_schemas = (
            {owner.schema} if owner.schema is not None and home == owner.database else set()
        )
        if info.owned and self._pg.reassign_to is None:
            # Objects a member created after SET ROLE to the group: never given to the admin;
            # the group is kept, its code disarmed.
            try:
                with trio.fail_after(self._role_timeout):
                    await disarm_everywhere(
                        self._pools,
                        group,
                        group=True,
                        inherit_clause=(await self.dialect()).admin_inherit_clause,
                        check=recheck,
                    )
            except Exception as exc:
                return self._error_outcome(group, exc)
            return Skipped(
                group,
                f"owns {info.owned} object(s) (created by a member after SET ROLE); kept, "
                "its code runs as its callers",
            )
        try:
            with trio.fail_after(self._role_timeout):
                problem = await self.check_reassign_to()
                if problem is not None:
                    raise Refused(f"reassign_to refused, nothing reaped: {problem}")
                if info.prepared:
                    await self._roll_back_prepared(group, rolled_back)
                for database, allowconn in await self._dependent_databases(group):
                    if database == home or not allowconn:
                        continue
                    try:
                        await self._drop_in(database, group, settled)
                    except AdminError as exc:
                        if exc.sqlstate != "3D000":
                            raise
                await self._drop_in(
                    home, group, settled, extra_schemas=home_schemas, drop_role=True
                )
        except Exception as exc:  # one group's trouble never ends the pass
            return self._error_outcome(group, exc)
        return "dropped"


__all__ = [
    "Failure",
    "ReapError",
    "ReapReport",
    "Reaper",
    "RoleListing",
    "Skipped",
]
