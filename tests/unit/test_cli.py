"""The troupe CLI's config validation (``troupe validate``; ``troupe run`` validates first)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import yaml

from serve_app.cli.main import main, port_problem

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_configs_validate(capsys) -> None:
    for name in ("local.yaml", "mock.yaml", "gpu.yaml"):
        assert main(["validate", str(ROOT / "config" / name)]) == 0
    out = capsys.readouterr().out
    assert "ok: model smollm2-135m (text, engine transformers)" in out
    assert "ok: model mock-5ms (text, engine mock)" in out


def test_bad_config_names_the_field_path(tmp_path: Path, capsys) -> None:
    data = yaml.safe_load((ROOT / "config" / "mock.yaml").read_text())
    data["applications"][0]["args"]["models"][0]["engine"]["token_delay_ms"] = -5
    data["applications"][0]["args"]["models"][1]["deployment"]["replicas"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "applications.0.args" in err
    assert "models.0.engine.mock.token_delay_ms" in err
    assert "models.1.deployment.replicas" in err


def test_run_refuses_an_invalid_config_before_starting_serve(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - import_path: serve_app.build.app:build_app\n    args: {models: []}\n")
    assert main(["run", str(bad)]) == 2
    assert "models" in capsys.readouterr().err


def test_not_a_serve_config(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("models: []\n")
    assert main(["validate", str(bad)]) == 2
    assert "not a Serve config" in capsys.readouterr().err


def test_local_config_fits_a_two_core_machine() -> None:
    """`make run` on a 2-core machine: every replica of config/local.yaml and the actors
    must fit Ray's 2 CPUs, or one replica (it was the gateway) waits forever."""
    from serve_app.cli.main import local_cpu_problem, validate

    apps = validate(ROOT / "config" / "local.yaml")
    assert local_cpu_problem(apps, cpus=2) is None, local_cpu_problem(apps, cpus=2)
    assert apps[0].cpus_at_start() <= 1.8  # some room for Serve's own actors
    assert "reserves" in (local_cpu_problem(apps, cpus=1) or "")


def test_cpus_at_start_counts_replicas_bundles_and_actors() -> None:
    from serve_app.settings import load_settings

    settings = load_settings({
        "gateway": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
        "models": [
            {"id": "a", "engine": {"type": "mock"},
             "deployment": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 1}}},
            {"id": "b", "engine": {"type": "mock"},
             "deployment": {"autoscaling": {"min_replicas": 0, "max_replicas": 9},
                            "ray_actor_options": {"num_cpus": 4}}},
            {"id": "c", "engine": {"type": "mock"},
             "deployment": {"ray_actor_options": {"num_cpus": 0.5},
                            "placement_group_bundles": [{"CPU": 1}, {"CPU": 1, "GPU": 1}]}},
        ],
        "metrics": {"actor_num_cpus": 0.1}, "session": {"actor_num_cpus": 0.05},
        "limits": {"actor_num_cpus": 0.05},
    })
    # gateway 2*0.5 + a 3*1 + b 0 (scaled to zero) + c (0.5 + 2) + actors 0.2
    assert settings.cpus_at_start() == 6.7


def test_run_refuses_a_config_that_cannot_fit_this_machine(tmp_path: Path, capsys, monkeypatch) -> None:
    data = yaml.safe_load((ROOT / "config" / "mock.yaml").read_text())
    data["applications"][0]["args"]["models"][0]["deployment"]["ray_actor_options"] = {"num_cpus": 4096}
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(data))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["run", str(big)]) == 2  # before starting serve run
    assert "never be scheduled" in capsys.readouterr().err
    assert main(["validate", str(big)]) == 0
    assert "warning: on this machine" in capsys.readouterr().out


