"""A relay served by the C loop with an audit tap, over socket pairs, for the tests that
drive ``Pump.run`` themselves: client_app <-> [client lane | pump | backend lane] <->
backend_app, the session's tracker tapped on the client lane."""

from __future__ import annotations

import select
import socket
from types import ModuleType
from typing import Any


class TapRig:
    """``module``: the relay extension (the installed one, or a fault-injection build)."""

    def __init__(self, module: ModuleType, tracker: Any) -> None:
        self.client_app, client_proxy = socket.socketpair()
        backend_proxy, self.backend_app = socket.socketpair()
        self.socks = [self.client_app, client_proxy, backend_proxy, self.backend_app]
        for s in (client_proxy, backend_proxy):
            s.setblocking(False)
        self.epoll = select.epoll()
        self.pump = module.Pump(self.epoll.fileno(), 65536, 16)
        self.client = module.Lane(client_proxy.fileno())
        self.backend = module.Lane(backend_proxy.fileno())
        self.client.link(self.backend)
        self.client.budget = 1 << 62
        self.client.tap_enable(tracker, 1 << 20)
        for lane in (self.client, self.backend):
            self.epoll.register(lane.fd, select.EPOLLIN)
            self.pump.add(lane)

    def backend_got_nothing(self) -> bool:
        """Nothing waits to be read at the backend app (nothing was sent to it)."""
        try:
            self.backend_app.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False

    def __enter__(self) -> TapRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pump.discard(self.client)
        self.pump.discard(self.backend)
        self.epoll.close()
        for s in self.socks:
            s.close()
