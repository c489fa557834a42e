"""Integration tests of the provisioning engine on throwaway PostgreSQL 15 and 18 clusters.

The admin is the clusters' NON-superuser ``waypoint_admin`` (CREATEROLE). Schemas and
tables belong to ``app_owner``, of which the admin is a member (docs/admin-privileges.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pg8000.native
import pytest
import test_reaper_pg
import trio
from fixtures_pg import PrivatePg
from pg8000.exceptions import DatabaseError
from pgcluster import PgCluster
from provision_support import (
    connect_as,
    role_exists,
    role_marker_login,
    run_as,
    setup_app_db,
    sqlstate,
)

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.grants import naming
from waypoint.grants.model import CustomGrant, EffectiveGrant, Preset, SchemaPrivilege
from waypoint.identity.model import Identity
from waypoint.provision.engine import Credentials, DatabaseMissing, Provisioner, ProvisionError

RO, RW, ADM = Preset.READONLY, Preset.READWRITE, Preset.ADMIN
ALICE = Identity(login="alice@example.com", node="alice-laptop")


def listener_for(pg: PgCluster, **pgopts: Any) -> ListenerConfig:
    return ListenerConfig(
        name="pg-main",
        listen="127.0.0.1:0",
        backend=f"{pg.host}:{pg.port}",
        backend_tls="disable",
        postgres=PostgresListenerConfig(
            admin_user=pg.admin_user, admin_password=pg.admin_password, **pgopts
        ),
    )


def grant(
    db: str, *pairs: tuple[Preset, str], custom: tuple[CustomGrant, ...] = ()
) -> EffectiveGrant:
    return EffectiveGrant(
        listener="pg-main",
        database=db,
        privileges=frozenset(SchemaPrivilege(p, s) for p, s in pairs),
        custom=custom,
    )


app_db = test_reaper_pg.app_db


@pytest.fixture
async def prov(pg: PgCluster) -> AsyncIterator[Provisioner]:
    p = Provisioner(listener_for(pg), handshake_timeout=15.0)
    try:
        yield p
    finally:
        await p.aclose()


async def login(pg: PgCluster, creds: Credentials, db: str) -> pg8000.native.Connection:
    return await trio.to_thread.run_sync(connect_as, pg, creds, db)


async def assert_denied(pg: PgCluster, creds: Credentials, db: str, sql: str) -> None:
    with pytest.raises(DatabaseError) as info:
        await run_as(pg, creds, db, sql)
    assert sqlstate(info.value) == "42501", info.value


# -- role lifecycle -------------------------------------------------------------------


async def test_new_role_logs_in_and_is_current_user(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"))
    with trio.fail_after(30):
        async with prov.credentials(ALICE, g) as creds:
            assert creds.provisioned
            assert creds.scram_keys is not None
            assert creds.role == prov.role_for(ALICE, g)
            assert creds.role.startswith("wp_pg_main_alice_example_com_alice_laptop_")
            rows = await run_as(pg, creds, app_db, "SELECT current_user, count(*) FROM public.t")
    assert rows == [[creds.role, 1]]
    assert creds.secret not in repr(creds)
    (comment,) = pg.execute(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = :r", r=creds.role
    )[0]
    owner = naming.parse_role_comment(comment)
    assert owner is not None and owner.login == ALICE.login and owner.database == app_db
    # VALID UNTIL is set (the backstop when the reaper never runs).
    assert pg.execute(
        "SELECT rolvaliduntil IS NOT NULL FROM pg_roles WHERE rolname = :r", r=creds.role
    ) == [[True]]


async def test_unchanged_grant_reuses_cached_secret_without_provisioning(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"))
    async with prov.credentials(ALICE, g) as first:
        pass
    async with prov.credentials(ALICE, g) as second:
        assert not second.provisioned
        assert second.secret == first.secret
        await run_as(pg, second, app_db, "SELECT 1")


async def test_provision_that_runs_rotates_and_old_secret_fails_28p01(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"))
    async with prov.credentials(ALICE, g) as first:
        pass
    async with prov.credentials(ALICE, g, rotate=True) as second:
        assert second.provisioned and second.secret != first.secret
        await run_as(pg, second, app_db, "SELECT 1")
    with pytest.raises(DatabaseError) as info:
        await run_as(pg, first, app_db, "SELECT 1")
    assert sqlstate(info.value) == "28P01"
    # A grant change is a provision that runs, too.
    async with prov.credentials(ALICE, grant(app_db, (RW, "public"))) as third:
        assert third.provisioned and third.secret != second.secret
    with pytest.raises(DatabaseError) as info:
        await run_as(pg, second, app_db, "SELECT 1")
    assert sqlstate(info.value) == "28P01"


async def test_another_instance_sees_no_cache_and_provisions(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"))
    other = Provisioner(listener_for(pg), handshake_timeout=15.0)
    try:
        async with prov.credentials(ALICE, g) as mine:
            pass
        async with other.credentials(ALICE, g) as theirs:
            assert theirs.provisioned and theirs.role == mine.role
        # Our cached secret is stale now: the caller retries with rotate=True after 28P01.
        async with prov.credentials(ALICE, g) as stale:
            assert not stale.provisioned
        with pytest.raises(DatabaseError):
            await run_as(pg, stale, app_db, "SELECT 1")
        async with prov.credentials(ALICE, g, rotate=True) as fresh:
            await run_as(pg, fresh, app_db, "SELECT 1")
    finally:
        await other.aclose()


# -- presets (docs/policy.md's table) --------------------------------------------------


async def test_readonly_grant_allows_select_and_denies_insert(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    async with prov.credentials(ALICE, grant(app_db, (RO, "public"))) as c:
        assert await run_as(pg, c, app_db, "SELECT v FROM public.t") == [["p"]]
        await assert_denied(pg, c, app_db, "INSERT INTO public.t (v) VALUES ('x')")
        await assert_denied(pg, c, app_db, "SELECT v FROM app.t")
        await assert_denied(pg, c, app_db, "CREATE TABLE public.mine (x int)")


async def test_readwrite_grant_allows_dml_and_denies_create(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    async with prov.credentials(ALICE, grant(app_db, (RW, "public"))) as c:
        await run_as(pg, c, app_db, "INSERT INTO public.t (v) VALUES ('x')")
        await run_as(pg, c, app_db, "UPDATE public.t SET v = 'y' WHERE v = 'x'")
        await run_as(pg, c, app_db, "DELETE FROM public.t WHERE v = 'y'")
        await assert_denied(pg, c, app_db, "TRUNCATE public.t")
        await assert_denied(pg, c, app_db, "CREATE TABLE public.mine (x int)")


async def test_admin_grant_allows_create_and_truncate(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    async with prov.credentials(ALICE, grant(app_db, (ADM, "public"))) as c:
        await run_as(pg, c, app_db, "CREATE TABLE public.mine (x int)")
        await run_as(pg, c, app_db, "TRUNCATE public.t")
        await assert_denied(pg, c, app_db, "SELECT * FROM app.t")


async def test_presets_pair_per_schema_without_leaking(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    async with prov.credentials(ALICE, grant(app_db, (RW, "app"), (RO, "public"))) as c:
        await run_as(pg, c, app_db, "INSERT INTO app.t (v) VALUES ('x')")
        assert await run_as(pg, c, app_db, "SELECT v FROM public.t") == [["p"]]
        await assert_denied(pg, c, app_db, "INSERT INTO public.t (v) VALUES ('x')")


async def test_grants_land_in_client_database_not_admin_database(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    # admin_database is "postgres"; the groups' table grants must be in app_db.
    async with prov.credentials(ALICE, grant(app_db, (RO, "public"))) as c:
        assert await run_as(pg, c, app_db, "SELECT count(*) FROM public.t") == [[1]]
    acl = pg.execute(
        "SELECT relacl::text FROM pg_class WHERE oid = 'public.t'::regclass", dbname=app_db
    )
    assert "wp_grp_readonly_public_" in acl[0][0]


async def test_table_created_after_group_setup_is_readable_on_next_provision(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"))
    async with prov.credentials(ALICE, g):
        pass
    pg.psql(
        "SET ROLE app_owner; CREATE TABLE public.later (x int); INSERT INTO public.later VALUES (7);",
        dbname=app_db,
    )
    bob = Identity(login="bob@example.com", node="bob-pc")
    async with prov.credentials(bob, g) as c:
        assert await run_as(pg, c, app_db, "SELECT x FROM public.later") == [[7]]


async def test_missing_schema_is_skipped_then_granted_once_it_exists(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"), (RO, "later"))
    async with prov.credentials(ALICE, g) as c:
        assert await run_as(pg, c, app_db, "SELECT count(*) FROM public.t") == [[1]]
    pg.psql(
        "CREATE SCHEMA later AUTHORIZATION app_owner; SET ROLE app_owner; CREATE TABLE later.x (i int);",
        dbname=app_db,
    )
    async with prov.credentials(ALICE, g, rotate=True) as c:
        assert await run_as(pg, c, app_db, "SELECT count(*) FROM later.x") == [[0]]


# -- reconcile, downgrade, ownership ---------------------------------------------------


async def test_downgrade_takes_effect_in_live_session(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    async with prov.credentials(ALICE, grant(app_db, (RW, "public"))) as c:
        conn = await login(pg, c, app_db)
    try:
        await trio.to_thread.run_sync(conn.run, "INSERT INTO public.t (v) VALUES ('before')")
        await prov.reconcile(ALICE, grant(app_db, (RO, "public")))
        with pytest.raises(DatabaseError) as info:
            await trio.to_thread.run_sync(conn.run, "INSERT INTO public.t (v) VALUES ('after')")
        assert sqlstate(info.value) == "42501"
        assert await trio.to_thread.run_sync(conn.run, "SELECT count(*) FROM public.t") == [[2]]
    finally:
        await trio.to_thread.run_sync(conn.close)
    # reconcile set a new secret and cached it: the old one no longer logs in (another
    # instance caching it provisions again), this process's next login needs no provision.
    async with prov.credentials(ALICE, grant(app_db, (RO, "public"))) as again:
        assert not again.provisioned and again.secret != c.secret
        await run_as(pg, again, app_db, "SELECT 1")
    with pytest.raises(DatabaseError) as old:
        await run_as(pg, c, app_db, "SELECT 1")
    assert sqlstate(old.value) == "28P01"


async def test_objects_created_by_role_survive_downgrade_still_its_own(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    """Never reassigned to the admin: the role keeps its objects (tests/test_ownership_pg.py
    checks what they can do afterwards)."""
    async with prov.credentials(ALICE, grant(app_db, (ADM, "public"))) as c:
        await run_as(pg, c, app_db, "CREATE TABLE public.mine (x int); INSERT INTO public.mine VALUES (1)")
    owner_q = "SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'mine'"
    assert pg.execute(owner_q, dbname=app_db) == [[c.role]]
    await prov.reconcile(ALICE, grant(app_db, (RO, "public")))
    assert pg.execute(owner_q, dbname=app_db) == [[c.role]]
    assert pg.execute("SELECT x FROM public.mine", dbname=app_db) == [[1]]


async def test_additive_change_does_not_reassign(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    async with prov.credentials(ALICE, grant(app_db, (ADM, "public"))) as c:
        await run_as(pg, c, app_db, "CREATE TABLE public.mine (x int)")
    async with prov.credentials(ALICE, grant(app_db, (ADM, "public"), (RO, "app"))) as c2:
        assert c2.provisioned
        assert await run_as(pg, c2, app_db, "SELECT v FROM app.t") == [["a"]]
    owner_q = "SELECT tableowner FROM pg_tables WHERE tablename = 'mine'"
    assert pg.execute(owner_q, dbname=app_db) == [[c.role]]


async def test_collision_of_sanitized_logins_gives_two_roles(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    dot = Identity(login="john.doe@x", node="laptop")
    under = Identity(login="john_doe@x", node="laptop")
    g = grant(app_db, (RO, "public"))
    async with prov.credentials(dot, g) as a:
        pass
    async with prov.credentials(under, g) as b:
        pass
    assert a.role != b.role
    assert prov.role_for(under, g) == b.role
    await run_as(pg, a, app_db, "SELECT 1")
    await run_as(pg, b, app_db, "SELECT 1")
    comments = {
        r[0]: naming.parse_role_comment(r[1])
        for r in pg.execute(
            "SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
            "WHERE rolname = ANY(CAST(:n AS text[]))",
            n=[a.role, b.role],
        )
    }
    assert comments[a.role].login == "john.doe@x"  # type: ignore[union-attr]
    assert comments[b.role].login == "john_doe@x"  # type: ignore[union-attr]


async def test_role_with_prefix_but_without_marker_is_never_altered(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    mallory = Identity(login="mallory@example.com", node="box")
    g = grant(app_db, (RO, "public"))
    squatter = prov.role_for(mallory, g)
    pg.execute(f"CREATE ROLE {pg8000.native.identifier(squatter)} LOGIN PASSWORD 'keepme'")
    before = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = :r", r=squatter)
    async with prov.credentials(mallory, g) as c:
        assert c.role != squatter
        await run_as(pg, c, app_db, "SELECT 1")
    after = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = :r", r=squatter)
    assert before == after
    members = pg.execute(
        "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = :r",
        r=squatter,
    )
    assert members == [[0]]


async def test_nonexistent_database_raises_database_missing_and_creates_nothing(
    pg: PgCluster, prov: Provisioner
) -> None:
    g = grant("no_such_db_here", (RO, "public"))
    with pytest.raises(DatabaseMissing) as info:
        async with prov.credentials(ALICE, g):
            pytest.fail("no credentials expected")
    assert info.value.fields["C"] == "3D000"
    assert info.value.refusal.sqlstate == "3D000"
    assert not role_exists(pg, prov.role_for(ALICE, g))


async def test_raw_sql_grant_runs_in_private_group_and_revoke_carves_hole(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    custom = CustomGrant(
        privileges=frozenset({SchemaPrivilege(RW, "public")}),
        sql=(
            "GRANT USAGE ON SCHEMA app TO {{.Role}}",
            "GRANT SELECT ON app.t TO {{.Role}}",
            "REVOKE DELETE ON public.t FROM {{.Role}}",
            "GRANT TEMPORARY ON DATABASE {{.Database}} TO {{.Role}}",
        ),
    )
    async with prov.credentials(ALICE, grant(app_db, custom=(custom,))) as c:
        assert await run_as(pg, c, app_db, "SELECT v FROM app.t") == [["a"]]
        await run_as(pg, c, app_db, "INSERT INTO public.t (v) VALUES ('x')")
        await assert_denied(pg, c, app_db, "DELETE FROM public.t")
        await assert_denied(pg, c, app_db, "INSERT INTO app.t (v) VALUES ('x')")


async def test_refused_raw_sql_is_a_grant_error_and_touches_nothing(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    custom = CustomGrant(privileges=frozenset(), sql=("GRANT SELECT ON public.t TO PUBLIC",))
    g = grant(app_db, custom=(custom,))
    with pytest.raises(ProvisionError) as info:
        async with prov.credentials(ALICE, g):
            pass
    assert "PUBLIC" in info.value.refusal.message
    assert not role_exists(pg, prov.role_for(ALICE, g))


async def test_strip_removes_memberships_and_expires_role(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"))
    async with prov.credentials(ALICE, g) as c:
        pass
    await prov.strip(c.role)
    members = pg.execute(
        "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = :r",
        r=c.role,
    )
    assert members == [[0]]
    assert pg.execute(
        "SELECT rolvaliduntil <= now() FROM pg_roles WHERE rolname = :r", r=c.role
    ) == [[True]]
    with pytest.raises(DatabaseError):
        await run_as(pg, c, app_db, "SELECT 1")


async def test_extend_validity_moves_valid_until_forward(
    pg: PgCluster, app_db: str, pg_db: str
) -> None:
    now = [1_000_000.0]
    lst = listener_for(pg, user_ttl=3600.0)
    import time as _time

    now[0] = _time.time()
    p = Provisioner(lst, handshake_timeout=15.0, clock=lambda: now[0])
    try:
        async with p.credentials(ALICE, grant(app_db, (RO, "public"))) as c:
            pass
        q = "SELECT extract(epoch FROM rolvaliduntil)::float8 FROM pg_roles WHERE rolname = :r"
        first = pg.execute(q, r=c.role)[0][0]
        now[0] += 600
        await p.extend_validity([c.role, "wp_not_a_role_at_all"])
        second = pg.execute(q, r=c.role)[0][0]
        assert 599 <= second - first <= 601
    finally:
        await p.aclose()


# -- concurrency ----------------------------------------------------------------------


async def test_fifty_concurrent_connects_of_one_identity_share_one_provision(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"))
    secrets_seen: list[str] = []
    results: list[list[list[Any]]] = []

    async def one() -> None:
        async with prov.credentials(ALICE, g) as c:
            secrets_seen.append(c.secret)
            results.append(await run_as(pg, c, app_db, "SELECT current_user"))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
    assert len(results) == 50
    assert len(set(secrets_seen)) == 1


async def test_fifty_identities_concurrently_all_log_in(
    pg: PgCluster, app_db: str, prov: Provisioner
) -> None:
    g = grant(app_db, (RO, "public"), (RO, "app"))
    ok: list[str] = []

    async def one(i: int) -> None:
        ident = Identity(login=f"user{i}@example.com", node=f"node{i}")
        async with prov.credentials(ident, g) as c:
            rows = await run_as(pg, c, app_db, "SELECT current_user, count(*) FROM app.t")
            assert rows == [[c.role, 1]]
            ok.append(c.role)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert len(set(ok)) == 50


# -- secrets in the server log, md5 ------------------------------------------------------


@pytest.fixture(scope="module", params=["system", "18"], ids=["pg15", "pg18"])
def logged_pg(request: pytest.FixtureRequest, private_pg: PrivatePg) -> Iterator[PgCluster]:
    # md5 in pg_hba accepts both md5 and SCRAM verifiers; every statement is logged.
    with private_pg(request.param, log_statement="all", hba_default_method="md5") as cluster:
        yield cluster


@pytest.mark.parametrize("encryption", ["scram-sha-256", "md5"])
async def test_plaintext_secret_never_in_server_log(logged_pg: PgCluster, encryption: str) -> None:
    pg = logged_pg
    db = f"logged_{encryption.replace('-', '_')}"
    pg.create_database(db)
    setup_app_db(pg, db)
    p = Provisioner(listener_for(pg, password_encryption=encryption), handshake_timeout=15.0)
    try:
        async with p.credentials(ALICE, grant(db, (RO, "public"))) as c:
            assert (c.scram_keys is None) == (encryption == "md5")
            rows = await run_as(pg, c, db, "SELECT current_user")
            assert rows == [[c.role]]
        async with p.credentials(ALICE, grant(db, (RO, "public")), rotate=True) as c2:
            await run_as(pg, c2, db, "SELECT 1")
    finally:
        await p.aclose()
    stored = pg.execute("SELECT rolpassword FROM pg_authid WHERE rolname = :r", r=c.role)[0][0]
    assert stored.startswith("md5" if encryption == "md5" else "SCRAM-SHA-256$")
    text = pg.read_log()
    assert "ALTER ROLE" in text and "PASSWORD" in text  # the log really has the statements
    assert c.secret not in text
    assert c2.secret not in text


async def test_admin_sessions_pin_search_path_and_timeouts(pg: PgCluster) -> None:
    """The PgBouncer lesson (CVE-2025-12819, docs/design.md): admin sessions pin ``search_path`` to
    ``pg_catalog, pg_temp`` and bound every statement, whatever the server's defaults; they
    read literals with ``standard_conforming_strings`` on (a backslash is just a backslash)."""
    from waypoint.provision.admin import AdminPools

    pg.execute(f'ALTER ROLE {pg.admin_user} SET search_path = public, "$user"')
    pg.execute(f"ALTER ROLE {pg.admin_user} SET standard_conforming_strings = off")
    try:
        pools = AdminPools(
            listener_for(pg),
            limiter=trio.CapacityLimiter(2),
            connect_timeout=10,
            statement_timeout=7,
            lock_timeout=3,
        )
        try:
            rows = await pools.run(
                "postgres",
                lambda s: s.run(
                    "SELECT pg_catalog.current_setting('search_path'), "
                    "pg_catalog.current_setting('statement_timeout'), "
                    "pg_catalog.current_setting('lock_timeout'), "
                    "pg_catalog.current_setting('application_name'), "
                    "pg_catalog.current_setting('standard_conforming_strings')"
                ),
            )
        finally:
            await pools.aclose()
    finally:
        pg.execute(f"ALTER ROLE {pg.admin_user} RESET search_path")
        pg.execute(f"ALTER ROLE {pg.admin_user} RESET standard_conforming_strings")
    assert rows == [["pg_catalog,pg_temp", "7s", "3s", "waypoint-admin", "on"]]


# -- one caller never gets another caller's role ---------------------------------------------


async def _whoami(pg: PgCluster, creds: Credentials, db: str) -> str:
    rows = await run_as(pg, creds, db, "SELECT current_user")
    return str(rows[0][0])


def _drop_role(pg: PgCluster, role: str) -> None:
    """What a reaper (of this or another instance) does to an expired role."""
    pg.execute(f"DROP ROLE IF EXISTS {pg8000.native.identifier(role)}")


async def _assert_own_role(pg: PgCluster, creds: Credentials, who: Identity, db: str) -> None:
    assert role_marker_login(pg, creds.role) == who.login
    assert await _whoami(pg, creds, db) == creds.role


async def _connect_like_a_session(
    pg: PgCluster, prov: Provisioner, who: Identity, g: EffectiveGrant, db: str
) -> Credentials:
    """What the proxy session does: log in with the credentials; a cached secret the server
    no longer accepts (28P01: another instance changed the role) means one more provision.
    Asserts the login lands in a role whose marker names ``who``."""
    rotate = False
    while True:
        async with prov.credentials(who, g, rotate=rotate) as c:
            try:
                assert await _whoami(pg, c, db) == c.role
            except DatabaseError as exc:
                if sqlstate(exc) == "28P01" and not rotate and not c.provisioned:
                    rotate = True
                    continue
                raise
            assert role_marker_login(pg, c.role) == who.login
            return c


@pytest.mark.parametrize("instances", [1, 2], ids=["one_instance", "two_instances"])
async def test_reaped_name_taken_by_lookalike_never_hands_its_role_back(
    pg: PgCluster, app_db: str, instances: int
) -> None:
    dot = Identity(login="mary.sue@example.com", node="pc")
    under = Identity(login="mary_sue@example.com", node="pc")
    g = grant(app_db, (RO, "public"))
    first = Provisioner(listener_for(pg), handshake_timeout=15.0)
    second = first if instances == 1 else Provisioner(listener_for(pg), handshake_timeout=15.0)
    try:
        async with first.credentials(dot, g) as a:
            await _assert_own_role(pg, a, dot, app_db)
        _drop_role(pg, a.role)  # reaped (the cache of ``first`` is not told)
        async with second.credentials(under, g) as b:
            await _assert_own_role(pg, b, under, app_db)
        assert b.role == a.role  # the name was free again: the look-alike got it
        for _ in range(2):  # what the first answer left behind, then a cache hit
            c = await _connect_like_a_session(pg, first, dot, g, app_db)
            assert c.role != b.role
            assert c.secret != b.secret
            # No early login (a warm peer's) with the other caller's secret either.
            assert first.peek(b.role, Provisioner.owner_of(dot, g)) is None
        d = await _connect_like_a_session(pg, second, under, g, app_db)
        assert d.role == b.role
        assert role_marker_login(pg, b.role) == under.login
    finally:
        await first.aclose()
        if second is not first:
            await second.aclose()


async def _race_once(
    pg: PgCluster, db: str, provs: tuple[Provisioner, Provisioner], who: tuple[Identity, Identity]
) -> tuple[str, str]:
    g = grant(db, (RO, "public"))
    got: dict[str, Credentials] = {}
    start = trio.Event()

    async def one(p: Provisioner, ident: Identity) -> None:
        await start.wait()
        async with p.credentials(ident, g) as c:
            got[ident.login] = c
            await _assert_own_role(pg, c, ident, db)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, provs[0], who[0])
            nursery.start_soon(one, provs[1], who[1])
            await trio.sleep(0)
            start.set()
    a, b = got[who[0].login], got[who[1].login]
    assert a.role != b.role
    assert role_marker_login(pg, a.role) == who[0].login
    assert role_marker_login(pg, b.role) == who[1].login
    return a.role, b.role


async def _lookalike_races(pg: PgCluster, db: str, instances: int, iterations: int) -> None:
    who = (Identity(login="ann.lee@x.com", node="pc"), Identity(login="ann-lee@x.com", node="pc"))
    for i in range(iterations):
        first = Provisioner(listener_for(pg), handshake_timeout=15.0)
        second = first if instances == 1 else Provisioner(listener_for(pg), handshake_timeout=15.0)
        order = (first, second) if i % 2 == 0 else (second, first)
        try:
            roles = await _race_once(pg, db, order, who)
            # The same processes again, with everything cached: still each its own.
            await _race_once(pg, db, order, who)
        finally:
            await first.aclose()
            if second is not first:
                await second.aclose()
        for role in roles:
            _drop_role(pg, role)


@pytest.mark.parametrize("instances", [1, 2], ids=["one_instance", "two_instances"])
async def test_lookalikes_connecting_at_once_get_two_roles(
    pg: PgCluster, app_db: str, instances: int
) -> None:
    await _lookalike_races(pg, app_db, instances, iterations=6)


@pytest.mark.slow
@pytest.mark.parametrize("instances", [1, 2], ids=["one_instance", "two_instances"])
async def test_lookalikes_connecting_at_once_get_two_roles_many_times(
    pg: PgCluster, app_db: str, instances: int
) -> None:
    await _lookalike_races(pg, app_db, instances, iterations=100)
