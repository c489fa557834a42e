"""Attacks on connection admission: the TLS ClientHello read before anyone is known; with
PostgreSQL (15 and 18) and Redis, slots across two instances under bursts, the slots of
connections that die during their setup, a caller naming someone else in its startup packet,
and stalled TLS handshakes."""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import struct
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio
from e2e_support import (
    LISTENER,
    SSL_REQUEST,
    CertFiles,
    E2EEnv,
    capture_logs,
    create_app_database,
    db_rule,
    e2e_env,
    error_fields,
    hostile_client_env,
    make_cert_files,
    make_config_text,
    parse_server_messages,
    raw_exchange,
    run_waypoint,
    tls_client_hello,
)
from localapi_standin import LocalAPIStandin, run_standin
from pgcluster import PgCluster
from state_support import KeySpace

from waypoint.app import Running
from waypoint.config.load import load_config_text
from waypoint.pgwire import MessageReader, build_startup_message
from waypoint.provision.sql import GROUP_LOCK_CLASS, group_lock_key
from waypoint.proxy.handshake import _read_client_hello
from waypoint.proxy.source import EARLY_PER_PEER, ConnectingSource
from waypoint.proxy.tls import ClientHelloError, ClientHelloScanner, client_hello_length

# -- a ClientHello sent in one-byte records -------------------------------------------------


