"""The secrets of provisioned roles: a new one and its verifier (the plaintext never leaves
this process: the server gets the verifier), the cache of those this process set (each kept
with the caller it was set for, given only to that caller, never reused close to its
``VALID UNTIL``), and the extension of ``VALID UNTIL`` for roles in use."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Final

from attrs import evolve, field, frozen

from waypoint.grants import naming
from waypoint.pgwire.scram import ScramKeys, make_md5_verifier, make_scram_verifier
from waypoint.provision import sql
from waypoint.provision.admin import AdminSession
from waypoint.provision.model import Credentials

SECRET_BYTES: Final = 32


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def make_verifier(secret: str, role: str, *, md5: bool) -> tuple[str, ScramKeys | None]:
    """The verifier the server stores for ``secret`` (and the SCRAM keys a login with it
    uses). PBKDF2: call in a worker thread."""
    if md5:
        return make_md5_verifier(secret, role), None
    return make_scram_verifier(secret)


@frozen
class CachedSecret:
    """A secret this process set, for the caller ``owner`` (the role's marker when it was set)."""

    secret: str = field(repr=False)
    scram_keys: ScramKeys | None = field(repr=False)
    valid_until: datetime
    fingerprint: str
    owner: naming.RoleOwner

    def credentials(self, role: str) -> Credentials:
        return Credentials(role, self.secret, self.scram_keys, self.valid_until, False)


class SecretCache:
    """The secrets this process set, by role. An entry is usable while its ``VALID UNTIL`` is
    more than ``handshake_timeout`` away on ``clock``."""

    def __init__(self, clock: Callable[[], float], handshake_timeout: float) -> None:
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._entries: dict[str, CachedSecret] = {}

    def _fresh(self, entry: CachedSecret) -> bool:
        return entry.valid_until.timestamp() - self._clock() > self._handshake_timeout

    def usable(self, role: str, fingerprint: str, owner: naming.RoleOwner) -> CachedSecret | None:
        """The cached secret of ``role`` for this very caller and grant (never another's)."""
        entry = self._entries.get(role)
        if entry is None or entry.fingerprint != fingerprint or entry.owner != owner:
            return None
        return entry if self._fresh(entry) else None

    def peek(self, role: str, owner: naming.RoleOwner | None) -> Credentials | None:
        """The cached credentials of ``role`` if they are usable and were set for ``owner``
        (None: nobody; nothing is given), whatever grant they were provisioned for."""
        entry = self._entries.get(role)
        if entry is None or owner is None or entry.owner != owner or not self._fresh(entry):
            return None
        return entry.credentials(role)

    def put(self, role: str, entry: CachedSecret) -> None:
        self._entries[role] = entry

    def pop(self, role: str) -> None:
        self._entries.pop(role, None)

    def adopt_valid_until(self, role: str, secret: str, until: datetime) -> None:
        """The server's ``VALID UNTIL`` of ``role`` is ``until`` while its secret is still
        ``secret`` (an extension made by another instance); nothing if the cache has since
        set another secret."""
        entry = self._entries.get(role)
        if entry is not None and entry.secret == secret:
            self._entries[role] = evolve(entry, valid_until=until)

    def extended(self, roles: Iterable[str], until: datetime) -> None:
        """The ``VALID UNTIL`` of ``roles`` moved to ``until``."""
        for role in roles:
            entry = self._entries.get(role)
            if entry is not None:
                self._entries[role] = evolve(entry, valid_until=until)


def extend_txn(sess: AdminSession, names: list[str], until: datetime) -> list[str]:
    """Set ``VALID UNTIL`` of Waypoint's roles among ``names`` (its marker decides) to
    ``until``, in one transaction; returns those changed. Blocking."""
    sess.run("BEGIN")
    done: list[str] = []
    for name, comment, _login in sess.run(sql.ROLES_QUERY, names=names):
        if naming.parse_role_comment(str(comment or "")) is None:
            continue
        sess.run(sql.set_valid_until(str(name), until))
        done.append(str(name))
    sess.run("COMMIT")
    return done
