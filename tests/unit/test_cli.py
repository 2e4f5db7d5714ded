"""The troupe CLI's config validation (``troupe validate``; ``troupe run`` validates first)."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve_app.cli import main

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
    bad.write_text("applications:\n  - import_path: serve_app.app:build_app\n    args: {models: []}\n")
    assert main(["run", str(bad)]) == 2
    assert "models" in capsys.readouterr().err


def test_not_a_serve_config(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("models: []\n")
    assert main(["validate", str(bad)]) == 2
    assert "not a Serve config" in capsys.readouterr().err
