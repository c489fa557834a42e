"""The shared-state interface the proxy uses: connection slots, cancel-key routing, locks.

Two backends implement :class:`StateStore`: :mod:`waypoint.state.memory` (one process) and
:mod:`waypoint.state.redis_store` (several instances sharing one Redis). Both are opened with
:func:`waypoint.state.open_state`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Protocol

import trio
from attrs import define, field, frozen

from waypoint.errors import Refusal

# The names a refusal gives each limit (docs/policy.md#limits).
LIMIT_USER = "max_conns (all listeners)"
LIMIT_TOTAL = "max_conns_total"


def limit_listener(listener: str) -> str:
    return f"max_conns on listener {listener}"


class StateUnavailableError(Exception):
    """Shared state could not be read (only raised by informational calls such as
    ``slot_usage``; the connection path gets a Refusal instead)."""


@frozen
class SlotRequest:
    """One session asking for a slot. Limits: 0 means unlimited (``max_total`` has a config
    default of 1000, so 0 only arrives here if an operator wrote it)."""

    principal: str  # Identity.principal: the login, or "tagged-devices:<node>"
    listener: str
    max_user: int = 0  # rule-level max_conns: the principal across all listeners
    max_user_listener: int = 0  # backend-entry max_conns: the principal on this listener
    max_total: int = 0  # max_conns_total: the whole deployment

    def __attrs_post_init__(self) -> None:
        if not self.principal:
            raise ValueError("SlotRequest.principal must not be empty")
        if not self.listener:
            raise ValueError("SlotRequest.listener must not be empty")
        for name in ("max_user", "max_user_listener", "max_total"):
            if getattr(self, name) < 0:
                raise ValueError(f"SlotRequest.{name} must be >= 0")


@frozen
class SlotLease:
    """A granted slot; hand it back to :meth:`StateStore.release_slot` exactly once (more is
    harmless)."""

    lease_id: str
    principal: str
    listener: str


@frozen
class SlotUsage:
    """Live sessions counted against each scope (for tests, metrics and ``explain``)."""

    user: int
    user_listener: int
    total: int


@frozen
class CancelTarget:
    """What a cancel key names: the listener whose backend issued it, that backend's address
    (as configured when the session began) and whose session it is (``Identity.principal``).

    A target read from shared state is a claim, not an address to trust: the cancel path
    sends only to the backend configured for ``listener`` and only for a peer whose identity
    is ``principal``.

    ``sealed``: when the client was given a cancel secret of its own (a pooled backend serves
    one client after another, each with a fresh secret), the backend's real secret, masked
    with the client's (:func:`seal_backend_secret`); empty when the client holds the backend's
    own key. Shared state never holds a secret a cancel could be sent with: the entry is
    stored under a hash of the client's key, and only that key unmasks ``sealed``."""

    listener: str
    backend: tuple[str, int]
    principal: str
    sealed: bytes = field(default=b"", repr=False)

    def backend_secret(self, pid: int, client_secret: bytes) -> bytes:
        """The secret to send to the backend for a client that presented ``client_secret``."""
        if not self.sealed:
            return client_secret
        return seal_backend_secret(pid, client_secret, self.sealed)

    def encode(self) -> str:
        data = {"l": self.listener, "b": format_backend(self.backend), "p": self.principal}
        if self.sealed:
            data["s"] = self.sealed.hex()
        return json.dumps(data, separators=(",", ":"))

    @staticmethod
    def decode(text: str) -> CancelTarget | None:
        """Parse a stored target; a bare ``host:port`` (the format before targets named their
        listener and owner) parses with an empty listener and principal, which no cancel
        matches. None if malformed."""
        if not text.startswith("{"):
            backend = parse_backend(text)
            return None if backend is None else CancelTarget("", backend, "")
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        listener, address, principal = data.get("l"), data.get("b"), data.get("p")
        sealed_hex = data.get("s", "")
        if not (
            isinstance(listener, str)
            and isinstance(address, str)
            and isinstance(principal, str)
            and isinstance(sealed_hex, str)
        ):
            return None
        try:
            sealed = bytes.fromhex(sealed_hex)
        except ValueError:
            return None
        if sealed and not 4 <= len(sealed) <= 256:
            return None
        backend = parse_backend(address)
        if backend is None:
            return None
        return CancelTarget(listener, backend, principal, sealed)


