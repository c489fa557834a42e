# Recipes run inside the project's venv (./dev.sh puts it first on PATH).

default: test

# Lint, type-check and the default (not slow) test suite. CI runs exactly this via ./dev.sh test.
test *ARGS: check
    python -m pytest -m "not slow" {{ARGS}}

# ruff and mypy --strict
check:
    ruff check waypoint tests bench
    mypy

# The slow soak / load / long fuzz runs (opt-in).
slow *ARGS:
    python -m pytest -m slow {{ARGS}}

# A local demo: throwaway PostgreSQL, static identity provider, Waypoint.
demo *ARGS:
    waypoint demo {{ARGS}}

# The benchmark harness (see bench/README.md).
bench *ARGS:
    python -m bench {{ARGS}}
