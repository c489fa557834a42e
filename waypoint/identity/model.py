"""Who is calling: the result of a LocalAPI whois (or the static provider)."""

from __future__ import annotations

from typing import Any, Protocol

from attrs import field, frozen

from waypoint.errors import Refusal

TAGGED_DEVICES = "tagged-devices"


@frozen
class Identity:
    login: str
    node: str  # short node name (ComputedName, else first DNS label of Name)
    tags: tuple[str, ...] = ()
    # Raw capability rule objects (CapMap[capability]), exactly as in the policy.
    rules: tuple[Any, ...] = ()
    # The node's stable id (whois Node.StableID; "" when unknown, e.g. static identities).
    # Recorded by the statement audit; not part of equality.
    node_id: str = field(default="", eq=False)

    @property
    def principal(self) -> str:
        """Whose connection budget this is: the login, or the node for tagged devices."""
        if self.login == TAGGED_DEVICES:
            return f"{TAGGED_DEVICES}/{self.node}"
        return self.login


class IdentityError(Exception):
    """Identity could not be established; ``refusal`` is what the client sees."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.detail or refusal.message)
        self.refusal = refusal


class IdentityProvider(Protocol):
    async def whois(self, host: str, port: int) -> Identity:
        """Identify the peer at (host, port). Raises IdentityError (a subclass per fault)."""
        ...

    async def aclose(self) -> None: ...
