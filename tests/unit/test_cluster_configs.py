"""cluster.yaml and config/gpu.yaml are accepted by the tools that will read them.

``config/gpu.yaml`` must pass Troupe's own settings tree and Ray Serve's deploy schema;
``cluster.yaml`` must pass Ray's cluster-launcher schema and the checks ``ray up`` runs
before it touches a cloud. The GPU arithmetic between the two files is checked too: every
vLLM replica reserves exactly its tensor-parallel GPUs and fits on some worker node type.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY_PIN = "2.60.0"


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "config" / "gpu.yaml").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def settings(serve_config):
    from serve_app.settings import load_settings

    [app] = serve_config["applications"]
    return load_settings(app["args"])


# --------------------------------------------------------------------------- config/gpu.yaml


def test_gpu_config_is_valid_troupe_settings(settings):
    engines = {m.id: m.engine for m in settings.models if m.modality == "text"}
    assert {e.type for e in engines.values()} == {"vllm"}
    assert sorted(e.tensor_parallel_size for e in engines.values()) == [1, 2]
    assert all(e.model.startswith("/models/") for e in engines.values())  # local weights
    assert settings.gateway.ray_actor_options.num_cpus == 1
    assert settings.gateway.ray_actor_options.num_gpus == 0


def test_gpu_config_is_accepted_by_ray_serve(serve_config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    [app] = schema.applications
    assert app.name == "troupe"
    assert app.route_prefix == "/"
    assert app.import_path == "serve_app.build.app:build_app"
    assert schema.http_options.host == "0.0.0.0"
    assert schema.http_options.port == 8000


def test_each_vllm_replica_reserves_exactly_its_tensor_parallel_gpus(settings):
    from deployments.engines.vllm_engine import placement_bundles

    for model in settings.models:
        if model.modality != "text":  # other modalities reserve GPUs without placement groups
            continue
        tp = model.engine.tensor_parallel_size
        options = model.deployment.to_serve()
        actor = options["ray_actor_options"]
        bundles = options.get("placement_group_bundles")
        if tp == 1:
            assert bundles is None and actor["num_gpus"] == 1, model.id
            continue
        # TP: the bundles hold the GPUs (vLLM's Ray workers use them), the replica actor
        # sits in bundle 0 without a GPU, and the ranks share a node.
        assert bundles == placement_bundles(model.engine), model.id
        assert options["placement_group_strategy"] == "STRICT_PACK", model.id
        assert actor["num_gpus"] == 0, model.id
        assert actor["num_cpus"] <= bundles[0]["CPU"], model.id


def test_autoscaling_allows_scale_to_zero(settings):
    for model in settings.models:
        assert model.deployment.autoscaling is not None, model.id
        assert model.deployment.autoscaling.min_replicas == 0, model.id


# --------------------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_matches_rays_launcher_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema_path = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))


def test_cluster_yaml_passes_the_checks_ray_up_runs_first(cluster):
    # The same defaults-filling and validation `ray up` does before calling the cloud.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_cluster_pins_the_ray_version_of_pyproject(cluster):
    import ray

    assert f'"ray[serve]=={RAY_PIN}"' in (REPO / "pyproject.toml").read_text()
    assert ray.__version__ == RAY_PIN
    assert cluster["docker"]["image"] == f"rayproject/ray:{RAY_PIN}-py311-gpu"
    for node_type in cluster["available_node_types"].values():
        assert "docker" not in node_type  # no node type swaps in another image


def test_head_is_cpu_only_and_workers_have_gpus(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert {name: t["resources"]["GPU"] for name, t in workers.items()} == {
        "gpu-1x": 1,
        "gpu-4x": 4,
        "cpu-8x": 0,  # CPU-only model replicas (troupe_worker)
    }
    assert all(t["min_workers"] == 0 for t in workers.values())


def test_every_model_replica_fits_on_a_worker_node_type(cluster, settings):
    workers = [
        t["resources"]
        for name, t in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    ]
    for model in settings.models:
        options = model.deployment.to_serve()
        bundles = options.get("placement_group_bundles") or [
            {"GPU": options["ray_actor_options"]["num_gpus"],
             "CPU": options["ray_actor_options"]["num_cpus"]}
        ]
        need_gpu = sum(b.get("GPU", 0) for b in bundles)
        need_cpu = sum(b.get("CPU", 0) for b in bundles)
        assert any(
            r["GPU"] >= need_gpu and r["CPU"] >= need_cpu for r in workers
        ), f"no worker node type can host one replica of {model.id}"


def test_nodes_install_troupe_with_the_gpu_extra_from_the_synced_repo(cluster):
    [target] = [dst for dst, src in cluster["file_mounts"].items() if src == "."]
    assert cluster["setup_commands"] == [f'pip install --no-cache-dir "{target}[gpu]"']
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("ray start" in cmd for cmd in cluster[key]), key


# --------------------------------------------------------------------------- head-only placement

HEAD_RESOURCE = "troupe_head"


def test_only_the_head_declares_the_head_resource(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"][HEAD_RESOURCE] == 1
    for name, node_type in types.items():
        if name != cluster["head_node_type"]:
            assert HEAD_RESOURCE not in node_type["resources"], name


def test_the_gateway_asks_for_the_head_and_no_model_does(settings, cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    gateway = settings.gateway.ray_actor_options.to_ray()
    assert 0 < gateway["resources"][HEAD_RESOURCE] <= head[HEAD_RESOURCE] / 10
    assert gateway["num_cpus"] <= head["CPU"]
    for model in settings.models:
        options = model.deployment.to_serve()
        assert HEAD_RESOURCE not in options["ray_actor_options"].get("resources", {}), model.id
        for bundle in options.get("placement_group_bundles") or []:
            assert HEAD_RESOURCE not in bundle, model.id


def test_every_model_has_bounded_cold_starts_and_scaling_delays(settings):
    for model in settings.models:
        auto = model.deployment.autoscaling
        # A cold start can include a new GPU node: minutes, but bounded.
        assert 60 <= auto.cold_start_timeout_s <= 900, model.id
        assert auto.upscale_delay_s > 0 and auto.downscale_delay_s >= 60, model.id
        serve_options = model.deployment.to_serve()["autoscaling_config"]
        assert "cold_start_timeout_s" not in serve_options  # Troupe's, not Serve's


def test_no_model_replica_can_be_placed_on_the_head(settings, cluster):
    """Every replica needs a GPU or a custom resource the head lacks, and some worker
    node type offers all of it."""
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["resources"]
    workers = [t["resources"] for name, t in types.items() if name != cluster["head_node_type"]]
    for model in settings.models:
        options = model.deployment.to_serve()
        actor = options["ray_actor_options"]
        demands = [{"GPU": actor["num_gpus"], **actor.get("resources", {})},
                   *(options.get("placement_group_bundles") or [])]
        needs = {k: v for d in demands for k, v in d.items() if k != "CPU" and v}
        assert any(head.get(k, 0) < v for k, v in needs.items()), (
            f"{model.id} could run on the head: it needs only {needs or 'CPU'}")
        assert any(all(w.get(k, 0) >= v for k, v in needs.items()) for w in workers), model.id


def test_remote_config_is_valid_troupe_settings_and_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    from serve_app.settings import load_settings

    raw = yaml.safe_load((REPO / "config" / "remote.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    settings = load_settings(raw["applications"][0]["args"])
    assert {m.engine.type for m in settings.models} == {"openai", "anthropic", "gemini"}
    assert all(m.run_in == "gateway" for m in settings.models)
    assert settings.credential_envs() == {
        "openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}
