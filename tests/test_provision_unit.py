"""Unit tests of provisioning without a server: SQL text, dialects, plans, single flight."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import pytest
import trio

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.errors import provisioning_failed
from waypoint.grants.model import CustomGrant, EffectiveGrant, Limits, Preset, SchemaPrivilege
from waypoint.identity.model import Identity
from waypoint.provision import sql
from waypoint.provision.dialect import CockroachDialect, PostgresDialect, detect_dialect
from waypoint.provision.engine import Credentials, Provisioner, ProvisionError
from waypoint.provision.locks import RoleLease
from waypoint.provision.plan import build_plan, grant_fingerprint

RO, RW, ADM = Preset.READONLY, Preset.READWRITE, Preset.ADMIN
ALICE = Identity(login="alice@example.com", node="alice-laptop")

# Recorded `SELECT version()` answers.
PG15_VERSION = (
    "PostgreSQL 15.14 (Debian 15.14-0+deb12u1) on x86_64-pc-linux-gnu, compiled by gcc "
    "(Debian 12.2.0-14+deb12u1) 12.2.0, 64-bit"
)
PG18_VERSION = "PostgreSQL 18.1 on x86_64-pc-linux-gnu, compiled by gcc (GCC) 13.2.0, 64-bit"
CRDB_VERSION = "CockroachDB CCL v24.1.3 (x86_64-pc-linux-gnu, built 2024/07/29 15:07:30, go1.22.5 X:nocoverageredesign)"


def grant(
    *pairs: tuple[Preset, str], custom: tuple[CustomGrant, ...] = (), db: str = "app"
) -> EffectiveGrant:
    return EffectiveGrant(
        listener="pg-main",
        database=db,
        privileges=frozenset(SchemaPrivilege(p, s) for p, s in pairs),
        custom=custom,
    )


# -- SQL text ----------------------------------------------------------------------------


def test_readonly_preset_grants_match_spec_table() -> None:
    assert sql.preset_grants(RO, "app", "g") == [
        'GRANT USAGE ON SCHEMA "app" TO "g"',
        'GRANT SELECT ON ALL TABLES IN SCHEMA "app" TO "g"',
        'GRANT SELECT ON ALL SEQUENCES IN SCHEMA "app" TO "g"',
    ]


def test_readwrite_preset_adds_dml_and_sequence_usage() -> None:
    stmts = sql.preset_grants(RW, "app", "g")
    assert stmts[:3] == sql.preset_grants(RO, "app", "g")
    assert stmts[3:] == [
        'GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "app" TO "g"',
        'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "app" TO "g"',
    ]


def test_admin_preset_grants_all_and_create() -> None:
    assert sql.preset_grants(ADM, 'Odd"Schema', "g") == [
        'GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA "Odd""Schema" TO "g"',
        'GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA "Odd""Schema" TO "g"',
        'GRANT USAGE, CREATE ON SCHEMA "Odd""Schema" TO "g"',
    ]


def test_valid_until_is_a_utc_timestamp_literal() -> None:
    ts = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert sql.timestamp_literal(ts) == "'2030-01-02 03:04:05.678901+00'"
    with pytest.raises(ValueError):
        sql.timestamp_literal(datetime(2030, 1, 1))


def test_password_statement_quotes_the_verifier_literal() -> None:
    ts = datetime(2030, 1, 1, tzinfo=UTC)
    stmt = sql.set_password("wp_r", "SCRAM-SHA-256$4096:c2FsdA==$a:b", ts)
    assert stmt == (
        "ALTER ROLE \"wp_r\" LOGIN PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b' "
        "VALID UNTIL '2030-01-01 00:00:00.000000+00'"
    )


def test_lock_keys_are_deterministic_signed_int32() -> None:
    k = sql.role_lock_key("wp_role")
    assert k == sql.role_lock_key("wp_role")
    assert -(2**31) <= k < 2**31
    assert sql.group_lock_key("app", "public") != sql.group_lock_key("public", "app")
    # NUL-separated parts: ("ab", "c") and ("a", "bc") differ.
    assert sql.lock_key("ab", "c") != sql.lock_key("a", "bc")


def test_group_locks_are_sorted_and_deduplicated() -> None:
    keys = sql.group_lock_keys("app", ["z", "a", "m", "a"])
    assert keys == sorted(keys) and len(keys) == 3
    assert set(keys) == {sql.group_lock_key("app", s) for s in "zam"}


def test_admin_membership_uses_inherit_on_16_and_later() -> None:
    assert detect_dialect(PG15_VERSION).admin_inherit_clause == ""
    assert sql.grant_role_to_admin("r", detect_dialect(PG18_VERSION).admin_inherit_clause) == (
        'GRANT "r" TO CURRENT_USER WITH INHERIT TRUE'
    )


# -- dialects (recorded version strings; no CockroachDB on this machine) --------------------


def test_dialect_detection_from_recorded_versions() -> None:
    d15 = detect_dialect(PG15_VERSION)
    d18 = detect_dialect(PG18_VERSION)
    crdb = detect_dialect(CRDB_VERSION)
    assert isinstance(d15, PostgresDialect) and d15.major == 15
    assert isinstance(d18, PostgresDialect) and d18.major == 18
    assert isinstance(crdb, CockroachDialect) and crdb.major == 24
    assert d15.has_advisory_locks and not crdb.has_advisory_locks
    assert "system.users" in crdb.role_lookup_sql
    assert crdb.refuses_for_all_roles and not d18.refuses_for_all_roles


def test_reaper_skips_cockroach_unless_told() -> None:
    crdb = detect_dialect(CRDB_VERSION)
    assert not crdb.reaper_enabled(False)
    assert crdb.reaper_enabled(True)
    assert detect_dialect(PG15_VERSION).reaper_enabled(False)


def test_unknown_server_version_is_an_error() -> None:
    with pytest.raises(ValueError, match="unrecognized server version"):
        detect_dialect("MySQL 8.0")


# -- plans and fingerprints ------------------------------------------------------------------


def test_plan_has_one_group_per_preset_schema_pair() -> None:
    plan = build_plan(
        "wp_", "wp_role", ALICE, grant((RW, "app"), (RO, "public")), PostgresDialect("", 16)
    )
    assert len(plan.groups) == 2
    assert plan.schemas == {"app", "public"}
    names = sorted(g.name for g in plan.groups)
    assert names[0].startswith("wp_grp_readonly_public_app_")
    assert names[1].startswith("wp_grp_readwrite_app_app_")


def test_plan_custom_group_renders_raw_sql_for_the_group() -> None:
    custom = CustomGrant(
        privileges=frozenset({SchemaPrivilege(RO, "public")}),
        sql=("GRANT INSERT ON audit.log TO {{.Role}}",),
    )
    plan = build_plan("wp_", "wp_role", ALICE, grant(custom=(custom,)), PostgresDialect("", 16))
    (group,) = plan.groups
    assert group.name.startswith("wp_grp_perms_")
    assert group.raw_sql == (f'GRANT INSERT ON audit.log TO "{group.name}"',)
    assert group.schemas == {"public", "audit"}


def test_fingerprint_ignores_limits_but_not_privileges() -> None:
    a = grant((RO, "public"))
    b = EffectiveGrant(
        listener="pg-main", database="app", privileges=a.privileges, limits=Limits(max_conns_user=3)
    )
    assert grant_fingerprint(a) == grant_fingerprint(b)
    assert grant_fingerprint(a) != grant_fingerprint(grant((RW, "public")))
    assert grant_fingerprint(a) != grant_fingerprint(grant((RO, "public"), db="other"))


# -- single flight (a provisioner whose admin side is faked) ---------------------------------


class FakeLocks:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.acquired = 0
        self.released = 0

    async def acquire(self, role: str, deadline: float) -> RoleLease:
        assert role not in self.held, "role lock taken twice"
        self.held.add(role)
        self.acquired += 1
        return RoleLease(role, object())

    async def try_acquire(self, role: str) -> RoleLease | None:
        if role in self.held:
            return None
        return await self.acquire(role, 0)

    async def release(self, lease: RoleLease) -> None:
        self.held.discard(lease.role)
        self.released += 1

    async def aclose(self) -> None:
        pass


class FakeProvisioner(Provisioner):
    """Replaces the admin round trips; keeps the real single-flight and cache logic."""

    def __init__(self, locks: FakeLocks, clock: list[float], delay: float = 0.05) -> None:
        lst = ListenerConfig(
            name="pg-main",
            listen="127.0.0.1:0",
            backend="127.0.0.1:1",
            postgres=PostgresListenerConfig(admin_user="a", admin_password="p", user_ttl=3600.0),
        )
        super().__init__(lst, handshake_timeout=5.0, clock=lambda: clock[0], lock_backend=locks)
        self.fake_locks = locks
        self.provisions = 0
        self.delay = delay
        self.fail_next: ProvisionError | None = None

    async def _resolve_role(self, identity: Identity, grant: EffectiveGrant) -> str:
        return self.role_for(identity, grant)

    async def _provision(
        self,
        identity: Identity,
        grant: EffectiveGrant,
        role: str,
        fingerprint: str,
        deadline: float,
        cid: str,
    ) -> tuple[Credentials, RoleLease]:
        self.provisions += 1
        lease = await self.fake_locks.acquire(role, deadline)
        try:
            await trio.sleep(self.delay)
            if self.fail_next is not None:
                err, self.fail_next = self.fail_next, None
                raise err
        except BaseException:
            await self.fake_locks.release(lease)
            raise
        secret = secrets.token_urlsafe(32)
        until = datetime.fromtimestamp(self._clock() + self._pg.user_ttl, UTC)
        return self._remember(identity, grant, role, fingerprint, secret, None, until), lease


async def test_concurrent_calls_share_one_provision_and_hold_lock_until_last_exit(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0])
    g = grant((RO, "public"))
    seen: list[str] = []
    inside = 0

    async def one() -> None:
        nonlocal inside
        async with p.credentials(ALICE, g) as c:
            inside += 1
            assert locks.held == {c.role}  # the lock covers the login
            seen.append(c.secret)
            await trio.sleep(0.01)

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(one)
    assert inside == 20
    assert p.provisions == 1 and len(set(seen)) == 1
    assert locks.acquired == 1 and locks.released == 1 and not locks.held


async def test_cached_secret_is_reused_with_no_provision_and_no_lock(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0])
    g = grant((RO, "public"))
    async with p.credentials(ALICE, g) as first:
        pass
    async with p.credentials(ALICE, g) as second:
        assert not second.provisioned and second.secret == first.secret
        assert not locks.held
    assert p.provisions == 1 and locks.acquired == 1


async def test_secret_close_to_valid_until_is_not_reused(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    clock = [1_000_000.0]
    p = FakeProvisioner(locks, clock)
    g = grant((RO, "public"))
    async with p.credentials(ALICE, g) as first:
        pass
    clock[0] += 3600.0 - 4.0  # VALID UNTIL is 4 s away, handshake_timeout is 5 s
    async with p.credentials(ALICE, g) as second:
        assert second.provisioned and second.secret != first.secret


async def test_peek_gives_cached_credentials_only_while_a_handshake_could_use_them(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    clock = [1_000_000.0]
    p = FakeProvisioner(locks, clock)
    g = grant((RO, "public"))
    alice = Provisioner.owner_of(ALICE, g)
    assert p.peek(p.role_for(ALICE, g), alice) is None  # nothing cached: no round trip either
    async with p.credentials(ALICE, g) as first:
        pass
    peeked = p.peek(first.role, alice)
    assert peeked is not None and not peeked.provisioned
    assert (peeked.role, peeked.secret) == (first.role, first.secret)
    assert first.secret not in repr(peeked)
    assert p.provisions == 1 and locks.acquired == 1  # peeking provisions and locks nothing
    # Only for the caller the secret was set for (the early login of a warm peer).
    assert p.peek(first.role, None) is None
    assert p.peek(first.role, Provisioner.owner_of(Identity("alice_x", "laptop"), g)) is None
    clock[0] += 3600.0 - 4.0  # VALID UNTIL is 4 s away, handshake_timeout is 5 s
    assert p.peek(first.role, alice) is None


async def test_grant_change_and_rotate_each_provision_again(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0])
    async with p.credentials(ALICE, grant((RO, "public"))):
        pass
    async with p.credentials(ALICE, grant((RW, "public"))) as c2:
        assert c2.provisioned
    async with p.credentials(ALICE, grant((RW, "public")), rotate=True) as c3:
        assert c3.provisioned and c3.secret != c2.secret
    assert p.provisions == 3


async def test_lock_released_when_body_raises_or_is_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0])
    g = grant((RO, "public"))
    with pytest.raises(RuntimeError):
        async with p.credentials(ALICE, g, rotate=True):
            raise RuntimeError("login failed")
    assert not locks.held
    with trio.move_on_after(0.01):
        async with p.credentials(ALICE, g, rotate=True):
            await trio.sleep_forever()
    assert not locks.held and locks.released == locks.acquired == 2


async def test_waiters_share_a_failed_provision_error(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0])
    p.fail_next = ProvisionError(provisioning_failed("cid", "boom"))
    errors: list[str] = []

    async def one() -> None:
        try:
            async with p.credentials(ALICE, grant((RO, "public"))):
                pass
        except ProvisionError as exc:
            errors.append(exc.refusal.sqlstate)

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(one)
    assert errors == ["58000"] * 5
    assert p.provisions == 1 and not locks.held


async def test_waiter_takes_over_when_leader_is_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0], delay=0.2)
    g = grant((RO, "public"))
    got: list[Credentials] = []

    async def leader() -> None:
        with trio.move_on_after(0.05):
            async with p.credentials(ALICE, g):
                pass

    async def waiter() -> None:
        await trio.sleep(0.01)
        async with p.credentials(ALICE, g) as c:
            got.append(c)

    async with trio.open_nursery() as n:
        n.start_soon(leader)
        n.start_soon(waiter)
    assert len(got) == 1 and got[0].provisioned
    assert p.provisions == 2 and not locks.held


async def test_different_roles_provision_concurrently(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0], delay=0.2)
    start = trio.current_time()

    async def one(i: int) -> None:
        async with p.credentials(Identity(login=f"u{i}", node="n"), grant((RO, "public"))):
            pass

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(one, i)
    assert p.provisions == 10
    # Virtual time (autojump): ten 0.2 s provisions side by side, not one after another
    # behind one global lock.
    assert trio.current_time() - start == pytest.approx(0.2)


async def test_extend_validity_skips_roles_with_a_running_flight(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = FakeProvisioner(locks, [1_000_000.0])
    g = grant((RO, "public"))
    role = p.role_for(ALICE, g)
    async with p.role_guard(role):
        # The in-process guard is taken: the extension must not even try the role lock.
        await p.extend_validity([role])
    assert locks.acquired == 0


class SameNameProvisioner(FakeProvisioner):
    """Every caller maps to one role name (a collision of sanitized names, before any marker
    is checked): the cache and the single flight alone must keep the callers apart."""

    async def _resolve_role(self, identity: Identity, grant: EffectiveGrant) -> str:
        return "wp_pg_main_ann_lee_x_com_pc_app"


async def test_cached_secret_and_shared_flight_never_cross_to_another_caller(autojump_clock: trio.testing.MockClock) -> None:
    locks = FakeLocks()
    p = SameNameProvisioner(locks, [1_000_000.0])
    g = grant((RO, "public"))
    dot = Identity(login="ann.lee@x.com", node="pc")
    dash = Identity(login="ann-lee@x.com", node="pc")
    got: dict[str, list[str]] = {dot.login: [], dash.login: []}

    async def one(who: Identity) -> None:
        async with p.credentials(who, g) as c:
            got[who.login].append(c.secret)

    async with trio.open_nursery() as n:  # at the same moment: no joining the other's flight
        n.start_soon(one, dot)
        n.start_soon(one, dash)
    assert p.provisions == 2
    assert not set(got[dot.login]) & set(got[dash.login])
    # The cache holds the secret of whoever provisioned last: the other one provisions anew,
    # never reuses it.
    role = "wp_pg_main_ann_lee_x_com_pc_app"
    last = dot if p.peek(role, Provisioner.owner_of(dot, g)) is not None else dash
    assert p.peek(role, Provisioner.owner_of(last, g)) is not None
    other = dash if last is dot else dot
    assert p.peek(role, Provisioner.owner_of(other, g)) is None  # no early login with it
    await one(other)
    assert p.provisions == 3
    assert got[other.login][-1] not in got[last.login]
    await one(other)  # its own cached secret
    assert p.provisions == 3
    await one(last)  # the cache now holds other's: last provisions again
    assert p.provisions == 4
    assert not set(got[dot.login]) & set(got[dash.login])
