"""`make install` hands uv the same package sources pip would use, and `troupe run`
starts Serve with idle-cheap defaults that the user's own environment overrides."""

from __future__ import annotations

import pytest

from serve_app.cli.pip_to_uv import UnsupportedPipConfig, parse_pip_config, uv_options
from serve_app.cli.serve_env import IDLE_FRIENDLY_ENV, serve_environment

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
