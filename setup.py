"""Build step for the one C extension (the relay engine's hot path; OpenSSL's headers,
Debian libssl-dev, at build time); metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "waypoint.proxy.relay._pump",
            sources=["waypoint/proxy/relay/_pump.c"],
            depends=["waypoint/proxy/relay/_audit.h"],
            # The client TLS record layer runs on the SSL* of the session's ssl.SSLObject:
            # OpenSSL's headers at build time (Debian: libssl-dev); at run time the
            # functions of Python's own _ssl module (bound through ctypes, see _pump.c), so
            # nothing is linked.
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        )
    ]
)