class _Pieces:
    """A client (for ``_read_client_hello``) whose bytes arrive in the given pieces; its
    receive never checkpoints, so the read runs to its end in one ``send``."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces

    async def receive(self) -> bytes:
        return next(self._pieces)


def _one_byte_records(handshake_body: int) -> bytes:
    """A ClientHello handshake message of ``handshake_body`` bytes, one byte per TLS record."""
    message = b"\x01" + handshake_body.to_bytes(3, "big") + b"\0" * handshake_body
    return b"".join(b"\x16\x03\x01\x00\x01" + message[i : i + 1] for i in range(len(message)))


def _calls_to_read(wire: bytes, piece: int) -> int:
    """How many calls (Python and C) reading the ClientHello ``wire`` makes when it arrives
    ``piece`` bytes at a time: a count of work, the same on every run."""
    pieces = (wire[i : i + piece] for i in range(0, len(wire), piece))
    client: Any = _Pieces(pieces)
    coro = _read_client_hello(client, b"")
    calls = 0

    def count(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        coro.send(None)
    except StopIteration as done:
        assert done.value == wire
    else:  # pragma: no cover - the read always ends here
        raise AssertionError("the ClientHello read waited")
    finally:
        sys.setprofile(None)
    return calls


def test_a_client_hello_dribbled_in_one_byte_records_costs_work_linear_in_its_bytes() -> None:
    """Before the peer is known it may send its ClientHello (up to 64 KiB) as one-byte TLS
    records, a record at a time: Waypoint must not look at every record again for each piece
    (that was quadratic: one such connection kept the event loop busy for the whole
    handshake timeout, and a few stalled every other client's handshake)."""
    small = _calls_to_read(_one_byte_records(150), piece=6)
    large = _calls_to_read(_one_byte_records(600), piece=6)
    # Four times the bytes: about four times the work (it was sixteen).
    assert large <= 6 * small, (small, large)



def test_a_client_hello_read_in_pieces_of_any_size_ends_where_it_ends_in_one() -> None:
    hello = tls_client_hello(alpn=("postgresql",))
    assert client_hello_length(hello) == len(hello)
    for piece in range(1, 12):
        assert _calls_to_read(hello, piece) > 0  # the read returned the whole hello
        scanner = ClientHelloScanner()
        found = [scanner.feed(hello[i : i + piece]) for i in range(0, len(hello), piece)]
        assert found[-1] == len(hello) and set(found[:-1]) <= {None}, piece
    # A record that is not a handshake is refused when its header arrives, in whatever
    # pieces the records before it came.
    wire = _one_byte_records(10)[:18] + b"\x17\x03\x03\x00\x01"
    scanner = ClientHelloScanner()
    assert [scanner.feed(wire[i : i + 4]) for i in range(0, 20, 4)] == [None] * 5
    with pytest.raises(ClientHelloError, match="not a TLS handshake record"):
        scanner.feed(wire[20:])


# -- two instances sharing Redis -----------------------------------------------------------


@contextlib.asynccontextmanager
async def _two_instances(
    cluster: PgCluster, tmp_path: Path, space: KeySpace, certs: CertFiles, *, total: int
) -> AsyncIterator[tuple[LocalAPIStandin, Running, Running]]:
    """Two instances in this process sharing the Redis key space ``space``, client TLS
    optional, ``max_conns_total = total``."""
    async with run_standin(tmp_path) as standin:
        text = make_config_text(
            cluster,
            socket_path=standin.socket_path,
            tables_extra=f"{space.toml()}\n[defaults.limits]\nmax_conns_total = {total}\n",
            tls_mode="optional",
            listener_extra=certs.listener_extra(),
        )
        config = load_config_text(text, source="attacks.toml")
        async with run_waypoint(config) as a, run_waypoint(config) as b:
            yield standin, a, b


async def _login(
    running: Running, db: str, source: str, *, user: str = "anyone"
) -> trio.SocketStream | dict[str, str]:
    """A raw login through ``running`` from ``source``: the open stream once ReadyForQuery
    came, or the fields of the ErrorResponse that refused it (the stream closed)."""
    stream = await trio.open_tcp_stream(*running.address(LISTENER), local_address=source)
    reader = MessageReader()
    try:
        await stream.send_all(build_startup_message({"user": user, "database": db}))
        while True:
            msg = reader.next_message()
            if msg is None:
                data = await stream.receive_some(65536)
                if not data:
                    raise AssertionError("closed without a word")
                reader.feed(data)
            elif msg.type == b"E":
                await stream.aclose()
                return error_fields(msg.body)
            elif msg.type == b"Z":
                return stream
    except BaseException:
        await stream.aclose()
        raise


def _reset_socket(address: tuple[str, int], source: str, data: bytes) -> None:
    """Connect from ``source``, send ``data``, and reset the connection at once (RST)."""
    with socket.create_connection(address, timeout=10, source_address=(source, 0)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(data)


async def _usage(running: Running, principal: str) -> tuple[int, int]:
    usage = await running.contexts[LISTENER].state.slot_usage(principal, LISTENER)
    return usage.user, usage.total


def _counted_in_redis(space: KeySpace) -> dict[str, int]:
    """Every slot count Redis holds under ``space`` (by key), whichever instance wrote it."""
    client = space.client()
    try:
        counts: dict[str, int] = {}
        for key in client.scan_iter(match=space.prefix + "slots:*", count=500):
            fields = client.hgetall(key)
            n = sum(int(v) for f, v in fields.items() if f.startswith(b"c:"))
            if n:
                counts[key.decode()] = n
        return counts
    finally:
        client.close()


VICTIM, ATTACKER, BYSTANDER, NEWCOMER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
VICTIM_LOGIN = "victim@example.com"


async def test_bursts_through_two_instances_get_exactly_the_limits_and_dead_setups_give_back_their_slots(
    pg: PgCluster, tmp_path: Path, redis_space: KeySpace
) -> None:
    """Concurrent logins alternating between two instances that share Redis: a user gets
    exactly its ``max_conns``, the deployment exactly ``max_conns_total``; a caller with the
    weakest grant naming the victim in its startup packet spends its own budget, never the
    victim's. Connections that die during their setup (mid-startup, mid-TLS, reset while
    their backend is provisioned and logged in, refused by the backend) hold nothing
    afterwards: the counts in Redis go back to zero and the victim gets its N again."""
    db = create_app_database(pg)
    n_victim, total, n_newcomer = 3, 5, 4
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(120), capture_logs() as logs:
        async with _two_instances(pg, tmp_path, redis_space, certs, total=total) as (
            standin,
            a,
            b,
        ):
            readonly = {db: {"permissions": ["readonly"]}}
            standin.set_peer(
                VICTIM, login=VICTIM_LOGIN, node="victim-laptop",
                rules=[db_rule(readonly, limits={"max_conns": n_victim})],
            )
            standin.set_peer(
                ATTACKER, login="mallory@example.com", node="mallory-laptop",
                rules=[db_rule(readonly, limits={"max_conns": 1})],
            )
            standin.set_peer(
                BYSTANDER, login="bob@example.com", node="bob-laptop", rules=[db_rule(readonly)]
            )
            standin.set_peer(
                NEWCOMER, login="new@example.com", node="new-laptop",
                rules=[
                    db_rule({"*": {"permissions": ["readonly"]}}, limits={"max_conns": n_newcomer})
                ],
            )
            instances = (a, b)
            held: dict[str, list[trio.SocketStream]] = defaultdict(list)
            refused: dict[str, list[str]] = defaultdict(list)

            async def attempt(i: int, who: str, source: str, user: str) -> None:
                got = await _login(instances[i % 2], db, source, user=user)
                if isinstance(got, dict):
                    refused[who].append(got["C"])
                else:
                    held[who].append(got)

            try:
                # 1. One burst: 8 of the victim, 4 of the attacker (as the victim), 6 others.
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(attempt, i, "victim", VICTIM, "anyone")
                    for i in range(4):
                        nursery.start_soon(attempt, i, "attacker", ATTACKER, VICTIM_LOGIN)
                    for i in range(6):
                        nursery.start_soon(attempt, i, "bystander", BYSTANDER, "anyone")
                granted = {who: len(streams) for who, streams in held.items()}
                assert sum(granted.values()) == total, (granted, dict(refused))
                assert granted.get("victim", 0) <= n_victim, granted
                assert granted.get("attacker", 0) <= 1, granted
                assert {c for codes in refused.values() for c in codes} == {"53300"}, refused
                for running in instances:
                    assert await _usage(running, VICTIM_LOGIN) == (granted.get("victim", 0), total)
                    assert await _usage(running, "mallory@example.com") == (
                        granted.get("attacker", 0),
                        total,
                    )
            finally:
                for streams in held.values():
                    for stream in streams:
                        await stream.aclose()
                held.clear()
            await _wait_counted(instances, redis_space, 0)

            # 2. The victim alone, in a burst: exactly N, through either instance.
            refused.clear()
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(3 * n_victim):
                        nursery.start_soon(attempt, i, "victim", VICTIM, "anyone")
                assert len(held["victim"]) == n_victim, dict(refused)
                assert refused["victim"] == ["53300"] * (2 * n_victim)
            finally:
                for stream in held.pop("victim", []):
                    await stream.aclose()

            # 3. Setups that die before a slot: mid-startup, mid-TLS, reset at once.
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(_die_early, instances[i % 2], i % 4, db)
            await _wait_counted(instances, redis_space, 0)

            # 4. Setups that die holding a slot: the newcomer's role is provisioned while the
            #    test holds the group lock its provision needs, so each session waits there
            #    with its slot; the clients reset; then the lock goes and every session logs
            #    its backend in and finds its client gone.
            await _die_while_provisioned(pg, instances, db, n_newcomer)
            await _wait_counted(instances, redis_space, 0)
            # And refused by the backend after the slot was taken (3D000, forwarded).
            async with trio.open_nursery() as nursery:
                for i in range(n_newcomer):
                    nursery.start_soon(_refused_by_backend, instances[i % 2])
            await _wait_counted(instances, redis_space, 0)

            # 5. The victim gets its N again, through both instances.
            try:
                for i in range(n_victim):
                    got = await _login(instances[i % 2], db, VICTIM)
                    assert not isinstance(got, dict), got
                    held["victim"].append(got)
                for running in instances:
                    got = await _login(running, db, VICTIM)
                    assert isinstance(got, dict) and got["C"] == "53300", got
            finally:
                for stream in held.pop("victim", []):
                    await stream.aclose()
            await _wait_counted(instances, redis_space, 0)
    assert logs.events("session_internal_error") == []


async def _wait_counted(instances: tuple[Running, ...], space: KeySpace, expected: int) -> None:
    """Until every instance sees ``expected`` slots in all, and Redis holds that many."""
    with trio.move_on_after(20):
        while True:
            seen = [(await _usage(r, VICTIM_LOGIN))[1] for r in instances]
            in_redis = await trio.to_thread.run_sync(_counted_in_redis, space)
            total_key = space.prefix + "slots:total"
            if seen == [expected] * len(instances) and in_redis.get(total_key, 0) == expected:
                if expected == 0:
                    assert in_redis == {}, in_redis
                return
            await trio.sleep(0.05)
    raise AssertionError(f"slots counted: {seen}, in Redis {in_redis}")


async def _die_early(running: Running, how: int, db: str) -> None:
    """A connection that ends before it could hold a slot: after half a startup packet, after
    half a ClientHello, after the server's first TLS flight, or reset right after a whole
    startup packet."""
    address = running.address(LISTENER)
    if how == 3:
        startup = build_startup_message({"user": "anyone", "database": db})
        await trio.to_thread.run_sync(_reset_socket, address, BYSTANDER, startup)
        return
    stream = await trio.open_tcp_stream(*address, local_address=BYSTANDER)
    async with stream:
        if how == 0:
            await stream.send_all(build_startup_message({"user": "x", "database": db})[:9])
            return
        hello = tls_client_hello(alpn=("postgresql",))
        await stream.send_all(SSL_REQUEST)
        assert await stream.receive_some(1) == b"S"
        if how == 1:
            await stream.send_all(hello[: len(hello) // 2])
            return
        await stream.send_all(hello)
        assert await stream.receive_some(65536)


async def _die_while_provisioned(
    cluster: PgCluster, instances: tuple[Running, ...], db: str, count: int
) -> None:
    """``count`` sessions of the newcomer (alternating instances) wait in their provision
    with a slot each, their clients reset, then the provision goes on."""
    admin = cluster.connect(user=cluster.admin_user, dbname="postgres")
    key = group_lock_key(db, "public")
    admin.run(f"SELECT pg_advisory_lock({GROUP_LOCK_CLASS}, {key})")
    socks: list[socket.socket] = []
    try:
        startup = build_startup_message({"user": "anyone", "database": db})
        for i in range(count):
            address = instances[i % 2].address(LISTENER)
            sock = socket.create_connection(address, timeout=10, source_address=(NEWCOMER, 0))
            socks.append(sock)
            sock.sendall(startup)
        with trio.fail_after(20):
            while (await _usage(instances[0], "new@example.com"))[0] != count:
                await trio.sleep(0.02)
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    finally:
        for sock in socks:
            sock.close()
        admin.run(f"SELECT pg_advisory_unlock({GROUP_LOCK_CLASS}, {key})")
        admin.close()


async def _refused_by_backend(running: Running) -> None:
    """The newcomer's grant covers any database: one that does not exist is the backend's
    refusal, after the slot was taken."""
    got = await _login(running, "no_such_database", NEWCOMER)
    assert isinstance(got, dict) and got["C"] == "3D000", got


# -- stalled TLS handshakes ----------------------------------------------------------------

STALLER = "127.0.0.66"
HANDSHAKE = 1.0


def _client_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["postgresql"])
    return context


async def _until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the server sends until it closes (EOF, reset, or a broken TLS session)."""
    got = bytearray()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await stream.receive_some(65536):
            got += data
    return bytes(got)


async def _stall(address: tuple[str, int], how: str, closed: list[str]) -> None:
    """One client that stops half-way through its TLS handshake (``how``) and waits for the
    server to close; appends ``how`` to ``closed`` when it has."""
    stream = await trio.open_tcp_stream(*address, local_address=STALLER)
    hello = tls_client_hello(alpn=("postgresql",))
    async with stream:
        if how != "direct TLS, after the server's flight":
            await stream.send_all(SSL_REQUEST)
            assert await stream.receive_some(1) == b"S"
        if how == "after S":
            pass
        elif how == "half a ClientHello":
            await stream.send_all(hello[: len(hello) // 2])
        elif how in ("after the server's flight", "direct TLS, after the server's flight"):
            await stream.send_all(hello)
            assert await stream.receive_some(65536)
        elif how == "a ClientHello dribbled in one-byte records":
            message = hello[5:]  # the handshake message, resent one byte per record

            async def dribble() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for i in range(len(message)):
                        await stream.send_all(b"\x16\x03\x01\x00\x01" + message[i : i + 1])
                        await trio.sleep(HANDSHAKE / 20)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(dribble)
                await _until_closed(stream)
                nursery.cancel_scope.cancel()
            closed.append(how)
            return
        elif how == "TLS done, no startup":
            tls = trio.SSLStream(stream, _client_tls(), server_hostname="localhost")
            await tls.do_handshake()
            assert await _until_closed(tls) == b""
            closed.append(how)
            return
        else:  # pragma: no cover
            raise AssertionError(how)
        assert await _until_closed(stream) == b""
    closed.append(how)


STALLS = (
    "after S",
    "half a ClientHello",
    "after the server's flight",
    "direct TLS, after the server's flight",
    "a ClientHello dribbled in one-byte records",
    "TLS done, no startup",
)


async def test_stalled_tls_handshakes_block_nobody_hold_nothing_and_end_at_the_timeout(
    pg: PgCluster, tmp_path: Path
) -> None:
    """Clients that stop (or dribble) half-way through their TLS handshake: meanwhile other
    clients log in over TLS and in plaintext; each staller is closed by the handshake timeout,
    none is ever looked up or holds a slot; a second SSLRequest in place of the ClientHello
    is a close, one inside TLS a FATAL 08P01 read over TLS, and an SSLRequest whose client
    resets before the answer is a close, never an internal error."""
    db = create_app_database(pg)
    certs = make_cert_files(tmp_path / "certs")
    with trio.fail_after(90), capture_logs() as logs:
        async with hostile_client_env(pg, tmp_path, certs, db, handshake_timeout=HANDSHAKE) as env:
            await _query_plaintext(env, db)  # its role is provisioned: later logins are quick
            address = (env.host, env.port)
            closed: list[str] = []
            async with trio.open_nursery() as nursery:
                for how in STALLS * 2:
                    nursery.start_soon(_stall, address, how, closed)
                # Every staller in its handshake; then others are served meanwhile, over
                # TLS (psql) and in plaintext (pg8000).
                gate = env.running.contexts[LISTENER].admission.handshakes
                while gate.pending(STALLER) < len(STALLS) * 2:
                    await trio.sleep(0.01)
                r = await env.psql("select v from t", db, sslmode="require", binary="/usr/bin/psql")
                assert (r.returncode, r.stdout.strip()) == (0, "one"), r.stderr
                await _query_plaintext(env, db)
            assert sorted(closed) == sorted(STALLS * 2)

            # A second SSLRequest where the ClientHello belongs: closed, nothing but the S.
            reply = await raw_exchange(env.host, env.port, [SSL_REQUEST, SSL_REQUEST], source=STALLER, delay=0.2)
            assert (reply.closed, reply.data) == (True, b"S")
            # An SSLRequest inside TLS: a FATAL 08P01, read over TLS.
            assert await _ssl_request_inside_tls(address) == "08P01"
            # A client that resets right after its SSLRequest.
            for _ in range(4):
                await trio.to_thread.run_sync(_reset_socket, address, STALLER, SSL_REQUEST)
            await env.assert_clean()
            assert env.standin.whois_count(STALLER) == 0
            r = await env.psql("select v from t", db, sslmode="require", binary="/usr/bin/psql")
            assert (r.returncode, r.stdout.strip()) == (0, "one"), r.stderr
    assert logs.events("session_internal_error") == []


async def _query_plaintext(env: E2EEnv, db: str) -> None:
    conn = await env.pg8000_connect(db)
    try:
        assert await trio.to_thread.run_sync(conn.run, "SELECT v FROM t") == [["one"]]
    finally:
        await trio.to_thread.run_sync(conn.close)


async def _ssl_request_inside_tls(address: tuple[str, int]) -> str:
    stream = await trio.open_tcp_stream(*address, local_address=STALLER)
    async with stream:
        await stream.send_all(SSL_REQUEST)
        assert await stream.receive_some(1) == b"S"
        tls = trio.SSLStream(stream, _client_tls(), server_hostname="localhost")
        await tls.send_all(SSL_REQUEST)
        data = await _until_closed(tls)
    messages = parse_server_messages(data)
    assert [kind for kind, _ in messages] == ["E"], data
    return error_fields(messages[0][1])["C"]


# -- backends opened before admission -------------------------------------------------------


async def test_a_burst_from_a_peer_served_lately_opens_few_backends_before_it_is_admitted(
    pg15: PgCluster, tmp_path: Path
) -> None:
    """A peer served lately has its session's backend connection opened while its whois runs
    (the connect overlaps the lookup). A burst of connections from that peer, each of which
    may yet be refused (by its grant, its limits, a lock), must not make the server fork a
    process for every one of them before any is admitted: at most
    :data:`EARLY_PER_PEER` such connections are open for one peer at a time. The whois hangs
    here, so every connection of the burst is waiting in its lookup at once; the backend is
    a listener that records the connections it accepts."""
    admin = pg15.admin_user.encode()
    sentinel = b"sentinel"
    received: list[bytearray] = []

    async def record(stream: trio.SocketStream) -> None:
        data = bytearray()
        received.append(data)
        with trio.move_on_after(60), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                data += chunk
                if admin in data or sentinel in data:
                    break
        await stream.aclose()

    burst = 24
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, record, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(60):
            async with e2e_env(
                pg15, tmp_path, backend=f"127.0.0.1:{port}", tls_mode="off"
            ) as env:
                env.grant("127.0.0.1", {"granted": {"permissions": ["readonly"]}})
                source = env.running.contexts[LISTENER].backends
                assert isinstance(source, ConnectingSource)
                source.served("127.0.0.1")
                env.standin.set_fault("hang", "127.0.0.1")
                startup = build_startup_message({"user": "x", "database": "granted"})
                clients = []
                for _ in range(burst):
                    client = await trio.open_tcp_stream(env.host, env.port)
                    await client.send_all(startup)
                    clients.append(client)
                # Every session of the burst is in its lookup; each one that opened a
                # backend connection did so before its whois went out.
                while env.standin.whois_count("127.0.0.1") < burst:
                    await trio.sleep(0.02)
                # Connections are accepted in order: the sentinel's comes after them all.
                probe = await trio.open_tcp_stream("127.0.0.1", port)
                await probe.send_all(sentinel)
                while not any(sentinel in d for d in received):
                    await trio.sleep(0.02)
                await probe.aclose()
                early = [d for d in received if admin not in d and sentinel not in d]
                assert 1 <= len(early) <= EARLY_PER_PEER, len(early)
                assert all(d == b"" for d in early), early  # nothing sent before admission
                for client in clients:
                    await client.aclose()
        nursery.cancel_scope.cancel()
