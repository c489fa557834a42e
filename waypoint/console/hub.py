"""The console's side of one Waypoint instance: its sessions as the other instances see them,
the commands a console caller runs, kill requests and login locks.

Every ``interval`` (0.5 s) the hub publishes this instance's live sessions, takes the kill
requests other instances left for it, and ends every local session that a lock in force
covers, so a LOCK or KILL made on any instance ends sessions everywhere within about one
interval (well within 2 s). Sessions end the way revalidation ends them
(:meth:`LiveSession.end`: a FATAL at the next message boundary, then the session's own end
path, which also ends its backend).
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from waypoint import errors
from waypoint.config.units import format_duration
from waypoint.console import parser
from waypoint.errors import Refusal
from waypoint.identity.model import Identity
from waypoint.observability.log import get_logger
from waypoint.pgwire.responder import Result, StatementError
from waypoint.proxy.registry import LiveSession, SessionRegistry
from waypoint.state.base import StateStore, StateUnavailableError
from waypoint.state.console import (
    ConsoleDirectory,
    InstanceRecord,
    KillRequest,
    LockRecord,
    MemoryDirectory,
    RedisDirectory,
    SessionRecord,
    covers,
    lock_key,
)

log = get_logger("console")

#: How often the hub publishes, takes kill requests and applies locks.
INTERVAL = 0.5
#: How long a published session list stays visible without a refresh.
LIST_TTL = 5.0


def _instance_id(state: StateStore) -> str:
    value = getattr(state, "instance_id", None)
    if isinstance(value, str):
        return value
    from waypoint.state import default_instance_id

    return default_instance_id()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


@attrs.frozen
class Caller:
    """Who is at the console, and with which access (``"read"`` or ``"admin"``)."""

    identity: Identity
    access: str
    listener: str
    conn_id: str
    peer: str

    @property
    def who(self) -> str:
        return f"{self.identity.login} (node {self.identity.node})"


#: Reads what each session's backend is doing: conn_id → ``pg_stat_activity.state``.
StateProbe = Callable[[Sequence[LiveSession]], Awaitable[dict[str, str]]]
#: How often (in ticks) the hub refreshes its sessions' states for the other instances.
STATE_EVERY = 4


@attrs.define(eq=False)
class ConsoleHub:
    registry: SessionRegistry
    directory: ConsoleDirectory
    instance_id: str
    wall: Callable[[], float] = time.time
    probe: StateProbe | None = None
    #: Other instances read this one's list (Redis): keep its states fresh in the background.
    shared: bool = False
    started: float = attrs.field(init=False)
    _ticks: int = attrs.field(init=False, default=0)
    _published: tuple[tuple[str, str], ...] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.started = self.wall()

    @classmethod
    def for_state(
        cls,
        state: StateStore,
        registry: SessionRegistry,
        wall: Callable[[], float] = time.time,
        probe: StateProbe | None = None,
    ) -> ConsoleHub:
        from waypoint.state.redis_store import RedisStateStore

        directory: ConsoleDirectory
        shared = isinstance(state, RedisStateStore)
        if isinstance(state, RedisStateStore):
            directory = RedisDirectory(state, wall)
        else:
            directory = MemoryDirectory(wall)
        return cls(registry, directory, _instance_id(state), wall, probe, shared)

    # -- the background task -----------------------------------------------------------------

    async def run(self) -> None:
        failing = False
        try:
            while True:
                with trio.move_on_after(5 * INTERVAL):
                    try:
                        await self.tick()
                        if failing:
                            log.info("console_sync_recovered")
                        failing = False
                    except StateUnavailableError as exc:
                        if not failing:  # once per episode, not every interval
                            log.warning("console_sync_failed", error=str(exc))
                        failing = True
                await trio.sleep(INTERVAL)
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(2),
                contextlib.suppress(StateUnavailableError),
            ):
                await self.directory.withdraw(self.instance_id)

    async def refresh_states(self) -> None:
        """Ask the backends what this instance's sessions are doing (bounded; on failure the
        last known states stay)."""
        if self.probe is None:
            return
        sessions = list(self.registry)
        if not sessions:
            return
        states: dict[str, str] = {}
        with trio.move_on_after(2):
            try:
                states = await self.probe(sessions)
            except Exception as exc:
                log.warning("console_state_probe_failed", error=str(exc))
        for live in sessions:
            if live.conn_id in states:
                live.state = states[live.conn_id]

    async def tick(self) -> None:
        """One round: publish, take kill requests, apply locks."""
        if self.shared and self._ticks % STATE_EVERY == 0:
            await self.refresh_states()
        # The list is rewritten when its sessions changed, else every STATE_EVERY ticks (byte
        # counts and states as of then): a large list is not sent to Redis twice a second.
        shape = tuple((live.conn_id, live.state) for live in self.registry)
        if shape != self._published or self._ticks % STATE_EVERY == 0:
            await self.directory.publish(self._record(), LIST_TTL)
            self._published = shape
        self._ticks += 1
        for request in await self.directory.take_kills(self.instance_id):
            for live in self.registry:
                if live.conn_id == request.conn_id:
                    self._end(live, request.by, request.reason)
        locks = await self.directory.locks()
        if locks:
            for live in self.registry:
                for lock in locks:
                    if lock.applies(live.identity.login, live.identity.node, live.identity.node_id):
                        self._end(live, lock.by, f"locked: {lock.reason}", "console_lock")
                        break

    def _record(self) -> InstanceRecord:
        now = self.wall()
        return InstanceRecord(
            self.instance_id,
            self.started,
            now,
            tuple(self._session_record(live, now) for live in self.registry),
        )

    def _session_record(self, live: LiveSession, now: float) -> SessionRecord:
        relay = live.relay
        age = trio.current_time() - live.started
        # The current or last statement, when statement audit keeps one on the session.
        statement = live.audit.last_statement if live.audit is not None else None
        return SessionRecord(
            conn_id=live.conn_id,
            instance=self.instance_id,
            listener=live.listener,
            login=live.identity.login,
            node=live.identity.node,
            database=live.database,
            role=live.role,
            client_addr=f"{live.peer[0]}:{live.peer[1]}",
            tls=live.tls,
            started=now - age,
            state=live.state,
            bytes_in=relay.bytes_from_client if relay is not None else 0,
            bytes_out=relay.bytes_from_backend if relay is not None else 0,
            statement=statement if isinstance(statement, str) else "",
            node_id=live.identity.node_id,
        )

    def _end(self, live: LiveSession, by: str, reason: str, kind: str = "console_kill") -> None:
        if live.ended_by is not None or live.closing:
            return
        log.info(
            "console_session_ended",
            conn_id=live.conn_id,
            listener=live.listener,
            login=live.identity.login,
            node=live.identity.node,
            by=by,
            reason=reason,
        )
        live.end(errors.killed_by(by, reason), kind)

    # -- new connections ---------------------------------------------------------------------

    async def lock_refusal(self, identity: Identity) -> Refusal | None:
        """Why ``identity`` may not connect now (a lock in force), or None. Shared state
        unreachable: refused too (fail closed)."""
        try:
            lock = await self.directory.lock_for(identity.login, identity.node, identity.node_id)
        except StateUnavailableError as exc:
            return errors.state_unavailable(f"lock check failed: {exc}")
        if lock is None:
            return None
        until = _iso(lock.expires) or "UNLOCK"
        return errors.login_locked(identity.principal, lock.by, lock.reason, until)

    # -- commands ----------------------------------------------------------------------------

    async def execute(self, caller: Caller, sql: str) -> Result | StatementError:
        """Run one console statement for ``caller``; every call is logged (the audit)."""
        try:
            command = parser.parse(sql)
        except parser.ConsoleSyntaxError as exc:
            result: Result | StatementError = StatementError(
                parser.SYNTAX_ERROR, exc.message, exc.position
            )
        else:
            if isinstance(command, parser.ADMIN_COMMANDS) and caller.access != "admin":
                result = StatementError(
                    errors.DB_NOT_AUTHORIZED,
                    'permission denied: this console command needs "console": "admin"',
                    hint='the grant gives "console": "read" (SHOW only)',
                )
            else:
                try:
                    result = await self._run(caller, command)
                except StateUnavailableError as exc:
                    result = StatementError("58000", f"shared state unavailable: {exc}")
        self.audit(caller, sql, result)
        return result

    def audit(self, caller: Caller, sql: str, result: Result | StatementError) -> None:
        """The log event of one console statement: who, what, and how it ended."""
        log.info(
            "console_command",
            conn_id=caller.conn_id,
            listener=caller.listener,
            login=caller.identity.login,
            node=caller.identity.node,
            peer=caller.peer,
            access=caller.access,
            statement=sql[:1024],
            outcome="ok" if isinstance(result, Result) else "error",
            tag=result.tag if isinstance(result, Result) else None,
            sqlstate=result.sqlstate if isinstance(result, StatementError) else None,
        )

    async def _run(self, caller: Caller, command: parser.Command) -> Result:
        cols = parser.columns_of(command)
        if isinstance(command, parser.Noop):
            return Result(command.tag)
        if isinstance(command, parser.Show):
            rows: list[tuple[str | None, ...]]
            if command.what == "SESSIONS":
                rows = [
                    (
                        s.conn_id,
                        s.instance,
                        s.listener,
                        s.login,
                        s.node,
                        s.database,
                        s.role,
                        s.client_addr,
                        "on" if s.tls else "off",
                        _iso(s.started),
                        s.state,
                        str(s.bytes_in),
                        str(s.bytes_out),
                        s.statement,
                        s.node_id or None,
                    )
                    for s in await self._sessions()
                ]
            elif command.what == "LOCKS":
                rows = [
                    (
                        lock.login,
                        lock.node,
                        lock.reason,
                        lock.by,
                        _iso(lock.set_at),
                        _iso(lock.expires),
                        ",".join(lock.node_ids) or None,
                    )
                    for lock in sorted(await self.directory.locks(), key=lambda x: x.set_at)
                ]
            else:
                rows = [
                    (rec.instance, _iso(rec.started), str(len(rec.sessions)), _iso(rec.last_seen))
                    for rec in await self._instances()
                ]
            return Result(f"SHOW {len(rows)}", cols, tuple(rows))
        if isinstance(command, parser.Kill):
            found = [s for s in await self._sessions() if s.conn_id == command.conn_id]
            for s in found:
                await self._kill(s, caller.who, "")
            return Result(f"KILL {len(found)}")
        if isinstance(command, parser.KillLogin):
            ids = () if command.node_id is None else (command.node_id,)
            found = [
                s
                for s in await self._sessions()
                if covers(command.login, command.node, ids, s.login, s.node, s.node_id)
            ]
            for s in found:
                await self._kill(s, caller.who, "")
            return Result(f"KILL {len(found)}")
        if isinstance(command, parser.Lock):
            now = self.wall()
            lock = LockRecord(
                command.login,
                command.node,
                command.reason,
                caller.who,
                now,
                None if command.duration is None else now + command.duration,
                await self._node_ids(command),
            )
            await self.directory.set_lock(lock)
            for live in self.registry:
                if lock.applies(live.identity.login, live.identity.node, live.identity.node_id):
                    self._end(live, caller.who, f"locked: {lock.reason}", "console_lock")
            what = command.login + (f" on node {command.node}" if command.node else "")
            if command.node_id is not None:
                what += f" on node id {command.node_id}"
            log.info(
                "console_lock",
                login=command.login,
                node=command.node,
                node_ids=list(lock.node_ids),
                by=caller.who,
                reason=command.reason,
                duration=format_duration(command.duration) if command.duration else None,
                what=what,
            )
            return Result("LOCK")
        assert isinstance(command, parser.Unlock)
        removed = await self.directory.remove_lock(command.login, command.node, command.node_id)
        return Result(f"UNLOCK {1 if removed else 0}")

    async def _node_ids(self, command: parser.Lock) -> tuple[str, ...]:
        """The stable ids a lock covers: the one it names (``NODE ID``); for a lock naming a
        node, those of the live sessions (every instance) of that login on a node of that
        name, and those the same lock already had, so the lock follows the device when its
        owner renames it. A device not connected now is known only by its name."""
        if command.node_id is not None:
            return (command.node_id,)
        if command.node is None:
            return ()
        key = lock_key(command.login, command.node)
        ids = {i for lock in await self.directory.locks() if lock.key == key for i in lock.node_ids}
        for rec in await self._instances():
            for s in rec.sessions:
                if s.node_id and covers(command.login, command.node, (), s.login, s.node):
                    ids.add(s.node_id)
        return tuple(sorted(ids))

    async def _instances(self) -> list[InstanceRecord]:
        """Every instance, this one with its sessions as of now."""
        others = [r for r in await self.directory.instances() if r.instance != self.instance_id]
        return sorted([self._record(), *others], key=lambda r: r.instance)

    async def _sessions(self) -> list[SessionRecord]:
        await self.refresh_states()
        out = [s for rec in await self._instances() for s in rec.sessions]
        return sorted(out, key=lambda s: (s.started, s.conn_id))

    async def _kill(self, record: SessionRecord, by: str, reason: str) -> None:
        if record.instance == self.instance_id:
            for live in self.registry:
                if live.conn_id == record.conn_id:
                    self._end(live, by, reason)
            return
        await self.directory.request_kill(record.instance, KillRequest(record.conn_id, by, reason))
