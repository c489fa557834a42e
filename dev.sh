#!/usr/bin/env bash
# Waypoint's one entry point on a fresh machine: sets everything up, then runs a Justfile recipe.
#   ./dev.sh test    # lint, type-check and the default test suite (what CI runs)
#   ./dev.sh demo    # a local demo: throwaway PostgreSQL, static identity, Waypoint
#   ./dev.sh bench   # the benchmark harness (slow)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${WAYPOINT_VENV:-.venv}"
PY="${PYTHON:-python3}"

need_apt=()
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v pgbench >/dev/null 2>&1 || need_apt+=(postgresql-contrib)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing system packages: ${need_apt[*]} (install them with apt-get as root)" >&2
  fi
fi

stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e '.[dev,bench]' rust-just 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c 'import waypoint, trio, pg8000, scramp, pglast, psycopg, just' 2>/dev/null \
    || "$VENV/bin/python" -c 'import waypoint, trio, pg8000, scramp, pglast, psycopg'
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
exec just "${@:-test}"
