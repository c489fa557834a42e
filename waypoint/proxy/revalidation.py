"""Revalidation: every ``interval``, re-identify each live session and re-evaluate its
grant. Unchanged: extend the role's VALID UNTIL (batched per role). Changed but still granted:
reconcile the role live, cancel the statements its backends are running (they started under
the old privileges), end the transactions they hold open from before the change and roll back
the ones the role prepared before it, and apply tightened limits to the open sessions (a passed
``max_conn_duration`` or ``max_bytes_per_conn``, or more sessions than ``max_conns``, end
with the limit's FATAL 53400). Gone, or identity lookup failing: FATAL, close; a grant that is
gone strips the role and ends every backend of it, not only this instance's sessions (those
of other instances, orphans of a crashed one, direct logins with a self-set password), and
rolls back every transaction it prepared."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from waypoint import errors
from waypoint.errors import Refusal
from waypoint.grants.evaluate import evaluate
from waypoint.grants.model import EffectiveGrant
from waypoint.identity.model import Identity, IdentityError
from waypoint.observability.log import get_logger
from waypoint.provision.backends import (
    cancel_role_statements,
    end_transactions_begun_before,
    rollback_prepared,
    server_now,
    terminate_role_backends,
)
from waypoint.provision.engine import Provisioner
from waypoint.proxy.context import ListenerContext
from waypoint.proxy.registry import LiveSession, SessionRegistry, set_duration_deadline
from waypoint.state.base import SlotUsage

log = get_logger("revalidation")

#: Why a session ends when its role left a group on a server where it could have switched
#: to that group: the switch outlives the membership, and Waypoint cannot see it.
_GROUP_LEFT = (
    "the grant no longer includes a group role this session may have switched to with SET ROLE"
)

# A pass never takes longer than this (each LocalAPI call and admin statement has its own bound).
PASS_BOUND = 60.0

#: Which context revalidates a session (after a reload: the listener's current settings, with
#: the provisioner of the backend the session is on). Default: the listener's current context.
ContextFor = Callable[[LiveSession], ListenerContext | None]


async def revalidate_once(
    contexts: Mapping[str, ListenerContext],
    registry: SessionRegistry,
    context_for: ContextFor | None = None,
) -> None:
    sessions = list(registry)
    if not sessions:
        return
    any_ctx = next(iter(contexts.values()))
    any_ctx.metrics.revalidation_runs.inc()
    identities: dict[tuple[str, int], Identity | IdentityError] = {}
    # Role work is keyed by the provisioner too: after a reload that moved a listener's
    # backend, its earlier sessions' roles live on the backend they were opened on.
    extend: dict[Provisioner, tuple[str, set[str]]] = {}
    stripped: dict[tuple[str, str, Provisioner], ListenerContext] = {}
    reconciled: set[tuple[str, str, Provisioner]] = set()
    cancelled: set[tuple[str, str, Provisioner]] = set()
    # Roles whose sessions all end: they left a group they may have SET ROLE to.
    regrouped: dict[tuple[str, str, Provisioner], ListenerContext] = {}
    changed_principals: dict[tuple[str, str], ListenerContext] = {}
    for live in sessions:
        if live.ended_by is not None or live.closing:
            continue
        ctx = context_for(live) if context_for is not None else contexts.get(live.listener)
        if ctx is None:
            continue
        found = identities.get(live.peer)
        if found is None:
            try:
                found = await ctx.identity.whois(*live.peer)
            except IdentityError as exc:
                found = exc
            identities[live.peer] = found
        if isinstance(found, IdentityError):
            _end(
                ctx,
                live,
                "identity_lookup_failed",
                "identity lookup failed",
                found.refusal.detail or found.refusal.message,
            )
            continue
        if (found.login, found.node) != (live.identity.login, live.identity.node):
            _end(ctx, live, "identity_changed", "the address now belongs to another identity", None)
            continue
        grant = evaluate(
            found,
            live.listener,
            live.database,
            admin_database=ctx.listener.postgres.admin_database,
            defaults=ctx.config.defaults.limits,
            preset_cap=live.preset_cap,
            allow_raw_sql=ctx.allow_raw_sql,
        )
        key = (live.listener, live.role, ctx.provisioner)
        if isinstance(grant, Refusal):
            if key not in stripped:
                stripped[key] = ctx
                _close_pooled(ctx, live.role)
                try:
                    await ctx.provisioner.strip(live.role)
                except Exception as exc:
                    log.error("strip_failed", role=live.role, error=str(exc))
            _end(ctx, live, "access_revoked", grant.message, grant.detail)
            continue
        live.identity = found
        if grant == live.grant:
            extend.setdefault(ctx.provisioner, (live.listener, set()))[1].add(live.role)
            continue
        if key not in reconciled:
            _close_pooled(ctx, live.role)
            try:
                await ctx.provisioner.reconcile(found, grant)
                reconciled.add(key)
                log.info("grant_reconciled", conn_id=live.conn_id, role=live.role)
            except Exception as exc:
                # Fail closed: the role may hold more than the grant now allows.
                log.error("reconcile_failed", role=live.role, error=str(exc))
                _end(
                    ctx,
                    live,
                    "reconcile_failed",
                    "the changed grant could not be applied",
                    str(exc),
                )
                continue
        if key in regrouped or (
            live.grant.privileges - grant.privileges and await _members_can_set_role(ctx)
        ):
            regrouped[key] = ctx
            _end(ctx, live, "group_left", _GROUP_LEFT, None)
            continue
        privileges_changed = (grant.privileges, grant.custom) != (
            live.grant.privileges,
            live.grant.custom,
        )
        if key not in cancelled and privileges_changed:
            cancelled.add(key)
            await _stop_old_work(ctx, live.role)
        old = live.grant
        live.grant = grant
        _apply_limits(live, old)
        changed_principals.setdefault((live.listener, live.identity.principal), ctx)
        extend.setdefault(ctx.provisioner, (live.listener, set()))[1].add(live.role)
    # Every backend of a role whose grant is gone ends, wherever it came from. This
    # instance's own sessions of it end through their session's end (FATAL first).
    for (_, role, _), ctx in sorted(stripped.items(), key=lambda kv: kv[0][:2]):
        await _end_role_backends(ctx, registry, role, "access_revoked")
        await _rollback_prepared(ctx, role, "access_revoked")
    for (_, role, _), ctx in sorted(regrouped.items(), key=lambda kv: kv[0][:2]):
        await _end_role_backends(ctx, registry, role, "group_left")
        await _rollback_prepared(ctx, role, "grant_changed")
    for (_, principal), ctx in sorted(changed_principals.items(), key=lambda kv: kv[0]):
        await _enforce_max_conns(ctx, registry, principal)
    for provisioner, (listener, roles) in extend.items():
        try:
            await provisioner.extend_validity(roles)
        except Exception as exc:
            log.error("extend_validity_failed", listener=listener, error=str(exc))


def _end(
    ctx: ListenerContext, live: LiveSession, kind: str, reason: str, detail: str | None
) -> None:
    """End ``live``; ``kind`` is a fixed metric label, ``reason`` the client's text."""
    ctx.metrics.revalidation_failures.labels(live.listener, kind).inc()
    log.info(
        "session_revoked",
        kind=kind,
        conn_id=live.conn_id,
        listener=live.listener,
        login=live.identity.login,
        role=live.role,
        reason=reason,
        detail=detail,
    )
    live.end(errors.access_revoked(reason), kind)


