"""VLLMTextEngine's engine arguments and tensor-parallel placement (no vLLM, no GPU)."""

from __future__ import annotations


import pytest

from deployments.engines.vllm_engine import (
    VLLMTextEngine,
    build_engine_args,
    placement_bundles,
)
from serve_app.settings import ConfigError
from tests.unit.vllm_fakes import (
    started_engine,
    vllm_config,
)


# --------------------------------------------------------------------------- tensor parallel


async def test_tensor_parallel_uses_the_ray_executor_in_the_replica_placement_group():
    engine, fake = await started_engine(vllm_config(tensor_parallel_size=2))
    assert fake.engine_args["tensor_parallel_size"] == 2
    assert fake.engine_args["distributed_executor_backend"] == "ray"


def test_single_gpu_leaves_the_executor_to_vllm():
    args = build_engine_args("m", vllm_config())
    assert args["tensor_parallel_size"] == 1
    assert "distributed_executor_backend" not in args


def test_engine_args_carry_the_typed_fields_and_pass_extras_through():
    cfg = vllm_config(
        max_model_len=8192, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.8,
        extra_engine_args={"enable_prefix_caching": True},
    )
    args = build_engine_args("qwen", cfg)
    assert args == {
        "model": "/models/fake",
        "served_model_name": "qwen",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.8,
        "dtype": "bfloat16",
        "enforce_eager": True,
        "max_model_len": 8192,
        "enable_prefix_caching": True,
        # llguidance with compact JSON, as the CPU engine (see vllm_structured)
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
    }


def test_extra_engine_args_may_choose_another_structured_outputs_backend():
    cfg = vllm_config(extra_engine_args={"structured_outputs_config": {"backend": "xgrammar"}})
    assert build_engine_args("m", cfg)["structured_outputs_config"] == {"backend": "xgrammar"}


def test_a_model_path_under_home_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = build_engine_args("m", vllm_config(model="~/.cache/troupe/models/m"))
    assert args["model"] == str(tmp_path / ".cache/troupe/models/m")


def test_the_vllm_cpu_config_example_validates():
    import yaml

    from serve_app.settings import TroupeSettings
    from tests.unit.vllm_fakes import REPO

    app = yaml.safe_load((REPO / "config/vllm-cpu.yaml").read_text())["applications"][0]
    [model] = TroupeSettings.model_validate(app["args"]).models
    assert model.engine.type == "vllm" and model.engine.dtype == "bfloat16"
    args = build_engine_args(model.id, model.engine)
    assert args["kv_cache_memory_bytes"] == 1 << 30 and not args["model"].startswith("~")


def test_extra_engine_args_may_not_override_a_typed_field():
    cfg = vllm_config(tensor_parallel_size=2, extra_engine_args={"tensor_parallel_size": 4})
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        VLLMTextEngine("m", cfg)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_placement_bundles_give_one_gpu_bundle_per_rank(tp):
    bundles = placement_bundles(vllm_config(tensor_parallel_size=tp), num_cpus_per_bundle=2)
    assert bundles == [{"GPU": 1, "CPU": 2}] * tp
    bundles[0]["CPU"] = 99  # each bundle is its own dict
    assert all(b["CPU"] == 2 for b in bundles[1:])


def test_placement_bundles_are_valid_deployment_options():
    from serve_app.settings import DeploymentOptions

    options = DeploymentOptions(
        placement_group_bundles=placement_bundles(vllm_config(tensor_parallel_size=2)),
        ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    ).to_serve()
    assert options["placement_group_bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert options["placement_group_strategy"] == "STRICT_PACK"
