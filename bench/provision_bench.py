"""Provisioning latency on a throwaway cluster: ``python -m bench.provision_bench``.

Medians (and p90) over N runs each of:

- new role: the first ``credentials()`` of a new identity (CREATE ROLE, memberships);
- cached: an unchanged grant with a valid cached secret (no admin round trip);
- rotate: a provision that runs for an existing role (``rotate=True``: ALTER ROLE PASSWORD);
- rotate + re-grant: the same after a table was created in the schema, so the group's
  schema signature changed and its ``ON ALL TABLES IN SCHEMA`` grants are re-applied;
- downgrade: ``reconcile()`` readwrite -> readonly (REASSIGN OWNED + REVOKE; timed alone).

The admin is the cluster's non-superuser CREATEROLE role; the admin database is ``postgres``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pgcluster import PgCluster

from waypoint.config.model import ListenerConfig, PostgresListenerConfig
from waypoint.grants.model import EffectiveGrant, Preset, SchemaPrivilege
from waypoint.identity.model import Identity
from waypoint.provision.engine import Provisioner

DB = "benchdb"


def grant(preset: Preset) -> EffectiveGrant:
    return EffectiveGrant(
        listener="pg-main",
        database=DB,
        privileges=frozenset({SchemaPrivilege(preset, "public")}),
    )


def setup(pg: PgCluster) -> None:
    pg.create_database(DB)
    pg.execute("CREATE ROLE app_owner NOLOGIN")
    pg.execute(f"GRANT app_owner TO {pg.admin_user}")
    pg.psql(
        "ALTER SCHEMA public OWNER TO app_owner; SET ROLE app_owner;"
        "CREATE TABLE public.t (id int);",
        dbname=DB,
    )


async def timed(n: int, fn: Callable[[int], Awaitable[None]]) -> list[float]:
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


async def bench(pg: PgCluster, n: int) -> list[tuple[str, list[float]]]:
    listener = ListenerConfig(
        name="pg-main",
        listen="127.0.0.1:0",
        backend=f"{pg.host}:{pg.port}",
        backend_tls="disable",
        postgres=PostgresListenerConfig(admin_user=pg.admin_user, admin_password=pg.admin_password),
    )
    prov = Provisioner(listener, handshake_timeout=15.0)
    alice = Identity(login="alice@example.com", node="laptop")
    ro, rw = grant(Preset.READONLY), grant(Preset.READWRITE)
    rows: list[tuple[str, list[float]]] = []
    try:
        async with prov.credentials(alice, ro):  # warm: pools, server info, groups
            pass

        async def new_role(i: int) -> None:
            async with prov.credentials(Identity(login=f"user{i}@example.com", node="n"), ro):
                pass

        async def cached(i: int) -> None:
            async with prov.credentials(alice, ro) as c:
                assert not c.provisioned

        async def rotate(i: int) -> None:
            async with prov.credentials(alice, ro, rotate=True) as c:
                assert c.provisioned

        rows.append(("new role", await timed(n, new_role)))
        rows.append(("existing, unchanged (cached)", await timed(n, cached)))
        rows.append(("existing, provision runs (rotate)", await timed(n, rotate)))

        regrant: list[float] = []
        for i in range(n):
            pg.psql(f"SET ROLE app_owner; CREATE TABLE public.t_{i} (id int);", dbname=DB)
            regrant.extend(await timed(1, rotate))
        rows.append(("rotate + schema changed (re-grant)", regrant))

        downgrade: list[float] = []
        for _ in range(n):
            await prov.reconcile(alice, rw)
            t0 = time.perf_counter()
            await prov.reconcile(alice, ro)
            downgrade.append((time.perf_counter() - t0) * 1000.0)
        rows.append(("downgrade (reconcile rw -> ro)", downgrade))
    finally:
        await prov.aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--version", choices=["system", "18"], default="system")
    args = ap.parse_args(argv)
    with PgCluster.start(args.version) as pg:
        setup(pg)
        rows = trio.run(bench, pg, args.runs)
        print(f"PostgreSQL {pg.version}, {args.runs} runs each, milliseconds")
    print(f"{'case':<38} {'median':>8} {'p90':>8} {'max':>8}")
    for name, samples in rows:
        s = sorted(samples)
        p90 = s[int(0.9 * (len(s) - 1))]
        print(f"{name:<38} {statistics.median(s):>8.3f} {p90:>8.3f} {s[-1]:>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
