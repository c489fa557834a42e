"""Live sessions (for revalidation, drain and metrics) and the short refusal cache (docs/protocol.md)."""

from __future__ import annotations

import hashlib
import itertools
import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from waypoint.errors import Refusal
from waypoint.grants.model import EffectiveGrant, Preset
from waypoint.identity.model import Identity
from waypoint.pgwire import build_error_response
from waypoint.proxy.relay import RelayControl

if TYPE_CHECKING:
    from waypoint.audit.session import SessionAudit


def fatal_bytes(refusal: Refusal) -> bytes:
    return build_error_response("FATAL", refusal.sqlstate, refusal.message, hint=refusal.hint)


@attrs.define(eq=False)
class LiveSession:
    """One relayed session, as revalidation and shutdown see it."""

    conn_id: str
    listener: str
    peer: tuple[str, int]
    identity: Identity
    grant: EffectiveGrant
    database: str
    preset_cap: Preset | None
    role: str
    started: float
    #: The backend's process id (from its BackendKeyData), None if it sent none.
    backend_pid: int | None = None
    relay: RelayControl | None = None
    tls: bool = False
    #: What the backend is doing (``pg_stat_activity.state``) as the console last read it.
    state: str = ""
    ended_by: Refusal | None = None
    #: Why Waypoint ended it (a fixed metric label), when it did.
    end_kind: str | None = None
    #: The relay is over; the backend is being ended (the slot is still held).
    closing: bool = False
    #: The ``max_conn_duration`` timer's scope; revalidation moves its deadline.
    duration_scope: trio.CancelScope | None = None
    #: The statement audit of this session (None when audit is off); its read-only
    #: ``last_statement`` is the text of the current or last statement.
    audit: SessionAudit | None = None
    _pending_end: Refusal | None = None
    #: The listener context that accepted it (after a reload, maybe no longer the current one:
    #: its backend and provisioner stay the session's own).
    owner: object | None = attrs.field(default=None, kw_only=True)

    def attach(self, relay: RelayControl) -> None:
        self.relay = relay
        if self._pending_end is not None:
            relay.terminate(fatal_bytes(self._pending_end))

    def end(self, refusal: Refusal, kind: str = "ended") -> None:
        """Ask the relay to end the session with a FATAL at the next message boundary.
        ``kind`` is why, a fixed label (``access_revoked``, ``max_conn_duration``, ...)."""
        if self.ended_by is not None or self.closing:
            return
        self.ended_by = refusal
        self.end_kind = kind
        if self.relay is not None:
            self.relay.terminate(fatal_bytes(refusal))
        else:
            self._pending_end = refusal


def set_duration_deadline(live: LiveSession) -> None:
    """Point the session's ``max_conn_duration`` timer at its grant's limit (revalidation
    calls this after a grant change: a lower limit already passed ends the session now)."""
    scope = live.duration_scope
    if scope is not None:
        seconds = live.grant.limits.max_conn_duration
        scope.deadline = live.started + seconds if seconds > 0 else math.inf


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, LiveSession] = {}
        self._changed = trio.Event()
        #: Process ids of backends this instance holds outside a session, per listener (the
        #: pool's idle backends): not live sessions (no role is kept alive for them), but not
        #: orphans either.
        self.held_pids: Callable[[str], set[int]] | None = None

    def add(self, session: LiveSession) -> None:
        self._sessions[session.conn_id] = session

    def remove(self, session: LiveSession) -> None:
        self._sessions.pop(session.conn_id, None)
        self._changed.set()
        self._changed = trio.Event()

    def __iter__(self) -> Iterator[LiveSession]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def roles_in_use(self, listener: str) -> set[str]:
        return {s.role for s in self._sessions.values() if s.listener == listener}

    def backend_pids(self, listener: str) -> set[int]:
        """The backend pids of this instance's sessions on ``listener`` (ending ones too), and
        of the backends it holds idle for the listener (``held_pids``)."""
        pids = {
            s.backend_pid
            for s in self._sessions.values()
            if s.listener == listener and s.backend_pid is not None
        }
        if self.held_pids is not None:
            pids |= self.held_pids(listener)
        return pids

    async def wait_empty(self) -> None:
        while self._sessions:
            await self._changed.wait()


_conn_counter = itertools.count(1)


def new_conn_id() -> str:
    """A short id for log lines and 58000 messages (unique per process, not secret)."""
    return f"{secrets.token_hex(3)}-{next(_conn_counter)}"


@attrs.define
class _CachedRefusal:
    refusal: Refusal
    expires: float


class RefusalCache:
    """Refusals cached per (peer IP, startup parameters) for a few seconds.

    libpq and asyncpg with ``sslmode=prefer`` retry without TLS after any ErrorResponse sent
    before AuthenticationOk; the retry must cost no second whois or provision, and under
    ``tls_mode=require`` its "TLS is required" message repeats the first reason.
    """

    def __init__(self, ttl: float = 5.0, clock: Callable[[], float] = trio.current_time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], _CachedRefusal] = {}

    @staticmethod
    def _key(peer_ip: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        h = hashlib.sha256()
        for k, v in sorted(parameters.items()):
            h.update(k.encode("utf-8", "replace") + b"\0" + v.encode("utf-8", "replace") + b"\0")
        return peer_ip, h.hexdigest()

    def get(self, peer_ip: str, parameters: Mapping[str, str]) -> Refusal | None:
        entry = self._entries.get(self._key(peer_ip, parameters))
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._entries.pop(self._key(peer_ip, parameters), None)
            return None
        return entry.refusal

    def put(self, peer_ip: str, parameters: Mapping[str, str], refusal: Refusal) -> None:
        now = self._clock()
        if len(self._entries) > 10_000:
            self._entries = {k: e for k, e in self._entries.items() if e.expires > now}
        self._entries[self._key(peer_ip, parameters)] = _CachedRefusal(refusal, now + self.ttl)
