"""Build and run Weir's Serve applications from a ServiceConfig.

One application:

    gRPC   Ingress (the ingress deployment) -> Router -> Pipeline-<i>-<model> (one deployment per pool)
    HTTP   GET /metrics on the Serve HTTP proxy -> Ingress -> Metrics (the one Prometheus exporter)
    web    GET /web/ (the browser page), its WebSocket and WebRTC signalling -> WebIngress, a second
           application (deployments.web) reaching the same Router, pipelines and Metrics by handle

Every PipelineSpec is a deployment: a pool of replicas of one GPU class (PipelineSpec.replicas, or
autoscaled up to max_replicas on SLO slack). The Router admits each stream to one replica of one pool;
deployments.affinity routes every later call for the stream to that replica.

`build_app` is also the `import_path` target of a Serve config YAML (`deployments.app:build_app`, with
the ServiceConfig fields as `args`).
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import gRPCOptions

from deployments.autoscaling import pool_size_options
from deployments.config import ServiceConfig
from deployments.ingress import Ingress
from deployments.metrics import Metrics
from deployments.pipeline import Pipeline
from deployments.router import Router

GRPC_SERVICER_FUNCTIONS = ["protos.weir_pb2_grpc.add_WeirServicer_to_server"]


def build_application(service: ServiceConfig, executor_factory=None):
    """The bound application, ready for serve.run."""
    metrics = Metrics.options(ray_actor_options={"num_cpus": 0}).bind()
    pipelines = {}
    for name, spec in zip(service.pipeline_names, service.pipelines):
        actor_options: dict = {"num_cpus": spec.num_cpus}
        placement: dict = {}
        if spec.device == "cuda" and spec.resolved_executor == "graph" and executor_factory is None:
            # the replica sits in a CPU bundle; each stage actor takes one GPU bundle of the same node
            gpu_bundle: dict = {"GPU": 1, "CPU": 1}
            if spec.accelerator_type:
                gpu_bundle[f"accelerator_type:{spec.accelerator_type}"] = 0.001
            placement = {
                "placement_group_bundles": [{"CPU": max(spec.num_cpus, 0.01)}] + [gpu_bundle] * spec.num_gpus,
                "placement_group_strategy": "STRICT_PACK",
            }
        elif spec.device == "cuda":
            actor_options["num_gpus"] = 1
            if spec.accelerator_type:
                actor_options["accelerator_type"] = spec.accelerator_type
        pipelines[name] = Pipeline.options(
            name=name, **pool_size_options(spec), ray_actor_options=actor_options,
            max_ongoing_requests=max(64, 8 * spec.max_streams), **placement,
        ).bind(name, spec, service, metrics, executor_factory)
    router = Router.options(ray_actor_options={"num_cpus": 0}).bind(service, pipelines, metrics)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(service, router, pipelines, metrics)


def build_app(args: dict | None = None):
    """Serve config entry point: `import_path: deployments.app:build_app`, `args:` = ServiceConfig fields."""
    service = ServiceConfig.from_dict(args or {})
    return build_application(service)


def start(service: ServiceConfig, *, executor_factory=None, blocking: bool = False, web=None) -> None:
    """Start Serve (gRPC proxy on service.grpc_port, HTTP on http_port) and run the app (Ray must be up).

    `web` (a deployments.web.WebConfig) also runs the browser page's application at web.route_prefix.
    """
    serve.start(
        http_options={"host": "0.0.0.0", "port": service.http_port},
        grpc_options=gRPCOptions(port=service.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )
    app = build_application(service, executor_factory)
    serve.run(app, name=service.app_name, route_prefix="/", blocking=blocking and web is None)
    if web is not None:
        from deployments.web import build_web_application, web_app_name

        serve.run(build_web_application(service, web), name=web_app_name(service), route_prefix=web.route_prefix,
                  blocking=blocking)
