"""Orphan backends: backends of Waypoint's roles that no live Waypoint session owns.

A session's end ends its backend (``waypoint.proxy.backend_end``), but an instance that was
killed (SIGKILL, OOM, a lost host) ends nothing: its backends run on (a ``DO`` loop never
reads from its closed client), holding privileges, locks and connections. A role's own
caller can also log in directly once it has set itself a password. These are ended here, as a
separate step beside the role reaper, in two passes:

- **at start** (:meth:`OrphanSweeper.sweep`, ``start``), before the instance
  accepts connections: every backend of this listener's Waypoint roles is an orphan, unless
  the shared state shows a live session of the role's caller on this listener on another
  instance (Redis; the memory store knows only this instance, which has none yet);
- **every reaper pass** (``periodic``): with shared state, every backend no session of this
  instance owns and whose caller holds no slot on this listener on any instance (a slot is
  taken before a backend is connected and given back once it is gone); with the memory
  store, which cannot see other instances, only backends of roles whose ``VALID UNTIL``
  passed more than ``grace`` ago (server clock): revalidation pushes ``VALID UNTIL`` forward
  for every role a live session uses, so such a role has no live session on a revalidating
  instance. The reaper drops an expired role at a later pass once ``pg_stat_activity``
  shows none.

Which roles are this listener's is the reaper's rule: the role marker names this listener,
or a listener this instance does not serve.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final, Literal

import attrs

from waypoint.config.model import ListenerConfig
from waypoint.grants import naming
from waypoint.identity.model import Identity
from waypoint.observability.log import get_logger
from waypoint.provision.admin import AdminPools
from waypoint.provision.backends import terminate_pids
from waypoint.reaper import catalog

#: How long past its ``VALID UNTIL`` a role's backends are left alone by the periodic pass.
ORPHAN_GRACE: Final = 60.0

# Backends of roles under the prefix: pid, role, marker, expired for longer than :grace.
BACKENDS_QUERY: Final = (
    "SELECT a.pid, r.rolname::pg_catalog.text, "
    "pg_catalog.shobj_description(r.oid, 'pg_authid'), "
    "COALESCE(r.rolvaliduntil < pg_catalog.now() - "
    "pg_catalog.make_interval(secs => CAST(:grace AS pg_catalog.float8)), false) "
    "FROM pg_catalog.pg_stat_activity AS a "
    "JOIN pg_catalog.pg_roles AS r ON r.oid = a.usesysid "
    f"WHERE r.rolname LIKE :pattern ESCAPE '{catalog.LIKE_ESCAPE}' "
    "AND a.pid <> pg_catalog.pg_backend_pid() "
    "ORDER BY 2, 1"
)

Pass = Literal["start", "periodic"]


@attrs.frozen
class RoleBackend:
    pid: int
    role: str
    owner: naming.RoleOwner
    expired_past_grace: bool


@attrs.frozen
class OrphanReport:
    ended: tuple[tuple[str, int], ...] = ()  # (role, pid)
    kept: tuple[tuple[str, str], ...] = ()  # (role, why)


class OrphanSweeper:
    """Ends the orphan backends of one listener's roles through its admin pools.

    ``roles_in_use`` and ``pids_in_use``: this instance's live sessions (a backend of theirs is
    never an orphan). ``live_elsewhere(principal)``: whether the shared state shows a live
    session of that caller on this listener (another instance's); None: no shared state (the
    memory store), so the periodic pass takes only roles expired past the grace."""

    def __init__(
        self,
        listener: ListenerConfig,
        pools: AdminPools,
        *,
        known_listeners: Collection[str] = (),
        roles_in_use: Callable[[], Collection[str]] = frozenset,
        pids_in_use: Callable[[], Collection[int]] = frozenset,
        live_elsewhere: Callable[[str], Awaitable[bool]] | None = None,
        on_ended: Callable[[Pass, int], None] | None = None,
        grace: float = ORPHAN_GRACE,
    ) -> None:
        self._listener = listener
        self._pools = pools
        self._known = frozenset(known_listeners) | {listener.name}
        self._roles_in_use = roles_in_use
        self._pids_in_use = pids_in_use
        self._live_elsewhere = live_elsewhere
        self._on_ended = on_ended
        self._grace = grace
        self._log = get_logger("reaper", listener=listener.name)

    def _mine(self, owner: naming.RoleOwner) -> bool:
        return owner.listener == self._listener.name or owner.listener not in self._known

    async def backends(self) -> list[RoleBackend]:
        """The backends of this listener's Waypoint roles (marker required)."""
        pattern = catalog.like_prefix(self._listener.postgres.user_prefix)
        grace = float(self._grace)

        def query(sess: Any) -> list[list[Any]]:
            rows: list[list[Any]] = sess.run(BACKENDS_QUERY, pattern=pattern, grace=grace)
            return rows

        rows = await self._pools.run(self._pools.admin_database, query)
        out: list[RoleBackend] = []
        for pid, role, comment, expired in rows:
            owner = naming.parse_role_comment(str(comment or ""))
            if owner is None or not self._mine(owner):
                continue
            out.append(RoleBackend(int(pid), str(role), owner, bool(expired)))
        return out

    async def sweep(self, kind: Pass) -> OrphanReport:
        """End the orphans (see the module docstring for what each pass takes). Raises on an
        admin or shared-state error (the caller logs it; the next pass retries)."""
        in_roles = set(self._roles_in_use())
        in_pids = set(self._pids_in_use())
        elsewhere: dict[str, bool] = {}
        by_role: dict[str, list[int]] = {}
        kept: list[tuple[str, str]] = []
        for b in await self.backends():
            if kind == "periodic" and self._live_elsewhere is None and not b.expired_past_grace:
                continue
            if b.role in in_roles or b.pid in in_pids:
                kept.append((b.role, "in use by this instance"))
                continue
            principal = Identity(b.owner.login, b.owner.node).principal
            if self._live_elsewhere is not None:
                if principal not in elsewhere:
                    elsewhere[principal] = await self._live_elsewhere(principal)
                if elsewhere[principal]:
                    kept.append((b.role, "a live session on another instance"))
                    continue
            by_role.setdefault(b.role, []).append(b.pid)
        ended: list[tuple[str, int]] = []
        # Re-checked against this instance's sessions right before each statement.
        for role, pids in sorted(by_role.items()):
            if role in set(self._roles_in_use()):
                kept.append((role, "in use by this instance"))
                continue
            pids = [p for p in pids if p not in set(self._pids_in_use())]
            done = await terminate_pids(self._pools, role, pids)
            ended += [(role, pid) for pid in done]
        if ended:
            self._log.info(
                "orphan_backends_ended",
                sweep=kind,
                backends=len(ended),
                roles=sorted({r for r, _ in ended}),
            )
            if self._on_ended is not None:
                self._on_ended(kind, len(ended))
        return OrphanReport(tuple(ended), tuple(kept))


__all__ = ["ORPHAN_GRACE", "OrphanReport", "OrphanSweeper", "RoleBackend"]
