"""The trio driver of one console connection: bytes in, :class:`Responder` events, the hub's
answers, bytes out. The protocol itself is :mod:`waypoint.pgwire.responder` (no I/O)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping

import trio

from waypoint.console import parser
from waypoint.console.hub import Caller, ConsoleHub
from waypoint.errors import Refusal
from waypoint.pgwire.messages import BackendKeyData, build_error_response
from waypoint.pgwire.responder import Responder, Statement, StatementError, Terminated

#: What the console reports as ParameterStatus (drivers read these at connect).
SERVER_VERSION = "16.0 (Waypoint console)"


def server_parameters(startup: Mapping[str, str]) -> dict[str, str]:
    return {
        "server_version": SERVER_VERSION,
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY",
        "IntervalStyle": "postgres",
        "integer_datetimes": "on",
        "TimeZone": "UTC",
        "standard_conforming_strings": "on",
        "is_superuser": "off",
        "session_authorization": startup.get("user", ""),
        "application_name": startup.get("application_name", ""),
    }


def describe(sql: str) -> tuple[str, ...] | StatementError:
    try:
        return parser.columns_of(parser.parse(sql))
    except parser.ConsoleSyntaxError as exc:
        return StatementError(parser.SYNTAX_ERROR, exc.message, exc.position)


async def serve_console(
    hub: ConsoleHub,
    caller: Caller,
    startup: Mapping[str, str],
    send: Callable[[bytes], Awaitable[None]],
    receive: Callable[[], Awaitable[bytes]],
    pending: bytes,
    preamble: bytes = b"",
    recheck: Callable[[], Awaitable[Caller | Refusal]] | None = None,
) -> None:
    """Serve one console session until the client terminates or goes away. ``receive``
    returns b"" (or raises) when the client is gone; ``preamble`` goes before the start.
    ``recheck`` looks the caller up again before every statement: a caller whose grant no
    longer gives the console (or whose login was locked) gets the refusal as a FATAL."""
    key = BackendKeyData(0, secrets.token_bytes(4))

    def checked(sql: str) -> tuple[str, ...] | StatementError:
        # Statements refused here (at Parse, or before a simple Query runs) never reach
        # ``hub.execute``: they are audited here.
        found = describe(sql)
        if isinstance(found, StatementError):
            hub.audit(caller, sql, found)
        return found

    responder = Responder(checked, server_parameters(startup), key)
    await send(preamble + responder.start())
    if pending:
        responder.feed(pending)
    while True:
        event = responder.next_event()
        if event is None:
            out = responder.data_to_send()
            if out:
                await send(out)
            data = await receive()
            if not data:
                return
            responder.feed(data)
            continue
        if isinstance(event, Terminated):
            out = responder.data_to_send()
            if out:
                with trio.move_on_after(1):
                    await send(out)
            return
        assert isinstance(event, Statement)
        if recheck is not None:
            current = await recheck()
            if isinstance(current, Refusal):
                out = responder.data_to_send()
                fatal = build_error_response("FATAL", current.sqlstate, current.message)
                with trio.move_on_after(1):
                    await send(out + fatal)
                return
            caller = current
        responder.answer(await hub.execute(caller, event.sql))
