"""Waypoint's locks and databases out of every caller's reach, end to end on PostgreSQL 15 and 18.

- A readonly caller holding the advisory-lock keys Waypoint used to take in the target
  database (the group lock of ``(db, public)`` and another caller's role-lock key) does not
  delay or refuse another caller's first connection: every Waypoint lock lives in
  ``admin_database``, and advisory locks are per database.
- A ``"*"`` grant does not reach ``admin_database`` (where the locks live), ``template0`` or
  ``template1``: the client gets 42501 with the reason.
- A database name over PostgreSQL's 63-byte limit is refused (42622) instead of being
  evaluated as a name the server would cut to another database's.
- The group locks still do their work from ``admin_database``: a provision waits for one held
  there, and the reaper's transaction stops before any change when the role has objects in a
  schema whose lock it does not hold.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_support import (
    LISTENER,
    E2EEnv,
    RawSession,
    create_app_database,
    e2e_env,
    raw_exchange,
    raw_startup_packet,
)
from pgcluster import PgCluster

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.grants import naming
from waypoint.grants.model import EffectiveGrant, Preset, SchemaPrivilege
from waypoint.identity.model import Identity
from waypoint.provision import sql
from waypoint.provision.engine import Provisioner, ProvisionError
from waypoint.reaper import catalog
from waypoint.reaper import transactions as reaper_txn

ATTACKER = "127.0.0.2"
_names = itertools.count(1)
VICTIM = "127.0.0.3"


async def _open(env: E2EEnv, db: str, source: str) -> RawSession:
    return await trio.to_thread.run_sync(lambda: RawSession.open(env, db, source=source))


async def _query(session: RawSession, text: str) -> str:
    return await trio.to_thread.run_sync(lambda: session.read_result_of(text, timeout=20))


async def _refusal(env: E2EEnv, db: str, source: str) -> dict[str, str]:
    reply = await raw_exchange(
        env.host,
        env.port,
        [raw_startup_packet({"user": "anyone", "database": db})],
        source=source,
        timeout=20,
    )
    assert reply.closed and not reply.authenticated, reply.data
    fields = reply.error
    assert fields is not None, reply.data
    return fields


def _advisory_locks_held_by(cluster: PgCluster, role: str) -> set[tuple[str, int, int]]:
    rows = cluster.execute(
        "SELECT d.datname, l.classid::int, l.objid::int FROM pg_catalog.pg_locks AS l "
        "JOIN pg_catalog.pg_stat_activity AS a ON a.pid = l.pid "
        "JOIN pg_catalog.pg_database AS d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND l.granted AND a.usename = :u",
        u=role,
    )
    return {(str(r[0]), int(r[1]), int(r[2]) - (1 << 32) * (int(r[2]) >= 1 << 31)) for r in rows}


async def test_a_caller_holding_the_old_lock_keys_does_not_block_another_callers_first_connection(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    with trio.fail_after(90):
        # lock_timeout of admin sessions: 3 s here; the old code failed the victim with 58000.
        async with e2e_env(pg, tmp_path, handshake_timeout="6s") as env:
            env.grant(ATTACKER, {db: {"permissions": ["readonly"]}})
            env.grant(VICTIM, {db: {"permissions": ["readonly"]}})
            prefix = env.config.listeners[0].postgres.user_prefix
            victim_role = naming.role_name(
                prefix, LISTENER, "user3@example.com", "node3", db, None
            )
            attacker = await _open(env, db, ATTACKER)
            try:
                attacker_role = (await _query(attacker, "select current_user")).removeprefix("ok:")
                keys = [
                    (sql.GROUP_LOCK_CLASS, sql.group_lock_key(db, "public")),
                    (sql.ROLE_LOCK_CLASS, sql.role_lock_key(victim_role)),
                ]
                for cls, key in keys:
                    got = await _query(attacker, f"select pg_advisory_lock({cls}, {key})")
                    assert got == "ok:", got
                assert _advisory_locks_held_by(pg, attacker_role) == {
                    (db, cls, key) for cls, key in keys
                }

                victim = await _open(env, db, VICTIM)
                try:
                    assert await _query(victim, "select current_user") == f"ok:{victim_role}"
                    assert await _query(victim, "select v from t") == "ok:one"
                finally:
                    victim.close()
            finally:
                attacker.close()


async def test_a_wildcard_grant_never_reaches_the_admin_or_template_databases(
    pg: PgCluster, tmp_path: Path
) -> None:
    db = create_app_database(pg)
    with trio.fail_after(90):
        async with e2e_env(pg, tmp_path, handshake_timeout="6s") as env:
            env.grant(ATTACKER, {"*": {"permissions": ["readonly"]}})
            env.grant(VICTIM, {db: {"permissions": ["readonly"]}})
            admin_db = env.config.listeners[0].postgres.admin_database
            for reserved in (admin_db, "template1", "template0"):
                fields = await _refusal(env, reserved, ATTACKER)
                assert fields["C"] == "42501", fields
                assert "reserves and never grants" in fields["M"], fields
            # Named explicitly by a grant: the same refusal.
            env.grant(ATTACKER, {admin_db: {"permissions": ["readonly"]}})
            fields = await _refusal(env, admin_db, ATTACKER)
            assert fields["C"] == "42501", fields
            # The wildcard still reaches an ordinary database, and the victim is unaffected.
            env.grant(ATTACKER, {"*": {"permissions": ["readonly"]}})
            attacker = await _open(env, db, ATTACKER)
            attacker.close()
            victim = await _open(env, db, VICTIM)
            try:
                assert await _query(victim, "select v from t") == "ok:one"
            finally:
                victim.close()
            prefix = env.config.listeners[0].postgres.user_prefix
            rows = pg.execute(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity "
                "WHERE datname = ANY(:dbs) AND starts_with(usename, :p)",
                dbs=[admin_db, "template1"],
                p=prefix,
            )
            assert rows[0][0] == 0


async def test_a_database_name_over_63_bytes_is_refused_not_truncated_into_another_grant(
    pg: PgCluster, tmp_path: Path
) -> None:
    long_name = f"long{os.getpid()}_{next(_names)}_" + "x" * 63
    long_name = create_app_database(pg, long_name.encode()[:63].decode())
    try:
        with trio.fail_after(90):
            async with e2e_env(pg, tmp_path) as env:
                env.grant(
                    ATTACKER,
                    {
                        long_name: {"permissions": ["readonly"]},
                        "*": {"permissions": ["readwrite"]},
                    },
                )
                # The exact name: readonly in that database.
                exact = await _open(env, long_name, ATTACKER)
                try:
                    assert await _query(exact, "select current_database()") == f"ok:{long_name}"
                    assert await _query(exact, "select v from t") == "ok:one"
                    denied = await _query(exact, "insert into t values (2, 'two')")
                    assert denied.startswith("error:42501"), denied
                finally:
                    exact.close()
                # Sixty-three bytes plus more: PostgreSQL would cut it to the same database;
                # Waypoint refuses it instead of granting readwrite there through "*".
                fields = await _refusal(env, long_name + "_x", ATTACKER)
                assert fields["C"] == "42622", fields
                assert "63 bytes" in fields["M"], fields
    finally:
        pg.drop_database(long_name)


# -- the group locks still serialize Waypoint's own work, now in admin_database ---------------


async def test_a_group_lock_held_in_admin_database_holds_back_a_provision_until_released(
    pg: PgCluster,
) -> None:
    """Another Waypoint instance (here: a plain admin session) holding the group lock of
    ``(db, public)`` in ``admin_database`` makes a provision that grants on ``public`` wait;
    past its deadline it fails with 58000, and once the lock is released it succeeds."""
    db = create_app_database(pg)
    lst = ListenerConfig(
        name=LISTENER,
        listen="127.0.0.1:0",
        backend=f"{pg.host}:{pg.port}",
        backend_tls="disable",
        postgres=PostgresListenerConfig(
            admin_user=pg.admin_user, admin_password=pg.admin_password
        ),
    )
    other = pg.connect(user=pg.admin_user, dbname=lst.postgres.admin_database)
    key = sql.group_lock_key(db, "public")
    grant = EffectiveGrant(
        listener=LISTENER,
        database=db,
        privileges=frozenset({SchemaPrivilege(Preset.READONLY, "public")}),
    )
    alice = Identity(login="alice@example.com", node="laptop")
    prov = Provisioner(lst, handshake_timeout=2.0)
    try:
        other.run(f"SELECT pg_advisory_lock({sql.GROUP_LOCK_CLASS}, {key})")
        with trio.fail_after(30):
            with pytest.raises(ProvisionError) as info:
                async with prov.credentials(alice, grant):
                    pass
            assert info.value.refusal.sqlstate == "58000"
            assert "timed out" in info.value.refusal.detail
            other.run(f"SELECT pg_advisory_unlock({sql.GROUP_LOCK_CLASS}, {key})")
            async with prov.credentials(alice, grant) as creds:
                assert creds.provisioned
    finally:
        other.close()
        await prov.aclose()


class _CatalogSession:
    """Answers the reaper's dependent-schemas query; records every statement."""

    def __init__(self, schemas: list[str]) -> None:
        self.schemas = schemas
        self.statements: list[str] = []

    def run(self, text: str, **params: Any) -> list[list[Any]]:
        self.statements.append(text)
        if text == catalog.DEPENDENT_SCHEMAS_QUERY:
            return [[s] for s in self.schemas]
        return []


def test_a_reap_transaction_touching_a_schema_it_has_not_locked_stops_before_any_change() -> None:
    sess = _CatalogSession(["public", "app"])
    checked: list[object] = []

    def drop(locked: set[str]) -> None:
        reaper_txn.drop_txn(
            sess,  # type: ignore[arg-type]
            "wp_r",
            database="appdb",
            reassign_to=None,
            locked=locked,
            check=checked.append,
            drop_role=False,
            inherit_clause="",
        )

    with pytest.raises(reaper_txn.MoreSchemas) as info:
        drop({"public"})
    assert info.value.schemas == {"public", "app"}
    assert checked == [] and sess.statements == ["BEGIN", catalog.DEPENDENT_SCHEMAS_QUERY]

    drop({"public", "app"})
    assert checked == [sess]
    assert sess.statements[-1] == "COMMIT"