def seal_backend_secret(pid: int, client_secret: bytes, secret: bytes) -> bytes:
    """``secret`` (a backend's cancel secret) XOR a SHAKE-256 stream of ``client_secret``:
    its own inverse. The stream is domain-separated from :func:`cancel_key_digest` (the name
    the entry is stored under), so what shared state holds unmasks nothing without the
    client's secret, which is random, fresh per client and never stored."""
    mask = hashlib.shake_256(
        b"waypoint cancel seal\0" + struct.pack("!I", pid & 0xFFFFFFFF) + client_secret
    ).digest(len(secret))
    return bytes(a ^ b for a, b in zip(secret, mask, strict=True))


@frozen
class LockToken:
    """A held lock: its name and the random token that proves ownership."""

    name: str
    token: str = field(repr=False)


class StateStore(Protocol):
    async def acquire_slot(self, req: SlotRequest) -> SlotLease | Refusal:
        """Take one slot in every scope, or none. Refusal 53300 names the limit; shared state
        unreachable: refusal 08004 (fail closed)."""
        ...

    async def release_slot(self, lease: SlotLease) -> None:
        """Idempotent; never raises (a failed Redis write is retried in the background)."""
        ...

    async def slot_usage(self, principal: str, listener: str) -> SlotUsage: ...

    async def register_cancel_key(
        self, pid: int, secret: bytes, target: CancelTarget, ttl: float
    ) -> None: ...

    async def unregister_cancel_key(self, pid: int, secret: bytes) -> None: ...

    async def lookup_cancel_key(self, pid: int, secret: bytes) -> CancelTarget | None: ...

    async def acquire_lock(self, name: str, *, ttl: float, deadline: float) -> LockToken | None:
        """Retry until ``deadline`` (absolute, ``trio.current_time()``); None if not taken."""
        ...

    async def release_lock(self, token: LockToken) -> None:
        """Release only if ``token`` still owns the lock; never raises."""
        ...

    async def aclose(self) -> None: ...


def cancel_key_digest(pid: int, secret: bytes) -> str:
    """sha256(pid as 4 bytes big-endian || secret), hex: the secret never appears in a key."""
    return hashlib.sha256(struct.pack("!I", pid & 0xFFFFFFFF) + secret).hexdigest()


def format_backend(backend: tuple[str, int]) -> str:
    host, port = backend
    return f"{host}:{port}"


def parse_backend(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    value = int(port)
    if not 0 < value < 65536:
        return None
    return host, value


def validate_cancel_args(pid: int, secret: bytes) -> None:
    # The wire core reads the pid as a signed Int32 (PostgreSQL's pids are positive, but
    # CockroachDB's 64-bit cancel key can set the top bit); both signs name the same key.
    if not -(2**31) <= pid <= 0xFFFFFFFF:
        raise ValueError("cancel key pid must fit in 32 bits")
    if not 4 <= len(secret) <= 256:
        raise ValueError("cancel key secret must be 4..256 bytes")


@define
class _CancelEntry:
    secret: bytes = field(repr=False)
    target: CancelTarget
    expires: float


@define
class CancelTable:
    """In-process cancel-key map: pid → entries, secrets compared in constant time."""

    _by_pid: dict[int, list[_CancelEntry]] = field(factory=dict)
    _registrations: int = 0

    def register(self, pid: int, secret: bytes, target: CancelTarget, ttl: float) -> None:
        now = trio.current_time()
        self._registrations += 1
        if self._registrations % 1024 == 0:
            self._purge(now)
        entries = [
            e
            for e in self._by_pid.get(pid, [])
            if e.expires > now and not hmac.compare_digest(e.secret, secret)
        ]
        entries.append(_CancelEntry(bytes(secret), target, now + ttl))
        self._by_pid[pid] = entries

    def unregister(self, pid: int, secret: bytes) -> None:
        now = trio.current_time()
        entries = [
            e
            for e in self._by_pid.get(pid, [])
            if e.expires > now and not hmac.compare_digest(e.secret, secret)
        ]
        if entries:
            self._by_pid[pid] = entries
        else:
            self._by_pid.pop(pid, None)

    def lookup(self, pid: int, secret: bytes) -> CancelTarget | None:
        now = trio.current_time()
        found: CancelTarget | None = None
        # Compare against every live entry so timing does not say which one matched.
        for e in self._by_pid.get(pid, []):
            if hmac.compare_digest(e.secret, secret) and e.expires > now:
                found = e.target
        return found

    def _purge(self, now: float) -> None:
        for pid in list(self._by_pid):
            live = [e for e in self._by_pid[pid] if e.expires > now]
            if live:
                self._by_pid[pid] = live
            else:
                del self._by_pid[pid]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_pid.values())
