"""What provisioning hands out and how it fails: :class:`Credentials`, :class:`ProvisionError`
(the refusal a client sees), and the failures of the transaction that the provisioner turns
into one."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime

from attrs import field, frozen

from waypoint.errors import Refusal
from waypoint.pgwire.scram import ScramKeys


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


class NameTaken(ProvisionError):
    """The role name this caller was about to use carries another caller's marker (it was
    dropped and recreated for someone else, or a look-alike won a race for it): the caller's
    name is resolved again."""


class RoleNotOurs(Exception):
    def __init__(self, role: str) -> None:
        super().__init__(
            f"role {role!r} exists but is not owned by this identity (or not Waypoint's)"
        )


class GroupNotOurs(Exception):
    def __init__(self, group: str) -> None:
        super().__init__(f"group {group!r} exists without Waypoint's group marker")


class RoleMissing(Exception):
    def __init__(self, role: str) -> None:
        super().__init__(f"role {role!r} does not exist")


def new_correlation_id() -> str:
    return secrets.token_hex(6)
