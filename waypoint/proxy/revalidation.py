"""Revalidation (SPEC §9): every ``interval``, re-identify each live session and re-evaluate its
grant. Unchanged: extend the role's VALID UNTIL (batched per role). Changed but still granted:
reconcile the role live. Gone, or identity lookup failing: strip the role, FATAL, close."""

from __future__ import annotations

from collections.abc import Mapping

import trio

from waypoint import errors
from waypoint.errors import Refusal
from waypoint.grants.evaluate import evaluate
from waypoint.identity.model import Identity, IdentityError
from waypoint.observability.log import get_logger
from waypoint.proxy.registry import LiveSession, SessionRegistry
from waypoint.proxy.session import ListenerContext

log = get_logger("revalidation")

# A pass never takes longer than this (each LocalAPI call and admin statement has its own bound).
PASS_BOUND = 60.0


async def revalidate_once(
    contexts: Mapping[str, ListenerContext], registry: SessionRegistry
) -> None:
    sessions = list(registry)
    if not sessions:
        return
    any_ctx = next(iter(contexts.values()))
    any_ctx.metrics.revalidation_runs.inc()
    identities: dict[tuple[str, int], Identity | IdentityError] = {}
    extend: dict[str, set[str]] = {}
    stripped: set[tuple[str, str]] = set()
    reconciled: set[tuple[str, str]] = set()
    for live in sessions:
        if live.ended_by is not None:
            continue
        ctx = contexts.get(live.listener)
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
        if isinstance(grant, Refusal):
            key = (live.listener, live.role)
            if key not in stripped:
                stripped.add(key)
                try:
                    await ctx.provisioner.strip(live.role)
                except Exception as exc:
                    log.error("strip_failed", role=live.role, error=str(exc))
            _end(ctx, live, "access_revoked", grant.message, grant.detail)
            continue
        live.identity = found
        if grant == live.grant:
            extend.setdefault(live.listener, set()).add(live.role)
            continue
        key = (live.listener, live.role)
        if key not in reconciled:
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
        live.grant = grant
        extend.setdefault(live.listener, set()).add(live.role)
    for listener, roles in extend.items():
        try:
            await contexts[listener].provisioner.extend_validity(roles)
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
    live.end(errors.access_revoked(reason))


async def revalidation_loop(
    contexts: Mapping[str, ListenerContext], registry: SessionRegistry, interval: float
) -> None:
    if interval <= 0:
        return
    while True:
        await trio.sleep(interval)
        with trio.move_on_after(max(PASS_BOUND, interval)) as scope:
            try:
                await revalidate_once(contexts, registry)
            except Exception as exc:
                log.error("revalidation_pass_failed", exc_info=True, error=str(exc))
        if scope.cancelled_caught:
            log.warning("revalidation_pass_timeout")