def test_run_refuses_a_port_another_server_holds(tmp_path: Path, capsys, monkeypatch) -> None:
    # Found by hand: a second `make run` beside a first one loaded every model, then
    # printed HAProxy's bind failure as retried tracebacks until Ctrl-C.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        data = yaml.safe_load((ROOT / "config" / "mock.yaml").read_text())
        data["http_options"] = {"host": "127.0.0.1", "port": port}
        taken = tmp_path / "taken.yaml"
        taken.write_text(yaml.safe_dump(data))
        assert main(["run", str(taken)]) == 2  # before starting serve run
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "http_options.port" in err
        assert port_problem("127.0.0.1", port, taken) is not None
        monkeypatch.setenv("RAY_ADDRESS", "auto")  # a cluster's ports are its own
        assert port_problem("127.0.0.1", port, taken) is None
        monkeypatch.delenv("RAY_ADDRESS")
    assert port_problem("127.0.0.1", port, taken) is None  # free again


class _RecordingPrepare:
    """Stands in for the GGUF conversion: records where it was asked to put the model."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls: list[object] = []

    def __call__(self, cache_dir: object = None) -> Path:
        self.calls.append(cache_dir)
        return self.folder


def test_prepare_converts_the_bundled_model_into_the_given_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    from deployments.engines import gguf_cache

    fake = _RecordingPrepare(tmp_path / "SmolLM2")
    monkeypatch.setattr(gguf_cache, "prepare_bundled_model", fake)
    assert main(["prepare", "--cache-dir", str(tmp_path)]) == 0
    assert fake.calls == [str(tmp_path)]
    assert f"{tmp_path / 'SmolLM2'} ready" in capsys.readouterr().out


def test_prepare_defaults_to_the_shared_cache(monkeypatch, tmp_path: Path) -> None:
    from deployments.engines import gguf_cache

    fake = _RecordingPrepare(tmp_path)
    monkeypatch.setattr(gguf_cache, "prepare_bundled_model", fake)
    assert main(["prepare"]) == 0
    assert fake.calls == [None]  # prepare_bundled_model picks ~/.cache/troupe/models


def _local_apps_with_cache(cache_dir: Path) -> list:
    """config/local.yaml's applications, the bundled text model's cache in ``cache_dir``."""
    from serve_app.cli.serve_config import read_serve_config

    data = yaml.safe_load((ROOT / "config" / "local.yaml").read_text())
    for app in data["applications"]:
        for model in app["args"]["models"]:
            if model["engine"]["type"] == "transformers":
                model["engine"]["cache_dir"] = str(cache_dir)
    path = cache_dir / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return list(read_serve_config(path).apps.values())


def test_run_converts_the_bundled_model_in_the_background_and_ctrl_c_leaves_no_debris(
        tmp_path: Path) -> None:
    from serve_app.cli.main import _stop, start_conversions

    cache = tmp_path / "cache"
    cache.mkdir()
    (process,) = start_conversions(_local_apps_with_cache(cache))
    assert process.args[-4:] == ["serve_app.cli.main", "prepare", "--cache-dir", str(cache)]
    deadline = time.monotonic() + 120  # until it converts into its temporary folder
    while not any(p.name.startswith(".tmp-") for p in cache.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    _stop([process])  # what troupe run does when serve run ends first (Ctrl-C)
    assert process.returncode is not None
    # An interrupted conversion leaves neither a half-written folder nor a usable cache.
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".") or
            p.name.startswith(".tmp-")] == ["serve.yaml"]


def test_run_starts_no_conversion_when_the_cache_is_ready(tmp_path: Path) -> None:
    from deployments.engines import gguf_cache
    from serve_app.cli.main import start_conversions

    gguf = gguf_cache.bundled_gguf_path()
    name = gguf_cache.cache_name_for(gguf, bundled=True)
    converted = gguf_cache.default_cache_root() / name  # `make test` converts it first
    assert gguf_cache.is_valid_cache(converted, gguf)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / name).symlink_to(converted, target_is_directory=True)
    assert start_conversions(_local_apps_with_cache(cache)) == []
