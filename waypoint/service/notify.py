"""The service manager's notify protocol (``sd_notify``), in a few lines of socket code.

When systemd starts a ``Type=notify`` unit it sets ``NOTIFY_SOCKET`` to a unix datagram
socket (a path, or an abstract name written with a leading ``@``); the service sends
newline-separated ``KEY=VALUE`` lines there: ``READY=1`` once it serves, ``RELOADING=1`` with
``MONOTONIC_USEC`` when a reload begins (then ``READY=1`` again), ``STOPPING=1`` when it
begins to stop, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` microseconds when the unit
has ``WatchdogSec=``, and ``STATUS=`` free text for ``systemctl status``.

Without ``NOTIFY_SOCKET`` (not started by systemd) every call does nothing. A send that
fails (the manager went away, its queue is full) is logged once and never raises: the
daemon goes on serving.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import trio

from waypoint.observability.log import get_logger

__all__ = ["Notifier"]

log = get_logger("notify")


def _parse_address(value: str) -> str | bytes | None:
    """``NOTIFY_SOCKET`` → an AF_UNIX address; None for what this module cannot speak."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """Sends notify messages to ``NOTIFY_SOCKET`` (read once, at construction)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _parse_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("notify_socket_unsupported", address=raw[:100])
        #: Seconds between ``WATCHDOG=1`` pings (half the manager's timeout), or None.
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        for_us = not pid or (pid.isdigit() and int(pid) == os.getpid())
        if self.address is not None and usec.isdigit() and int(usec) > 0 and for_us:
            self.watchdog_interval = int(usec) / 1_000_000 / 2
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one message of ``KEY=VALUE`` lines. True when it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # a full queue drops the message, never blocks trio
                sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._failing:
                log.warning("notify_failed", error=str(exc), message=lines[0])
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Serving (after start, and after a reload)."""
        return self.send("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins; follow with :meth:`ready` when the new configuration serves."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """A shutdown (drain) begins."""
        return self.send("STOPPING=1", *_status(status))

    def status(self, status: str) -> bool:
        return self.send(*_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """Ping every :attr:`watchdog_interval` until cancelled (returns at once without one).
        Runs on the trio loop, so a stuck loop stops the pings and the manager restarts us."""
        if self.watchdog_interval is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(self.watchdog_interval)


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.split()),)  # one line: a newline would start a new key
