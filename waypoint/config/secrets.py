"""Secrets read from files: ``admin_password_file`` and ``[state] url_file``,
``password_file``, ``sentinel_password_file``.

A secret key ``K`` of the configuration may instead be given as ``K_file``, the path of a file
holding the value (a systemd credential under ``${CREDENTIALS_DIRECTORY}``, a container secret
mount, a file written by a secrets manager). :func:`resolve_secret_files` runs on the plain
TOML data before it is structured, so every load of the configuration reads the files again:
a configuration reloaded after a rotation sees the new value.

Rules (docs/configuration.md, "Secrets from files"):

- the path goes through ``${VAR}`` expansion like every string; a relative path is relative
  to the working directory;
- the file must be a regular file (symbolic links are followed, as Kubernetes secret volumes
  use them) that neither group nor others may access (mode 0600 or 0400): a secret other
  users can read is refused with a message saying so;
- trailing line breaks are removed (``echo pw > file`` works); an empty value, a value that is
  not UTF-8 or holds a NUL byte, or a file over 64 KiB is refused;
- ``K`` and ``K_file`` together are a configuration error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any

from waypoint.config.keys import KeyPath

__all__ = [
    "FILE_KEYS",
    "MAX_SECRET_FILE_BYTES",
    "SecretFileError",
    "read_secret_file",
    "resolve_secret_files",
]

#: Secret key → the key naming a file that holds it.
FILE_KEYS: dict[str, str] = {
    "admin_password": "admin_password_file",
    "url": "url_file",
    "password": "password_file",  # [state], with sentinels or cluster
    "sentinel_password": "sentinel_password_file",
}

MAX_SECRET_FILE_BYTES = 64 * 1024


class SecretFileError(ValueError):
    """A secret file cannot be used; the message says why (never the file's content)."""


def read_secret_file(path: str) -> str:
    """The secret held in the file at ``path``. Raises :class:`SecretFileError`."""
    if not path:
        raise SecretFileError("must not be empty (the path of a file holding the secret)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"cannot open {path}: {reason}") from None
    try:
        st = os.fstat(fd)  # of the file opened, not of the name: no race with a swap
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            readable = "readable" if mode & 0o044 else "accessible"
            raise SecretFileError(
                f"{path} is {readable} by other users (mode {mode:04o}); a secret file must be"
                " accessible by its owner only: chmod 600 (or 400) it"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_SECRET_FILE_BYTES:
            chunk = os.read(fd, MAX_SECRET_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"cannot read {path}: {reason}") from None
    finally:
        os.close(fd)
    if size > MAX_SECRET_FILE_BYTES:
        raise SecretFileError(f"{path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    try:
        value = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is not valid UTF-8") from None
    value = value.rstrip("\r\n")
    if not value:
        raise SecretFileError(f"{path} is empty")
    if "\x00" in value:
        raise SecretFileError(f"{path} holds a NUL byte")
    return value


def _secret_tables(data: dict[str, Any]) -> Iterator[tuple[KeyPath, dict[str, Any], str]]:
    """(path of the table, the table, its secret key) for every table that takes one."""
    state = data.get("state")
    if isinstance(state, dict):
        for key in ("url", "password", "sentinel_password"):
            yield ("state",), state, key
    listeners = data.get("listeners")
    if isinstance(listeners, list):
        for i, lst in enumerate(listeners):
            pg = lst.get("postgres") if isinstance(lst, dict) else None
            if isinstance(pg, dict):
                yield ("listeners", i, "postgres"), pg, "admin_password"


def resolve_secret_files(
    data: dict[str, Any], problems: list[tuple[KeyPath, str]]
) -> tuple[dict[KeyPath, str], set[KeyPath]]:
    """Read every ``K_file`` into ``K`` in ``data`` (changed in place).

    Returns the values read (by the path of ``K``, to keep them out of messages) and the
    paths of ``K`` whose file could not be used (a placeholder stands there; problems at
    those paths are the file's problem, already in ``problems``).
    """
    values: dict[KeyPath, str] = {}
    failed: set[KeyPath] = set()
    unexpanded = {path for path, _ in problems}  # a ``${VAR}`` that is not set, for one
    for base, table, key in _secret_tables(data):
        file_key = FILE_KEYS[key]
        if file_key not in table:
            continue
        value_path: KeyPath = (*base, key)
        file_path: KeyPath = (*base, file_key)
        if key in table:
            problems.append((file_path, f"set either {key} or {file_key}, not both"))
            failed.add(value_path)
            continue
        path = table[file_key]
        table[key] = ""
        failed.add(value_path)
        if not isinstance(path, str) or file_path in unexpanded:
            continue  # reported already, or by structuring (the type of the _file key)
        try:
            table[key] = values[value_path] = read_secret_file(path)
        except SecretFileError as exc:
            problems.append((file_path, str(exc)))
        else:
            failed.discard(value_path)
    return values, failed
