"""Single flight: the in-process state of one role. Concurrent provisions of the same role
for the same caller and grant share one flight (one transaction, one secret); the role lock
the leader took is held until the last participant leaves."""

from __future__ import annotations

from typing import Literal

import trio
from attrs import define, field

from waypoint.errors import provisioning_failed
from waypoint.grants import naming
from waypoint.provision.locks import RoleLease
from waypoint.provision.model import Credentials, ProvisionError

Phase = Literal["provisioning", "holding", "failed", "done"]


class LeaderGone(Exception):
    """The task running a shared provision was cancelled; a waiter retries on its own."""


@define
class Flight:
    fingerprint: str
    owner: naming.RoleOwner
    phase: Phase = "provisioning"
    participants: int = 1
    done: trio.Event = field(factory=trio.Event)
    creds: Credentials | None = None
    error: BaseException | None = None
    lease: RoleLease | None = None


@define
class RoleState:
    """One role in this process: its guard (lock order step 1, a semaphore of one), the flight
    running or held, and an event set at every change."""

    sem: trio.Semaphore = field(factory=lambda: trio.Semaphore(1))
    flight: Flight | None = None
    changed: trio.Event = field(factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


async def wait_for(event: trio.Event, deadline: float, cid: str) -> None:
    """Wait for ``event`` until ``deadline``, then fail as a provision that timed out."""
    try:
        with trio.fail_at(deadline):
            await event.wait()
    except trio.TooSlowError:
        raise ProvisionError(
            provisioning_failed(cid, "timed out waiting for a concurrent provision")
        ) from None
