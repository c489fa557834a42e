"""The provisioner: one :class:`Provisioner` per listener, the front of provisioning (single
flight, the secret cache, the role's name, the locks); the plan is :mod:`.plan`, the one
transaction :mod:`.apply`, the secrets :mod:`.secret`.

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

import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    contextmanager,
    nullcontext,
)
from datetime import UTC, datetime
from typing import Final

import trio
from attrs import frozen

from waypoint.config.model import ListenerConfig
from waypoint.errors import bad_grant, provisioning_failed
from waypoint.grants import naming
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity
from waypoint.observability.log import get_logger
from waypoint.pgwire.scram import ScramKeys
from waypoint.provision import sql
from waypoint.provision.admin import AdminError, AdminPools, AdminSession
from waypoint.provision.apply import (
    PasswordChange,
    Signature,
    TxnResult,
    provision_txn,
    strip_txn,
)
from waypoint.provision.backends import rollback_prepared, server_now
from waypoint.provision.dialect import CockroachDialect, Dialect, detect_dialect
from waypoint.provision.disarm import disarm_everywhere
from waypoint.provision.flight import Flight, LeaderGone, RoleState, wait_for
from waypoint.provision.locks import (
    GroupLocks,
    PgAdvisoryRoleLock,
    RoleLease,
    RoleLockBackend,
    RoleLockTimeout,
)
from waypoint.provision.model import (
    Credentials,
    DatabaseMissing,
    GroupNotOurs,
    NameTaken,
    ProvisionError,
    RoleMissing,
    RoleNotOurs,
    new_correlation_id,
)
from waypoint.provision.plan import ProvisionPlan, build_plan, grant_fingerprint
from waypoint.provision.rawsql import RawSqlError
from waypoint.provision.secret import (
    CachedSecret,
    SecretCache,
    extend_txn,
    make_verifier,
    new_secret,
)
from waypoint.provision.server import ServerInfo, probe_server, role_settings, use_md5

# What callers import from here: the provisioner and what it hands out or raises.
__all__ = ["Credentials", "DatabaseMissing", "ProvisionError", "Provisioner"]

log = get_logger("provision")

RETRYABLE_SQLSTATES: Final = frozenset({"23505", "XX000", "40P01"})
EXTEND_BATCH: Final = 8


@frozen
class _Ask:
    """One caller's request for its role's credentials, as the single flight sees it."""

    identity: Identity
    grant: EffectiveGrant
    role: str
    owner: naming.RoleOwner
    fingerprint: str
    deadline: float
    cid: str


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
        self._states: dict[str, RoleState] = {}
        self._cache = SecretCache(clock, handshake_timeout)
        self._resolved: dict[tuple[str, str, str, str, str | None], str] = {}
        self._group_signatures: dict[str, Signature] = {}
        self._info: ServerInfo | None = None
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
        and a name found to carry another caller's marker is forgotten
        (:class:`~waypoint.provision.model.NameTaken`).
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
        raise RoleNotOurs(fallback)

    def _forget_names_of(self, role: str) -> None:
        """Forget every remembered caller-to-name mapping that points at ``role``."""
        for key in [k for k, v in self._resolved.items() if v == role]:
            del self._resolved[key]

    # -- server info -------------------------------------------------------------

    async def _server_info(self) -> ServerInfo:
        if self._info is not None:
            return self._info
        async with self._info_lock:
            if self._info is None:
                version, enc = await self._pools.run(self._pools.admin_database, probe_server)
                dialect = detect_dialect(version)
                if isinstance(dialect, CockroachDialect) and not self._custom_lock_backend:
                    raise ProvisionError(
                        provisioning_failed(
                            new_correlation_id(),
                            "CockroachDB has no advisory locks and Waypoint has no other role "
                            "lock for it: provisioning on CockroachDB is not supported",
                        )
                    )
                self._info = ServerInfo(dialect, enc)
            return self._info

    # -- the cache ----------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

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
        return self._cache.peek(role, owner)

    def _state(self, role: str) -> RoleState:
        st = self._states.get(role)
        if st is None:
            st = self._states[role] = RoleState()
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
    ) -> tuple[Credentials, RoleState, Flight | None]:
        """The caller's credentials, and the flight to leave when done (None: a cache hit).

        A role name whose marker turns out to name another caller is forgotten and the name
        resolved again (at most twice more): by then the marker decides the name.
        """
        fingerprint = grant_fingerprint(grant)
        owner = naming.role_owner(identity, grant.listener, grant.database, grant.preset_cap)
        deadline = self._deadline()
        last: NameTaken | None = None
        for _attempt in range(3):
            try:
                with self._failures(cid, "resolving the role name"), trio.fail_at(deadline):
                    role = await self._resolve_role(identity, grant)
            except RoleNotOurs as exc:
                raise ProvisionError(provisioning_failed(cid, str(exc))) from None
            ask = _Ask(identity, grant, role, owner, fingerprint, deadline, cid)
            try:
                return await self._obtain_role(ask, rotate)
            except NameTaken as exc:
                last = exc
                if self._resolved.get(self._name_key(identity, grant)) == role:
                    del self._resolved[self._name_key(identity, grant)]
        assert last is not None
        raise ProvisionError(last.refusal) from None

    async def _obtain_role(
        self, ask: _Ask, rotate: bool
    ) -> tuple[Credentials, RoleState, Flight | None]:
        """Join the caller's flight, answer from the cache, or lead a new flight once the
        role's guard is free."""
        st = self._state(ask.role)
        while True:
            flight = st.flight
            if flight is not None and flight.phase == "provisioning":
                creds = await self._join(st, flight, ask)
                if creds is None:
                    continue
                return creds, st, flight
            if not rotate:
                entry = self._cache.usable(ask.role, ask.fingerprint, ask.owner)
                if entry is not None:
                    return entry.credentials(ask.role), st, None
            try:
                st.sem.acquire_nowait()
            except trio.WouldBlock:
                await wait_for(st.changed, ask.deadline, ask.cid)
                continue
            return await self._lead(st, ask)

    async def _join(self, st: RoleState, flight: Flight, ask: _Ask) -> Credentials | None:
        """Wait for a flight in progress: its credentials when it is this caller's and it
        succeeded, None to look again (another caller's flight ended, or its leader was
        cancelled); its error when it failed."""
        if flight.fingerprint != ask.fingerprint or flight.owner != ask.owner:
            # Another grant, or another caller whose name looks the same: never join
            # it; wait for it to finish, then the marker decides.
            await wait_for(flight.done, ask.deadline, ask.cid)
            return None
        flight.participants += 1
        try:
            await wait_for(flight.done, ask.deadline, ask.cid)
        except BaseException:
            await self._leave(st, flight)
            raise
        if flight.creds is None:
            await self._leave(st, flight)
            if isinstance(flight.error, ProvisionError):
                raise flight.error
            return None  # the leader was cancelled: try again ourselves
        return flight.creds

    async def _lead(self, st: RoleState, ask: _Ask) -> tuple[Credentials, RoleState, Flight]:
        """Run a new flight (the role's guard is held): provision, then hold the role lock
        for every participant."""
        flight = Flight(ask.fingerprint, ask.owner)
        st.flight = flight
        st.notify()
        try:
            creds, lease = await self._provision(
                ask.identity, ask.grant, ask.role, ask.fingerprint, ask.deadline, ask.cid
            )
        except BaseException as exc:
            flight.phase = "failed"
            flight.error = exc if isinstance(exc, ProvisionError) else LeaderGone()
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

    async def _leave(self, st: RoleState, flight: Flight) -> None:
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
            with self._failures(cid, f"provisioning role {role}"), trio.fail_at(deadline):
                info = await self._server_info()
                plan = self._plan(identity, grant, role, info, cid)
                secret, keys, change = await self._new_password(role, info)
                lease = await self._locks.acquire(role, deadline)
                try:
                    result = await self._run_txn(plan, change, info)
                    if result.revoked and not isinstance(info.dialect, CockroachDialect):
                        await self._rollback_prepared(role)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self._locks.release(lease)
                    raise
        except RoleNotOurs as exc:
            # The name carries another caller's marker: whatever this process remembers
            # about it is someone else's now.
            self._forget_names_of(role)
            self._cache.pop(role)
            raise NameTaken(provisioning_failed(cid, str(exc))) from None
        except (GroupNotOurs, RoleMissing) as exc:
            self._resolved.pop(self._name_key(identity, grant), None)
            raise ProvisionError(provisioning_failed(cid, str(exc))) from None
        creds = self._remember(identity, grant, role, fingerprint, secret, keys, change.valid_until)
        return creds, lease

    async def _new_password(
        self, role: str, info: ServerInfo, *, existing_only: bool = False
    ) -> tuple[str, ScramKeys | None, PasswordChange]:
        """A new secret for ``role``, its SCRAM keys, and the change that sets its verifier,
        a new ``VALID UNTIL`` and the role's settings (PBKDF2 in a worker thread)."""
        secret = new_secret()
        valid_until = datetime.fromtimestamp(self._clock() + self._pg.user_ttl, UTC)
        md5 = use_md5(self._pg, info)
        verifier, keys = await trio.to_thread.run_sync(
            lambda: make_verifier(secret, role, md5=md5), limiter=self._limiter
        )
        settings = role_settings(self._pg, role, info)
        return secret, keys, PasswordChange(verifier, valid_until, settings, existing_only)

    def _remember(
        self,
        identity: Identity,
        grant: EffectiveGrant,
        role: str,
        fingerprint: str,
        secret: str,
        keys: ScramKeys | None,
        valid_until: datetime,
    ) -> Credentials:
        """Cache the secret just set on ``role`` (for the caller, and the grant by its
        ``fingerprint``) and give the credentials of the fresh provision."""
        owner = naming.role_owner(identity, grant.listener, grant.database, grant.preset_cap)
        self._cache.put(role, CachedSecret(secret, keys, valid_until, fingerprint, owner))
        return Credentials(role, secret, keys, valid_until, True)

    async def _rollback_prepared(self, role: str) -> None:
        """The provision took privileges from the role: the transactions it prepared before
        (in a session that may be long gone) hold rows written and locks taken under them,
        which a ``COMMIT PREPARED`` would otherwise land now. They are rolled back before the
        caller gets its login (a failure fails the provision)."""
        gids = await rollback_prepared(self._pools, role, await server_now(self._pools))
        if gids:
            log.info(
                "role_prepared_rolled_back",
                listener=self._listener.name,
                role=role,
                count=len(gids),
                reason="grant_changed",
            )

    def _plan(
        self,
        identity: Identity,
        grant: EffectiveGrant,
        role: str,
        info: ServerInfo,
        cid: str,
    ) -> ProvisionPlan:
        try:
            return build_plan(self._pg.user_prefix, role, identity, grant, info.dialect)
        except RawSqlError as exc:
            raise ProvisionError(bad_grant(str(exc), f"correlation id {cid}")) from None

    async def _run_txn(
        self, plan: ProvisionPlan, password: PasswordChange | None, info: ServerInfo
    ) -> TxnResult:
        for attempt in (1, 2):
            known = {
                g.name: self._group_signatures[g.name]
                for g in plan.groups
                if g.name in self._group_signatures
            }

            def txn(sess: AdminSession, known: dict[str, Signature] = known) -> TxnResult:
                return provision_txn(sess, plan, password, known, info.dialect)

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
            self._log_txn(plan, result)
            return result
        raise AssertionError("unreachable")

    def _log_txn(self, plan: ProvisionPlan, result: TxnResult) -> None:
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

    @contextmanager
    def _failures(self, cid: str, doing: str) -> Iterator[None]:
        """Refuse, for what the block was ``doing``, when it ran out of time (its deadline, or
        a role lock not had by then) or an admin statement failed (:meth:`_admin_failure`)."""
        try:
            yield
        except (trio.TooSlowError, RoleLockTimeout):
            raise ProvisionError(provisioning_failed(cid, f"timed out {doing}")) from None
        except AdminError as exc:
            raise self._admin_failure(cid, exc) from None

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

    async def members_can_set_role(self) -> bool:
        """Whether the server lets a role ``SET ROLE`` to its groups (see the dialect)."""
        return (await self._server_info()).dialect.members_can_set_role

    async def reconcile(self, identity: Identity, grant: EffectiveGrant) -> None:
        """Bring the role's memberships to ``grant`` (revalidation saw the grant change).

        With a new secret, as a provision: a cached secret is proof, to whichever instance
        holds it, that the role's memberships are still those it set (a login with it, or
        its ``VALID UNTIL`` for a pooled backend). Without one, another instance that
        provisioned the role for a lower grant before this change would go on logging the
        caller in with its cached secret into the memberships set here, after the grant
        went back down and with no live session left here to bring them down again. The
        live sessions are not touched by it; this process caches the new secret."""
        cid = new_correlation_id()
        role = self.role_for(identity, grant)
        deadline = trio.current_time() + self._handshake_timeout
        try:
            with self._failures(cid, f"reconciling role {role}"), trio.fail_at(deadline):
                async with self.role_guard(role):
                    info = await self._server_info()
                    plan = self._plan(identity, grant, role, info, cid)
                    secret, keys, change = await self._new_password(role, info, existing_only=True)
                    async with self._role_lock(role, deadline):
                        await self._run_txn(plan, change, info)
                    self._remember(
                        identity,
                        grant,
                        role,
                        grant_fingerprint(grant),
                        secret,
                        keys,
                        change.valid_until,
                    )
        except (RoleNotOurs, GroupNotOurs, RoleMissing) as exc:
            raise ProvisionError(provisioning_failed(cid, str(exc))) from None

    def adopt_valid_until(self, creds: Credentials, until: datetime) -> None:
        """``creds`` (from the cache) logged in after the server's ``VALID UNTIL`` for their
        role was read as ``until``, which was not the cached one. Every provision sets a new
        secret and a new ``VALID UNTIL``, and one since the read would have failed the
        login: so ``until`` came from an extension made elsewhere, and the cache takes it
        (while it still holds that secret), so that the role's pooled backends, checked
        against it (:mod:`waypoint.pool.wire`), serve again."""
        self._cache.adopt_valid_until(creds.role, creds.secret, until)

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
        guarded: list[RoleState] = []
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
                return extend_txn(sess, names, until)

            with trio.fail_after(self._handshake_timeout):
                extended = await self._pools.run(self._pools.admin_database, txn)
            self._cache.extended(extended, until)
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
        self._cache.pop(role)

        def txn(sess: AdminSession) -> list[str] | None:
            return strip_txn(sess, role, now)

        try:
            with self._failures(cid, f"stripping role {role}"), trio.fail_at(deadline):
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
        except RoleNotOurs as exc:
            raise ProvisionError(provisioning_failed(cid, str(exc))) from None

    def forget(self, role: str) -> None:
        """Drop the cached secret of ``role`` and every caller-to-name mapping that points at
        it (the role was dropped: the next connection resolves its name and provisions)."""
        self._cache.pop(role)
        self._forget_names_of(role)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._locks.aclose()
            if self._pg_locks is not self._locks:
                await self._pg_locks.aclose()
            await self._pools.aclose()
