"""CancelRequests: who may cancel a statement, and where a cancel may be sent.

A client's CancelRequest (:func:`serve_cancel_request`) is sent on only when

1. its source address has a token left (``[admission] cancel_burst`` / ``cancel_interval``),
2. the identity provider resolves the peer (a non-tailnet address cancels nothing),
3. the key names a session (here, or on another instance through shared state),
4. that session's target names this listener and the backend this listener is configured
   for (an entry in shared state is a claim: whoever can write Redis must not be able to make
   Waypoint connect anywhere else), and
5. the peer is the session's own identity (same login; a tagged node: the same node).

Anything else is dropped without an answer (PostgreSQL never answers a CancelRequest either),
counted in ``waypoint_cancel_requests_total{outcome}`` and logged as bursts, not per packet.

:func:`forward_cancel` and :func:`send_cancel` are for Waypoint's own cancels of its sessions'
statements: no rate limit or identity, the same configured-backend rule.
"""

from __future__ import annotations

import contextlib
import ssl

import trio

from waypoint.config.model import ListenerConfig
from waypoint.identity.model import IdentityError, IdentityProvider
from waypoint.observability.log import get_logger
from waypoint.pgwire import CancelRequest, build_cancel_request
from waypoint.proxy.admission import Admission
from waypoint.proxy.backend import BackendUnavailable, start_backend_tls
from waypoint.state.base import CancelTarget, StateStore, format_backend

log = get_logger("cancel")

CANCEL_TIMEOUT = 5.0

# Outcomes of a client's CancelRequest (the ``outcome`` label).
FORWARDED = "forwarded"
RATE_LIMITED = "rate_limited"
UNIDENTIFIED = "unidentified"
UNKNOWN_KEY = "unknown_key"
TARGET_REFUSED = "target_refused"
WRONG_IDENTITY = "wrong_identity"
FAILED = "failed"


def configured_backend(target: CancelTarget, listener: ListenerConfig) -> tuple[str, int] | None:
    """The address to send a cancel for ``target`` to: ``listener``'s configured backend, if the
    target names that listener and that backend; else None (do not connect)."""
    if target.listener != listener.name:
        return None
    configured = listener.backend_address
    if tuple(target.backend) != configured:
        return None
    return configured


async def serve_cancel_request(
    request: CancelRequest,
    peer: tuple[str, int],
    *,
    admission: Admission,
    identity: IdentityProvider,
    state: StateStore,
    listener: ListenerConfig,
    ssl_context: ssl.SSLContext | None,
) -> str:
    """Serve one client CancelRequest received on ``listener`` from ``peer``; returns the
    outcome (also counted and, unless forwarded, burst-logged)."""
    outcome, detail = await _check(request, peer, admission, identity, state, listener)
    if detail is not None:
        backend, secret = detail
        sent = await send_cancel(backend, request.pid, secret, listener, ssl_context)
        outcome = FORWARDED if sent else FAILED
        if sent:
            log.info(
                "cancel_forwarded",
                listener=listener.name,
                source=peer[0],
                backend=format_backend(backend),
                pid=request.pid,
            )
    admission.metrics.cancel_request(listener.name, outcome)
    if outcome != FORWARDED:
        admission.cancel_log.record(outcome, peer[0], listener=listener.name)
    return outcome


async def _check(
    request: CancelRequest,
    peer: tuple[str, int],
    admission: Admission,
    identity: IdentityProvider,
    state: StateStore,
    listener: ListenerConfig,
) -> tuple[str, tuple[tuple[str, int], bytes] | None]:
    """The outcome, and for a forwarded request the backend and the secret to send it."""
    if not admission.cancel_buckets.take(peer[0]):
        return RATE_LIMITED, None
    # Who is asking, before anything about the key: an unknown peer learns nothing and
    # costs no shared-state read.
    try:
        who = await identity.whois(*peer)
    except IdentityError:
        return UNIDENTIFIED, None
    target = await state.lookup_cancel_key(request.pid, request.secret)
    if target is None:
        return UNKNOWN_KEY, None
    backend = configured_backend(target, listener)
    if backend is None:
        return TARGET_REFUSED, None
    if who.principal != target.principal:
        return WRONG_IDENTITY, None
    return FORWARDED, (backend, target.backend_secret(request.pid, request.secret))


async def forward_cancel(
    request: CancelRequest,
    state: StateStore,
    listener: ListenerConfig,
    ssl_context: ssl.SSLContext | None,
) -> bool:
    """Waypoint's own cancel of the statement running under ``request``'s key on
    ``listener``'s backend (no identity check: the caller owns the session). Sent only to the
    configured backend. Returns whether it was sent."""
    target = await state.lookup_cancel_key(request.pid, request.secret)
    if target is None:
        return False
    backend = configured_backend(target, listener)
    if backend is None:
        log.warning(
            "cancel_target_refused",
            listener=listener.name,
            target_listener=target.listener,
            target_backend=format_backend(target.backend),
        )
        return False
    secret = target.backend_secret(request.pid, request.secret)
    return await send_cancel(backend, request.pid, secret, listener, ssl_context)


async def send_cancel(
    backend: tuple[str, int],
    pid: int,
    secret: bytes,
    listener: ListenerConfig,
    ssl_context: ssl.SSLContext | None,
) -> bool:
    """Send a CancelRequest for (pid, secret) to ``backend`` (which the caller took from the
    configuration), with ``listener``'s backend TLS. Bounded by ``CANCEL_TIMEOUT``. Returns
    whether the request was sent."""
    host, port = backend
    sent = False
    with trio.move_on_after(CANCEL_TIMEOUT) as scope:
        try:
            sock = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            log.warning("cancel_failed", backend=f"{host}:{port}", error=str(exc))
            return False
        stream: trio.abc.Stream = sock
        try:
            if ssl_context is not None:
                try:
                    tls = await start_backend_tls(sock, backend, listener, ssl_context)
                except BackendUnavailable as exc:
                    log.warning("cancel_failed", backend=f"{host}:{port}", error=str(exc))
                    return False
                if tls is not None:
                    stream = tls
            await stream.send_all(build_cancel_request(pid, secret))
            sent = True
            # The server closes the connection once it has processed the request.
            while await stream.receive_some(1024):
                pass
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            log.debug("cancel_connection_closed", error=str(exc))
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(OSError, trio.BrokenResourceError),
            ):
                await stream.aclose()
    if scope.cancelled_caught:
        log.warning("cancel_timeout", backend=f"{host}:{port}")
    return sent
