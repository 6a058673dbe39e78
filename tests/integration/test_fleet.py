"""A fleet of two node types on one local Ray: placement by capacity, tenant keys and quotas.

The two "node types" are custom resources (`weir_gpu_h100: 2`, `weir_gpu_l40s: 1`); the pipelines are
the tiny model on CPU, placed with the per-class options of deployments.autoscaling: two h100
pipelines of 2 stream slots and one l40s pipeline of 1 slot (the capacity table rows below). Streams
are held open without frames while placement is checked, then cancelled (their slots come back).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import grpc
import pytest

pytestmark = pytest.mark.integration

H = W = 64
STEPS = 2


@pytest.fixture(scope="module")
def fleet():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.cli import REPO_ROOT, free_port
    from deployments.app import GRPC_SERVICER_FUNCTIONS
    from deployments.autoscaling import GpuClass, pipeline_deployment_options, slots_of
    from deployments.config import PipelineSpec, ServiceConfig
    from deployments.ingress import Ingress
    from deployments.metrics import Metrics
    from deployments.pipeline import Pipeline
    from deployments.router import Router
    from deployments.tenants import Quota, TenantRegistry, split_key

    classes = {
        "h100": GpuClass("h100", "", 4.0, (("tiny", H, W, STEPS, 2),)),
        "l40s": GpuClass("l40s", "", 1.2, (("tiny", H, W, STEPS, 1),)),
    }
    layout = ["h100", "h100", "l40s"]
    specs = tuple(PipelineSpec(model="tiny", device="cpu", gpu_type=c, num_cpus=0,
                               max_streams=slots_of(classes[c], PipelineSpec(model="tiny"), (H, W, STEPS)))
                  for c in layout)
    registry, big_key = TenantRegistry().add_key("big", tier="premium", quota=Quota(max_streams=16))
    registry, small_key = registry.add_key("small", tier="free", quota=Quota(max_streams=1))
    registry, revoked_key = registry.add_key("small")
    registry = registry.revoke(split_key(revoked_key)[0])
    service = ServiceConfig(pipelines=specs, grpc_port=free_port(), http_port=free_port(), stats_interval_s=0.5,
                            tenants=registry, retry_after_s=1.0)

    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    ray.init(num_cpus=2, resources={"weir_gpu_h100": 2, "weir_gpu_l40s": 1}, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": service.http_port},
                    grpc_options=gRPCOptions(port=service.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        metrics = Metrics.options(ray_actor_options={"num_cpus": 0}).bind()
        pipelines = {}
        for name, spec, cls in zip(service.pipeline_names, specs, layout):
            opts = pipeline_deployment_options(classes[cls], spec, shape=(H, W, STEPS), autoscale=False)
            opts["name"] = name  # the router addresses pipelines by ServiceConfig.pipeline_names
            opts["graceful_shutdown_timeout_s"] = 5.0
            pipelines[name] = Pipeline.options(**opts).bind(name, spec, service, metrics, None)
        router = Router.options(ray_actor_options={"num_cpus": 0}).bind(service, pipelines, metrics)
        app = Ingress.options(ray_actor_options={"num_cpus": 0}).bind(service, router, pipelines, metrics)
        serve.run(app, name=service.app_name, route_prefix="/")
        yield {"service": service, "layout": dict(zip(service.pipeline_names, layout)),
               "big": big_key, "small": small_key, "revoked": revoked_key}
    finally:
        serve.shutdown()
        ray.shutdown()


class Held:
    """One stream opened and held without frames; `cancel()` lets it go."""

    def __init__(self, address: str, api_key: str) -> None:
        self.address, self.api_key = address, api_key
        self.stream_id = ""
        self._done = asyncio.Event()

    async def open(self) -> Held:
        from cluster.client import OpenOptions, channel, metadata
        from protos import weir_pb2_grpc

        self._ch = channel(self.address)
        stub = weir_pb2_grpc.WeirStub(self._ch)
        opts = OpenOptions(prompt="a test", height=H, width=W, fps=8.0, num_steps=STEPS, api_key=self.api_key,
                           ttff_ms=60000, frame_deadline_ms=60000)

        async def requests():
            yield opts.message()
            await self._done.wait()

        self._call = stub.Stream(requests(), metadata=metadata("weir"))
        try:
            async for msg in self._call:
                if msg.WhichOneof("kind") == "opened":
                    self.stream_id = msg.opened.stream_id
                    return self
        except grpc.aio.AioRpcError:
            await self._ch.close()
            raise
        raise AssertionError("the stream ended before StreamOpened")

    async def cancel(self) -> None:
        self._call.cancel()
        self._done.set()
        await self._ch.close()


def _addr(fleet) -> str:
    return f"localhost:{fleet['service'].grpc_port}"


async def _refused(fleet, api_key: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Held(_addr(fleet), api_key).open()
    return err.value


async def _wait_idle(fleet, timeout_s: float = 20.0) -> None:
    from cluster.client import unary
    from protos import weir_pb2

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = await unary(_addr(fleet), "Health", weir_pb2.HealthRequest())
        if health.active_streams == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"streams still active after {timeout_s} s")


def test_pipelines_take_the_resources_of_their_node_type(fleet):
    import ray

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if free.get("weir_gpu_h100", 0) == 0 and free.get("weir_gpu_l40s", 0) == 0:
            break
        time.sleep(0.2)
    assert free.get("weir_gpu_h100", 0) == 0 and free.get("weir_gpu_l40s", 0) == 0, free
    assert ray.cluster_resources()["weir_gpu_h100"] == 2 and ray.cluster_resources()["weir_gpu_l40s"] == 1


def test_streams_fill_each_node_type_to_its_capacity(fleet):
    from ray import serve

    router = serve.get_deployment_handle("Router", fleet["service"].app_name)

    async def run():
        held = [await Held(_addr(fleet), fleet["big"]).open() for _ in range(5)]  # 2 + 2 + 1 slots
        try:
            placed = [await router.locate.remote(h.stream_id) for h in held]
            over = await _refused(fleet, fleet["big"])
        finally:
            for h in held:
                await h.cancel()
        return placed, over

    placed, over = asyncio.run(run())
    assert Counter(placed) == {n: (2 if c == "h100" else 1) for n, c in fleet["layout"].items()}
    assert Counter(fleet["layout"][n] for n in placed) == {"h100": 4, "l40s": 1}
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota" not in over.details()  # the fleet is full, not the tenant
    assert int(dict(over.trailing_metadata())["retry-after-ms"]) > 0
    asyncio.run(_wait_idle(fleet))


def test_tenant_over_quota_is_refused_naming_the_quota(fleet):
    async def run():
        first = await Held(_addr(fleet), fleet["small"]).open()
        try:
            over = await _refused(fleet, fleet["small"])
            other = await Held(_addr(fleet), fleet["big"]).open()  # another tenant is not affected
            await other.cancel()
        finally:
            await first.cancel()
        return over

    over = asyncio.run(run())
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_streams=1" in over.details()
    asyncio.run(_wait_idle(fleet))

    async def again():  # the quota slot came back with the stream
        h = await Held(_addr(fleet), fleet["small"]).open()
        await h.cancel()

    asyncio.run(again())
    asyncio.run(_wait_idle(fleet))


@pytest.mark.parametrize("which", ["missing", "wrong", "revoked"])
def test_bad_keys_are_unauthenticated(fleet, which):
    from deployments.tenants import split_key

    key_id, secret = split_key(fleet["big"])
    key = {"missing": "", "wrong": f"weir_{key_id}_{secret[::-1]}", "revoked": fleet["revoked"]}[which]
    err = asyncio.run(_refused(fleet, key))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert secret not in err.details() and secret[::-1] not in err.details()