def _close_pooled(ctx: ListenerContext, role: str) -> None:
    """The role's access changed: its idle pooled backends go first (in the background;
    ended on the server like a session's), before its grant is applied or stripped."""
    if ctx.pool is not None:
        ctx.pool.close_role(ctx.listener.backend_address, role, "role_closed")


async def _end_role_backends(
    ctx: ListenerContext, registry: SessionRegistry, role: str, reason: str
) -> None:
    keep = registry.backend_pids(ctx.listener.name)
    try:
        pids = await terminate_role_backends(ctx.provisioner.pools, role, keep)
    except Exception as exc:
        log.error("role_backends_end_failed", role=role, error=str(exc))
        return
    if pids:
        ctx.metrics.backend_ended(
            ctx.listener.name, f"{reason}_role", "pg_terminate_backend", len(pids)
        )
        log.info("role_backends_ended", role=role, pids=pids, reason=reason)


async def _members_can_set_role(ctx: ListenerContext) -> bool:
    """Whether the backend lets roles ``SET ROLE`` to their groups (unknown: yes)."""
    try:
        return await ctx.provisioner.members_can_set_role()
    except Exception as exc:
        log.error("server_info_failed", error=str(exc))
        return True


async def _stop_old_work(ctx: ListenerContext, role: str) -> None:
    """The role's privileges changed (the change is committed): what its backends started
    under the old ones stops. Running statements are cancelled; then every backend still
    in a transaction begun before the change is terminated, whichever instance's session
    it serves: rows it wrote, or a cursor it opened, under the old privileges must not be
    committed or read after the change (a cancel cannot stop that; see
    :func:`end_transactions_begun_before`). A session outside a transaction goes on."""
    pools = ctx.provisioner.pools
    try:
        before = await server_now(pools)
        cancelled = await cancel_role_statements(pools, role)
        ended = await end_transactions_begun_before(
            pools, role, before, ctx.config.backend_end_timeout
        )
    except Exception as exc:
        log.error("role_statements_cancel_failed", role=role, error=str(exc))
        cancelled, ended = [], []
    if cancelled:
        log.info("role_statements_cancelled", role=role, pids=cancelled, reason="grant_changed")
    if ended:
        ctx.metrics.backend_ended(
            ctx.listener.name, "grant_changed_in_transaction", "pg_terminate_backend", len(ended)
        )
        log.info("role_transactions_ended", role=role, pids=ended, reason="grant_changed")
    await _rollback_prepared(ctx, role, "grant_changed")


