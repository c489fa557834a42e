"""``[state]`` for highly available Redis: Sentinel and Cluster, validated and rendered."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_support import LISTENER, SOURCE, load_text, problems_of

from waypoint.config.model import Config
from waypoint.config.render import SECRET_MASK, render_config


def load(state: str, environ: dict[str, str] | None = None) -> Config:
    return load_text("[state]\n" + state + "\n" + LISTENER, environ)


def problems(state: str) -> list[str]:
    return [str(p) for p in problems_of("[state]\n" + state + "\n" + LISTENER)]


def test_sentinel_configuration_loads() -> None:
    c = load(
        'backend = "redis"\n'
        'sentinels = ["10.0.2.21:26379", "[fd00::22]:26379"]\n'
        'service_name = "waypoint-state"\n'
        'password = "${RP}"\nsentinel_password = "${SP}"\nusername = "waypoint"\n',
        {"RP": "data-secret", "SP": "sentinel-secret"},
    ).state
    assert c.redis_mode == "sentinel"
    assert c.sentinels == ("10.0.2.21:26379", "[fd00::22]:26379")
    assert (c.service_name, c.username) == ("waypoint-state", "waypoint")
    assert (c.password, c.sentinel_password) == ("data-secret", "sentinel-secret")
    assert "secret" not in repr(c)


def test_cluster_configuration_loads() -> None:
    c = load('backend = "redis"\ncluster = true\nnodes = ["10.0.2.31:6379"]\n').state
    assert c.redis_mode == "cluster"
    assert c.nodes == ("10.0.2.31:6379",)
    assert (c.tls, c.tls_ca_file) == (False, None)
    c = load(
        'backend = "redis"\ncluster = true\nnodes = ["h:1"]\ntls = true\n'
        'tls_ca_file = "/etc/waypoint/redis-ca.pem"\n'
    ).state
    assert (c.tls, c.tls_ca_file) == (True, "/etc/waypoint/redis-ca.pem")


def test_a_single_url_is_still_the_plain_mode() -> None:
    c = load('backend = "redis"\nurl = "redis://10.0.2.20:6379/0"\n').state
    assert c.redis_mode == "url"


def test_check_masks_both_redis_passwords() -> None:
    c = load(
        'backend = "redis"\nsentinels = ["h:26379"]\nservice_name = "m"\n'
        'password = "data-secret"\nsentinel_password = "sentinel-secret"\n'
    )
    text = render_config(c)
    assert "secret" not in text
    assert f'password = "{SECRET_MASK}"' in text
    assert f'sentinel_password = "{SECRET_MASK}"' in text
    # Unmasked, the rendering loads back into the same configuration.
    assert load_text(render_config(c, mask_secrets=False)).state == c.state


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (
            'backend = "redis"\n',
            [f'{SOURCE}:1: state.url: backend = "redis" requires url', "or sentinels", "cluster"],
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379"\nsentinels = ["h:26379"]\n'
            'service_name = "m"\n',
            ["state.sentinels: set only one of url, sentinels and cluster = true"],
        ),
        (
            'backend = "redis"\nsentinels = ["h:26379"]\ncluster = true\nnodes = ["h:1"]\n'
            'service_name = "m"\n',
            ["state.cluster: set only one of", "found sentinels and cluster"],
        ),
        ('backend = "redis"\nsentinels = ["h:26379"]\n', ["state.service_name: sentinels needs"]),
        (
            'backend = "redis"\nsentinels = ["h"]\nservice_name = "m"\n',
            ["state.sentinels[0]:", "host:port"],
        ),
        ('backend = "redis"\ncluster = true\n', ["state.nodes: cluster = true needs nodes"]),
        (
            'backend = "redis"\ncluster = true\nnodes = ["h:1", "h:x"]\n',
            ["state.nodes[1]:", "host:port"],
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379"\nnodes = ["h:1"]\n',
            ["state.nodes: is only used with cluster = true"],
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379"\nservice_name = "m"\n',
            ["state.service_name: is only used with sentinels"],
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379"\nsentinel_password = "p"\n',
            ["state.sentinel_password: is only used with sentinels"],
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379"\npassword = "p"\n',
            ["state.password: is for sentinels and cluster; with url"],
        ),
        (
            'backend = "redis"\ncluster = true\nnodes = ["h:1"]\npassword = ""\n',
            ["state.password: must not be empty"],
        ),
        (
            'backend = "redis"\nurl = "redis://h:6379"\ntls = true\n',
            ["state.tls: is for sentinels and cluster; with url", "rediss://"],
        ),
        (
            'backend = "redis"\ncluster = true\nnodes = ["h:1"]\ntls_ca_file = "/ca.pem"\n',
            ["state.tls_ca_file: is only used with tls = true"],
        ),
        ('sentinels = ["h:26379"]\n', ['state.sentinels: is only used with backend = "redis"']),
        ("cluster = true\n", ['state.cluster: is only used with backend = "redis"']),
        ('cluster = "yes"\n', ["state.cluster: expected a boolean"]),
        ('backend = "redis"\nsentinels = "h:26379"\n', ["state.sentinels:"]),
    ],
)
def test_bad_ha_settings_are_named(state: str, expected: list[str]) -> None:
    found = problems(state)
    assert len(found) == 1, found
    for fragment in expected:
        assert fragment in found[0], found


def test_a_bad_password_value_is_never_quoted() -> None:
    found = problems('backend = "redis"\nurl = "redis://h:6379"\npassword = "hunter2-secret"\n')
    assert found and all("hunter2" not in p for p in found)


def _secret_file(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return str(path)


def test_redis_passwords_come_from_owner_only_files(tmp_path: Path) -> None:
    data = _secret_file(tmp_path, "redis_pw", "data-secret")
    sentinel = _secret_file(tmp_path, "sentinel_pw", "sentinel-secret")
    c = load(
        'backend = "redis"\nsentinels = ["h:26379"]\nservice_name = "m"\n'
        f'password_file = "{data}"\nsentinel_password_file = "{sentinel}"\n'
    )
    assert (c.state.password, c.state.sentinel_password) == ("data-secret", "sentinel-secret")
    text = render_config(c)
    assert "secret" not in text
    assert "# password: read from password_file" in text
    assert "# sentinel_password: read from sentinel_password_file" in text


def test_a_redis_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    data = _secret_file(tmp_path, "redis_pw", "data-secret", mode=0o644)
    found = problems(
        f'backend = "redis"\ncluster = true\nnodes = ["h:1"]\npassword_file = "{data}"\n'
    )
    assert len(found) == 1 and "state.password_file:" in found[0], found
    assert "data-secret" not in found[0]


def test_a_redis_password_and_its_file_together_are_refused(tmp_path: Path) -> None:
    data = _secret_file(tmp_path, "redis_pw", "data-secret")
    found = problems(
        'backend = "redis"\ncluster = true\nnodes = ["h:1"]\n'
        f'password = "x"\npassword_file = "{data}"\n'
    )
    assert len(found) == 1 and "set either password or password_file, not both" in found[0]
