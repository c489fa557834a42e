# Recipes run inside the project's venv (./dev.sh puts it first on PATH).

default: test

# Lint, type-check and the default (not slow) test suite. CI runs exactly this via ./dev.sh test.
# pytest exits 5 when no test was collected; just fails on any non-zero exit, so that fails too.
# Two pytest-xdist workers (WAYPOINT_TEST_WORKERS; 0 runs in one process): most tests wait on
# PostgreSQL, Redis or a timeout, so two share this 2-core machine well. Each worker starts its
# own clusters and Redis on free ports.
test *ARGS: check
    python -m pytest -m "not slow" -n "${WAYPOINT_TEST_WORKERS:-2}" --durations=15 {{ARGS}}

# ruff and mypy --strict (the package, and the cluster harness that bench/ and the demo share)
check:
    ruff check
    mypy
    MYPYPATH=tests mypy tests/pgcluster.py tests/fixtures_pg.py tests/test_pgcluster.py tests/test_pg_login.py

# The relay's C extension under AddressSanitizer + UndefinedBehaviorSanitizer (PYTHONMALLOC=malloc):
# a temporary sanitizer build, then tests/test_pump.py against it. CI runs it after the suite.
sanitize *ARGS:
    ./.ci/sanitize {{ARGS}}

# The slow soak / load runs, the random atheris runs and the benchmark smoke (opt-in).
slow *ARGS:
    python -m pytest -m slow {{ARGS}}

# For a scheduled (nightly) job: the default suite, then the slow one; both must pass.
scheduled *ARGS: (test ARGS) (slow ARGS)

# A local demo: throwaway PostgreSQL, static identity provider, Waypoint.
demo *ARGS:
    waypoint demo {{ARGS}}

# The benchmark harness (see bench/README.md).
bench *ARGS:
    python -m bench {{ARGS}}

# A wheel with the compiled relay extension, repaired to a manylinux tag: dist/*manylinux*.whl
# (installs with pip on a machine with no C compiler; see README "Install").
wheel:
    rm -rf dist/wheel-build
    python -m pip wheel --no-deps --wheel-dir dist/wheel-build .
    python -m auditwheel repair --wheel-dir dist dist/wheel-build/waypoint-*.whl
    rm -rf dist/wheel-build