async def _rollback_prepared(ctx: ListenerContext, role: str, reason: str) -> None:
    """Roll back the transactions the role prepared until now: each holds rows written, and
    locks taken, under privileges the role no longer has (after the old transactions were
    ended, one prepared later began under the new ones)."""
    pools = ctx.provisioner.pools
    try:
        gids = await rollback_prepared(pools, role, await server_now(pools))
    except Exception as exc:
        log.error("role_prepared_rollback_failed", role=role, error=str(exc))
        return
    if gids:
        log.info("role_prepared_rolled_back", role=role, count=len(gids), reason=reason)


def _apply_limits(live: LiveSession, old: EffectiveGrant) -> None:
    """An open session follows its changed grant's limits: the duration timer moves (a
    passed limit fires now), and a session already past a lower byte limit ends. The relay
    itself keeps cutting at the byte limit the session started with; a lower one is
    checked here, at each revalidation."""
    limits = live.grant.limits
    if limits.max_conn_duration != old.limits.max_conn_duration:
        set_duration_deadline(live)
    relay = live.relay
    cap = limits.max_bytes_per_conn
    if cap > 0 and relay is not None and relay.bytes_from_client + relay.bytes_from_backend >= cap:
        live.end(errors.session_limit("max_bytes_per_conn", f"{cap} bytes"), "max_bytes_per_conn")


async def _enforce_max_conns(
    ctx: ListenerContext, registry: SessionRegistry, principal: str
) -> None:
    """A lowered ``max_conns`` ends the newest open sessions past it. Counted against the
    shared slot state too (every instance's sessions); several instances may each end their
    newest, so a tightened limit can end more sessions than the excess, never fewer."""
    listener = ctx.listener.name
    try:
        usage: SlotUsage | None = await ctx.state.slot_usage(principal, listener)
    except Exception as exc:
        log.warning("slot_usage_failed", error=str(exc))
        usage = None
    for scope in ("user", "listener"):
        open_now = [
            s
            for s in registry
            if s.identity.principal == principal
            and s.ended_by is None
            and not s.closing
            and (scope == "user" or s.listener == listener)
        ]
        limits = [_conn_limit(s, scope) for s in open_now if _conn_limit(s, scope) > 0]
        if not limits:
            continue
        limit = min(limits)
        count = len(open_now)
        if usage is not None:
            count = max(count, usage.user if scope == "user" else usage.user_listener)
        excess = min(len(open_now), count - limit)
        for live in sorted(open_now, key=lambda s: s.started, reverse=True)[: max(0, excess)]:
            log.info("session_over_limit", conn_id=live.conn_id, limit=limit, scope=scope)
            live.end(errors.session_limit("max_conns", str(limit)), "max_conns")


def _conn_limit(live: LiveSession, scope: str) -> int:
    limits = live.grant.limits
    return limits.max_conns_user if scope == "user" else limits.max_conns_listener


async def revalidation_loop(
    contexts: Mapping[str, ListenerContext],
    registry: SessionRegistry,
    interval: float,
    context_for: ContextFor | None = None,
) -> None:
    if interval <= 0:
        return
    while True:
        await trio.sleep(interval)
        with trio.move_on_after(max(PASS_BOUND, interval)) as scope:
            try:
                await revalidate_once(contexts, registry, context_for)
            except Exception as exc:
                log.error("revalidation_pass_failed", exc_info=True, error=str(exc))
        if scope.cancelled_caught:
            log.warning("revalidation_pass_timeout")
