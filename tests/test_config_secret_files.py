"""Secrets from files: ``admin_password_file`` and ``[state] url_file`` (systemd credentials,
container secret mounts). Modes, missing files, both given, rotation on a new load, masking."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from waypoint.cli.main import main
from waypoint.config import ConfigError, load_config, load_config_text, render_config
from waypoint.config.secrets import SecretFileError, read_secret_file

BASE = """
[[listeners]]
name = "pg-main"
listen = "127.0.0.1:5432"
backend = "127.0.0.1:5433"

[listeners.postgres]
admin_user = "waypoint_admin"
{postgres}
"""


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def config_text(postgres: str, extra: str = "") -> str:
    return extra + BASE.format(postgres=postgres)


def problems_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source="w.toml", environ=environ or {})
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("content", ["s3cret-pw", "s3cret-pw\n", "s3cret-pw\r\n", "s3cret-pw\n\n"])
def test_admin_password_file_is_read_and_trailing_newlines_stripped(
    tmp_path: Path, content: str
) -> None:
    pw = secret(tmp_path / "pg_admin", content)
    cfg = load_config_text(config_text(f'admin_password_file = "{pw}"'), environ={})
    assert cfg.listeners[0].postgres.admin_password == "s3cret-pw"
    assert cfg.listeners[0].postgres.admin_password_file == str(pw)


def test_inner_whitespace_and_trailing_spaces_are_kept(tmp_path: Path) -> None:
    pw = secret(tmp_path / "pg_admin", "  two words  \n")
    cfg = load_config_text(config_text(f'admin_password_file = "{pw}"'), environ={})
    assert cfg.listeners[0].postgres.admin_password == "  two words  "


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o440, 0o444])
def test_a_file_readable_by_other_users_is_refused(tmp_path: Path, mode: int) -> None:
    pw = secret(tmp_path / "pg_admin", "s3cret-pw\n", mode)
    problems = problems_of(config_text(f'admin_password_file = "{pw}"'))
    assert len(problems) == 1, problems
    assert problems[0].startswith("w.toml:9: listeners[0].postgres.admin_password_file: ")
    assert f"is readable by other users (mode {mode:04o})" in problems[0]
    assert "chmod 600" in problems[0]
    assert "s3cret" not in problems[0]


def test_group_writable_is_refused_too(tmp_path: Path) -> None:
    pw = secret(tmp_path / "pg_admin", "s3cret-pw", 0o620)
    with pytest.raises(SecretFileError, match=r"accessible by other users \(mode 0620\)"):
        read_secret_file(str(pw))


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    pw = secret(tmp_path / "pg_admin", "s3cret-pw", mode)
    assert read_secret_file(str(pw)) == "s3cret-pw"


def test_a_symlink_to_an_owner_only_file_is_followed(tmp_path: Path) -> None:
    """Kubernetes secret volumes are symbolic links into a ``..data`` directory."""
    target = secret(tmp_path / "real", "s3cret-pw")
    link = tmp_path / "pg_admin"
    link.symlink_to(target)
    assert read_secret_file(str(link)) == "s3cret-pw"


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    problems = problems_of(config_text(f'admin_password_file = "{missing}"'))
    assert problems == [
        f"w.toml:9: listeners[0].postgres.admin_password_file: cannot open {missing}:"
        " No such file or directory"
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty"), ("\n", "is empty"), ("a\x00b", "holds a NUL byte")],
)
def test_unusable_content_is_refused(tmp_path: Path, content: str, message: str) -> None:
    pw = secret(tmp_path / "pg_admin", content)
    problems = problems_of(config_text(f'admin_password_file = "{pw}"'))
    assert len(problems) == 1 and message in problems[0], problems


def test_not_utf8_a_directory_and_a_huge_file_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff\xfe")
    bad.chmod(0o600)
    with pytest.raises(SecretFileError, match="is not valid UTF-8"):
        read_secret_file(str(bad))
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(SecretFileError, match="is not a regular file"):
        read_secret_file(str(directory))
    huge = secret(tmp_path / "huge", "x" * (64 * 1024 + 1))
    with pytest.raises(SecretFileError, match="is larger than 65536 bytes"):
        read_secret_file(str(huge))


def test_a_value_and_a_file_for_the_same_secret_is_an_error(tmp_path: Path) -> None:
    pw = secret(tmp_path / "pg_admin", "s3cret-pw")
    problems = problems_of(
        config_text(f'admin_password = "inline-pw"\nadmin_password_file = "{pw}"')
    )
    assert problems == [
        "w.toml:10: listeners[0].postgres.admin_password_file:"
        " set either admin_password or admin_password_file, not both"
    ]


def test_neither_value_nor_file_names_both_keys() -> None:
    problems = problems_of(config_text(""))
    assert len(problems) == 1
    assert "listeners[0].postgres.admin_password: required key is missing" in problems[0]
    assert "(set admin_password or admin_password_file)" in problems[0]


def test_systemd_credentials_directory_through_env_expansion(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret(creds / "pg_admin", "from-systemd\n", 0o400)
    text = config_text('admin_password_file = "${CREDENTIALS_DIRECTORY}/pg_admin"')
    cfg = load_config_text(text, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.listeners[0].postgres.admin_password == "from-systemd"
    # Without the variable (not started by systemd): the variable is named.
    assert problems_of(text) == [
        "w.toml:9: listeners[0].postgres.admin_password_file:"
        " environment variable CREDENTIALS_DIRECTORY is not set"
    ]


def test_loading_again_reads_the_rotated_file(tmp_path: Path) -> None:
    pw = secret(tmp_path / "pg_admin", "first-pw\n")
    path = tmp_path / "w.toml"
    path.write_text(config_text(f'admin_password_file = "{pw}"'))
    assert load_config(path).listeners[0].postgres.admin_password == "first-pw"
    # A rotation as secret managers do it: a new file renamed over the old one.
    new = secret(tmp_path / "pg_admin.new", "second-pw\n")
    os.replace(new, pw)
    assert load_config(path).listeners[0].postgres.admin_password == "second-pw"
    # ...and a rotation that broke the mode is refused on the next load.
    pw.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_config(path)


REDIS_STATE = """
[state]
backend = "redis"
url_file = "{path}"
"""


def test_redis_url_from_a_file(tmp_path: Path) -> None:
    url = secret(tmp_path / "redis_url", "redis://:redis-pw-123@127.0.0.1:6379/0\n")
    text = config_text('admin_password = "x"', REDIS_STATE.format(path=url))
    cfg = load_config_text(text, environ={})
    assert cfg.state.url == "redis://:redis-pw-123@127.0.0.1:6379/0"
    assert cfg.state.url_file == str(url)
    assert "redis-pw-123" not in repr(cfg)


def test_a_bad_value_from_a_file_is_reported_at_the_file_key_and_not_quoted(
    tmp_path: Path,
) -> None:
    url = secret(tmp_path / "redis_url", "http://:redis-pw-123@127.0.0.1:6379/0")
    text = config_text('admin_password = "x"', REDIS_STATE.format(path=url))
    problems = problems_of(text)
    assert problems == [
        "w.toml:4: state.url_file: the value read from the file must be a redis://,"
        " rediss:// or unix:// URL"
    ]


def test_check_names_the_files_and_never_shows_their_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = secret(tmp_path / "pg_admin", "pg-file-secret\n")
    url = secret(tmp_path / "redis_url", "redis://:redis-file-secret@127.0.0.1:6379/0\n")
    path = tmp_path / "w.toml"
    path.write_text(config_text(f'admin_password_file = "{pw}"', REDIS_STATE.format(path=url)))
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "pg-file-secret" not in out and "redis-file-secret" not in out
    assert f'admin_password_file = "{pw}"' in out
    assert f'url_file = "{url}"' in out
    assert "# admin_password: read from admin_password_file" in out
    assert "# url: read from url_file" in out
    # The output loads back into the same configuration (the files are read again).
    again = load_config_text(out, environ={})
    assert again == load_config(path)
    assert again.listeners[0].postgres.admin_password == "pg-file-secret"
    # Even unmasked, a file-sourced secret is named by its file, not written out.
    assert "pg-file-secret" not in render_config(again, mask_secrets=False)
