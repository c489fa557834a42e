"""One listener's bound sockets, and the accept loops that serve them: what the service starts
at its start and what a reload binds, starts, stops and drains while the service runs."""

from __future__ import annotations

import attrs
import trio

from waypoint.proxy.context import ListenerContext
from waypoint.proxy.listener import CurrentContext, accept_loop, open_listener

__all__ = ["FINAL_GRACE", "Listening", "bind"]

#: After a drain deadline (the service's, or a removed listener's), sessions get their FATAL;
#: this long to go before they are cut.
FINAL_GRACE = 5.0


@attrs.define(eq=False)
class Listening:
    """One listener's bound sockets and the scope of their accept loops."""

    holder: CurrentContext
    sockets: list[trio.SocketListener]
    addresses: list[tuple[str, int]]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Set once the accept loops ended and the sockets are closed.
    closed: trio.Event = attrs.field(factory=trio.Event)

    async def accept(
        self,
        sessions: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every socket, each connection a task in ``sessions`` (which outlives
        the accept loops, so accepting can stop while sessions go on); started once every
        loop runs. The sockets are closed when the loops end (:meth:`stop`)."""
        try:
            with self.scope:
                async with trio.open_nursery() as acc:
                    for sl in self.sockets:
                        acc.start_soon(accept_loop, self.holder, sl, sessions)
                    task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                for sl in self.sockets:
                    await sl.aclose()
            self.closed.set()

    async def stop(self) -> None:
        """Stop accepting; returns once the sockets are closed (new connections are refused)."""
        self.scope.cancel()
        await self.closed.wait()

    async def discard(self) -> None:
        """Close the sockets of a listener that never accepted (its start, or the reload that
        bound it, failed); shielded, so that it runs while the failure unwinds."""
        with trio.CancelScope(shield=True):
            for sl in self.sockets:
                await sl.aclose()


async def bind(holder: CurrentContext, ctx: ListenerContext) -> Listening:
    """Bind the sockets of ``ctx``'s listener (not accepting yet); ``holder`` is the context
    its connections will take. Raises OSError when an address cannot be bound."""
    sockets = await open_listener(ctx)
    addresses = []
    for sl in sockets:
        sockname = sl.socket.getsockname()
        addresses.append((str(sockname[0]), int(sockname[1])))
    return Listening(holder, sockets, addresses)
