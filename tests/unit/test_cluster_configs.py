"""The cluster configs parse, name a node group per accelerator, and point at code that exists."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from deployments.autoscaling import GPU_CLASSES
from deployments.config import ServiceConfig

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"


def _resolve(import_path: str):
    module, _, attr = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@pytest.fixture(scope="module")
def serve_cfg():
    return yaml.safe_load((CONFIGS / "serve.yaml").read_text())


def test_serve_yaml_import_paths_resolve_and_args_parse(serve_cfg):
    for fn in serve_cfg["grpc_options"]["grpc_servicer_functions"]:
        assert callable(_resolve(fn)), fn
    for app in serve_cfg["applications"]:
        assert callable(_resolve(app["import_path"]))
        service = ServiceConfig.from_dict(app["args"], environ={})
        assert service.grpc_port == serve_cfg["grpc_options"]["port"]
        assert {p.gpu_type for p in service.pipelines} <= {c.accelerator_type for c in GPU_CLASSES.values()}
        for d in app.get("deployments", []):
            policy = (d.get("autoscaling_config") or {}).get("policy")
            if policy:
                assert callable(_resolve(policy["policy_function"]))


def test_rayservice_embeds_serve_yaml_and_has_a_group_per_accelerator(serve_cfg):
    doc = yaml.safe_load((CONFIGS / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == serve_cfg
    groups = {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {f"gpu-{name}" for name in GPU_CLASSES}
    for name, gpu in GPU_CLASSES.items():
        g = groups[f"gpu-{name}"]
        spec = g["template"]["spec"]
        assert "nvidia.com/gpu.product" in spec["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        resources = json.loads(json.loads(g["rayStartParams"]["resources"]))
        assert resources[gpu.resource] >= 1 and resources[f"accelerator_type:{gpu.accelerator_type}"] >= 1
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["WEIR_TENANTS"]["valueFrom"]["secretKeyRef"]["name"] == "weir-tenants"  # a secret, not a value
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert serve_cfg["grpc_options"]["port"] in ports


def test_ray_cluster_yaml_has_a_node_type_per_accelerator():
    doc = yaml.safe_load((CONFIGS / "ray-cluster.yaml").read_text())
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types and types[doc["head_node_type"]]["resources"].get("GPU", 0) == 0
    for name, gpu in GPU_CLASSES.items():
        res = types[f"gpu_{name}"]["resources"]
        assert res["GPU"] >= 1 and res[gpu.resource] == res["GPU"]
        assert res[f"accelerator_type:{gpu.accelerator_type}"] == res["GPU"]


def test_grafana_dashboard_uses_only_metric_names_weir_exports():
    dash = json.loads((CONFIGS / "grafana-weir.json").read_text())
    source = (Path(__file__).resolve().parents[2] / "deployments" / "metrics.py").read_text()
    names = set(re.findall(r'"(weir_[a-z_]+)"', source))
    used = set()
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            used |= set(re.findall(r"\b(weir_[a-z_]+)", t["expr"]))
    assert used
    for name in used:
        base = re.sub(r"(_bucket|_count|_sum|_total)$", "", name)
        assert base in names, f"{name} is not exported by deployments/metrics.py"
    for forbidden in ("stream_id", "tenant=", "api_key"):
        assert forbidden not in json.dumps(dash)
