"""The shortest end-to-end path: psql through Waypoint with a readonly grant (both versions)."""

from __future__ import annotations

from pathlib import Path

from e2e_support import create_app_database, e2e_env
from pgcluster import PgCluster


async def test_psql_readonly_select_ok_insert_denied(pg: PgCluster, tmp_path: Path) -> None:
    db = create_app_database(pg)
    async with e2e_env(pg, tmp_path) as env:
        env.grant("127.0.0.1", {db: {"permissions": ["readonly"]}}, login="alice@example.com", node="alice-laptop")
        r = await env.psql("select current_user, v from t", db)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().startswith("wp_pg_main_alice_example_com_alice_laptop_")
        assert r.stdout.strip().endswith("|one")
        r = await env.psql("insert into t values (2, 'two')", db)
        assert r.returncode != 0
        assert "permission denied for table t" in r.stderr
