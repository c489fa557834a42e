"""Build step for the one C extension (the relay engine's hot path); metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "waypoint.proxy.relay._pump",
            sources=["waypoint/proxy/relay/_pump.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        )
    ]
)
