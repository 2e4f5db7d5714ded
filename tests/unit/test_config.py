"""Unit tests for the settings tree (serve_app.settings): loading, validation, Serve options."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from serve_app.settings import (
    AutoscalingOptions,
    ConfigError,
    DeploymentOptions,
    MockEngineConfig,
    ModelConfig,
    TroupeSettings,
    VLLMEngineConfig,
    load_settings,
)

REPO = Path(__file__).resolve().parents[2]


def _mock_model(model_id: str = "m1", **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "engine": {"type": "mock"}, **extra}


def _error_lines(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    """The per-field lines of a ConfigError message, stripped."""
    return [line.strip() for line in str(exc.value).splitlines()[1:]]


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TROUPE_CONFIG_FILE", raising=False)


# --------------------------------------------------------------------------- loading


def test_load_from_dict_fills_defaults() -> None:
    settings = load_settings({"models": [_mock_model("chat", engine={"type": "mock", "token_delay_ms": 2})]})

    assert isinstance(settings, TroupeSettings)
    model = settings.model("chat")
    assert model is not None
    assert isinstance(model.engine, MockEngineConfig)
    assert model.engine.token_delay_ms == 2
    assert model.default_max_tokens == 256
    assert settings.gateway.max_body_bytes == 4 * 1024 * 1024
    assert settings.model("absent") is None


def test_load_from_yaml_named_by_config_file_arg(tmp_path: Path) -> None:
    path = tmp_path / "troupe.yaml"
    path.write_text(yaml.safe_dump({"models": [_mock_model("from-file")], "log_unknown_fields": False}))

    settings = load_settings({"config_file": str(path)})

    assert [m.id for m in settings.models] == ["from-file"]
    assert settings.log_unknown_fields is False


def test_args_override_the_files_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "troupe.yaml"
    path.write_text(yaml.safe_dump({"models": [_mock_model("from-file")], "log_unknown_fields": False}))

    settings = load_settings({"config_file": str(path), "models": [_mock_model("from-args")]})

    assert [m.id for m in settings.models] == ["from-args"]
    assert settings.log_unknown_fields is False  # untouched keys still come from the file


def test_load_from_troupe_config_file_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump({"models": [_mock_model("from-env")]}))
    monkeypatch.setenv("TROUPE_CONFIG_FILE", str(path))

    assert [m.id for m in load_settings().models] == ["from-env"]
    assert [m.id for m in load_settings({}).models] == ["from-env"]


def test_env_file_is_ignored_when_args_carry_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump({"models": [_mock_model("from-env")]}))
    monkeypatch.setenv("TROUPE_CONFIG_FILE", str(path))

    assert [m.id for m in load_settings({"models": [_mock_model("from-args")]}).models] == ["from-args"]


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as exc:
        load_settings({"config_file": str(missing)})
    assert str(missing) in str(exc.value)


def test_config_file_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings({"config_file": str(path)})


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings({"config_file": str(path)})


# ------------------------------------------------------------------------ validation


def test_negative_token_delay_names_its_dotted_path() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": [{"id": "m", "engine": {"type": "mock", "token_delay_ms": -1}}]})

    assert any(line.startswith("models.0.engine.mock.token_delay_ms:") for line in _error_lines(exc))


def test_unknown_field_is_rejected_with_its_path() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(
            {"models": [_mock_model("m", deployment={"num_replica": 2})]}  # typo of num_replicas
        )

    lines = _error_lines(exc)
    assert any(line.startswith("models.0.deployment.num_replica:") for line in lines), lines
    assert "Extra inputs are not permitted" in str(exc.value)


def test_unknown_top_level_field_is_rejected() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": [_mock_model()], "gatway": {}})
    assert any(line.startswith("gatway:") for line in _error_lines(exc))


def test_every_bad_field_is_listed() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(
            {
                "models": [
                    {"id": "m", "engine": {"type": "mock", "token_delay_ms": -1}},
                    {"id": "n", "engine": {"type": "mock"}, "default_max_tokens": 0},
                ]
            }
        )
    lines = _error_lines(exc)
    assert any(line.startswith("models.0.engine.mock.token_delay_ms:") for line in lines)
    assert any(line.startswith("models.1.default_max_tokens:") for line in lines)


def test_duplicate_model_ids_are_rejected() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": [_mock_model("twin"), _mock_model("twin")]})
    assert "duplicate model id 'twin'" in str(exc.value)


def test_duplicate_model_id_error_names_the_models_path() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": [_mock_model("twin"), _mock_model("twin")]})
    assert any(line.startswith("models") for line in _error_lines(exc)), _error_lines(exc)


def test_num_replicas_and_autoscaling_together_are_rejected() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(
            {"models": [_mock_model("m", deployment={"num_replicas": 2, "autoscaling": {}})]}
        )
    lines = _error_lines(exc)
    assert any(
        line.startswith("models.0.deployment:") and "either num_replicas or autoscaling" in line
        for line in lines
    ), lines


def test_autoscaling_min_above_max_is_rejected() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(
            {
                "models": [
                    _mock_model("m", deployment={"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
                ]
            }
        )
    assert any(
        line.startswith("models.0.deployment.autoscaling:") for line in _error_lines(exc)
    )


def test_placement_strategy_without_bundles_is_rejected() -> None:
    with pytest.raises(ConfigError, match="needs placement_group_bundles"):
        load_settings(
            {"models": [_mock_model("m", deployment={"placement_group_strategy": "PACK"})]}
        )


@pytest.mark.parametrize("bad_id", ["", "-leading-dash", "has space", "x" * 129, "bad#hash"])
def test_bad_model_id_pattern_is_rejected(bad_id: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": [_mock_model(bad_id)]})
    assert any(line.startswith("models.0.id:") for line in _error_lines(exc)), _error_lines(exc)


@pytest.mark.parametrize("good_id", ["smollm2-135m", "org/model:v1.2", "A", "x" * 128])
def test_good_model_ids_are_accepted(good_id: str) -> None:
    assert load_settings({"models": [_mock_model(good_id)]}).models[0].id == good_id


def test_unknown_engine_type_is_rejected_with_path() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": [{"id": "m", "engine": {"type": "tpu"}}]})
    assert any(line.startswith("models.0.engine:") for line in _error_lines(exc))


def test_no_models_is_rejected() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": []})
    assert any(line.startswith("models:") for line in _error_lines(exc))


def test_settings_are_frozen() -> None:
    settings = load_settings({"models": [_mock_model()]})
    with pytest.raises(ValidationError, match="frozen"):
        settings.models[0].default_max_tokens = 5  # type: ignore[misc]


def test_deployment_name_is_serve_safe() -> None:
    model = ModelConfig(id="org/model:v1", engine=MockEngineConfig())
    assert model.deployment_name == "LLM_org_model_v1"


# ------------------------------------------------------------------- Serve options


def test_to_serve_defaults_to_one_replica() -> None:
    out = DeploymentOptions().to_serve()

    assert out["num_replicas"] == 1
    assert "autoscaling_config" not in out
    assert "placement_group_bundles" not in out
    assert out["max_ongoing_requests"] == 30
    assert out["max_queued_requests"] == 100
    assert out["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}


def test_to_serve_with_autoscaling() -> None:
    opts = DeploymentOptions(
        autoscaling=AutoscalingOptions(min_replicas=0, max_replicas=4, target_ongoing_requests=2)
    )
    out = opts.to_serve()

    assert "num_replicas" not in out
    assert out["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
    }


def test_to_serve_with_placement_group_and_resources() -> None:
    opts = DeploymentOptions(
        num_replicas=2,
        ray_actor_options={"num_cpus": 1, "num_gpus": 0, "memory": 1024, "resources": {"head": 0.01}},
        placement_group_bundles=[{"GPU": 1, "CPU": 1}, {"GPU": 1}],
    )
    out = opts.to_serve()

    assert out["num_replicas"] == 2
    assert out["placement_group_bundles"] == [{"GPU": 1, "CPU": 1}, {"GPU": 1}]
    assert out["placement_group_strategy"] == "STRICT_PACK"
    assert out["ray_actor_options"] == {
        "num_cpus": 1, "num_gpus": 0, "memory": 1024, "resources": {"head": 0.01}
    }


def test_to_serve_keeps_an_explicit_placement_strategy() -> None:
    opts = DeploymentOptions(placement_group_bundles=[{"CPU": 1}], placement_group_strategy="SPREAD")
    assert opts.to_serve()["placement_group_strategy"] == "SPREAD"


def test_pricing_cost() -> None:
    model = ModelConfig(
        id="m",
        engine=MockEngineConfig(),
        pricing={"input_usd_per_million": 0.5, "output_usd_per_million": 1.5},
    )
    assert model.pricing.cost(1_000_000, 2_000_000) == pytest.approx(3.5)


# ------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("name", ["mock.yaml", "local.yaml", "local-replicas.yaml"])
def test_shipped_serve_configs_validate(name: str) -> None:
    serve_config = yaml.safe_load((REPO / "config" / name).read_text())
    apps = serve_config["applications"]
    assert apps, f"config/{name} has no applications"
    for app in apps:
        assert app["import_path"] == "serve_app.build.app:build_app"
        settings = load_settings(app["args"])
        assert settings.models
        for model in settings.models:
            model.deployment.to_serve()  # every model's Serve options build


def test_make_run_hosts_its_models_in_the_gateway_and_local_replicas_does_not() -> None:
    """config/local.yaml and config/local-replicas.yaml serve the same models; only where
    they run differs, and both reserve the same CPUs (the gateway takes its models')."""
    def settings(name: str) -> Any:
        return load_settings(yaml.safe_load((REPO / "config" / name).read_text())
                             ["applications"][0]["args"])

    folded, replicas = settings("local.yaml"), settings("local-replicas.yaml")
    assert all(m.run_in == "gateway" for m in folded.models)
    assert [m.run_in for m in replicas.models if m.engine.type != "mock"] == ["deployment"] * 5
    strip = {"run_in"}
    assert [m.model_dump(exclude=strip) for m in folded.models] == \
        [m.model_dump(exclude=strip) for m in replicas.models]
    assert folded.cpus_at_start() == replicas.cpus_at_start() <= 1.8
    assert folded.gateway_num_cpus() == 1.4


def test_mock_config_serves_mock_engines_only() -> None:
    serve_config = yaml.safe_load((REPO / "config" / "mock.yaml").read_text())
    settings = load_settings(serve_config["applications"][0]["args"])
    assert {m.engine.type for m in settings.models} <= {
        "mock", "mock-embeddings", "mock-speech", "mock-transcription", "mock-image"}


# ------------------------------------------------------------------ descriptions


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model class reachable inside a type annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _all_config_models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [TroupeSettings]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for field in cls.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return seen


def test_walk_reaches_every_config_model() -> None:
    names = {cls.__name__ for cls in _all_config_models()}
    assert {
        "TroupeSettings", "ModelConfig", "MockEngineConfig", "TransformersEngineConfig",
        "VLLMEngineConfig", "DeploymentOptions", "AutoscalingOptions", "RayActorOptions",
        "PricingConfig", "GatewayOptions",
    } <= names


def test_every_config_field_has_a_description() -> None:
    missing = [
        f"{cls.__name__}.{name}"
        for cls in _all_config_models()
        for name, field in cls.model_fields.items()
        if not (field.description and field.description.strip())
    ]
    assert missing == []


def test_every_config_model_forbids_extra_fields() -> None:
    lax = [cls.__name__ for cls in _all_config_models() if cls.model_config.get("extra") != "forbid"]
    assert lax == []


def test_vllm_engine_config_needs_a_model_path() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"models": [{"id": "m", "engine": {"type": "vllm"}}]})
    assert any(line.startswith("models.0.engine.vllm.model:") for line in _error_lines(exc))
    assert VLLMEngineConfig(model="/w").tensor_parallel_size == 1
