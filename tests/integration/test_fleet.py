"""A fleet of two node types on one local Ray: pools, placement by capacity, stream affinity inside a pool,
scale-down under live streams, tenant keys and quotas across ingress replicas.

The two "node types" are custom resources (`weir_gpu_h100: 2`, `weir_gpu_l40s: 1`); the pipelines are
the tiny model on CPU, placed with the per-class options of deployments.autoscaling: an h100 pool of two
replicas with 2 stream slots each, and an l40s pool of one replica with 1 slot (the capacity table rows
below). The h100 pool's size follows a number in a file (an operator's manual target, through Serve's
autoscaling-policy hook), so the last test can shrink it while its streams run. The gRPC ingress runs
two replicas, so a tenant's stream quota is checked across them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

pytestmark = pytest.mark.integration

H = W = 32
STEPS = 1
FPS = 4.0
POOL = "Pipeline-0-tiny"
"""The h100 pool (two replicas)."""


class FileTarget:
    """An operator's manual pool size: the replica count written in a file, as a Serve autoscaling policy."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, ctx) -> tuple[int, dict]:
        return int(Path(self.path).read_text()), dict(ctx.policy_state or {})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
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
    layout = {"h100": 2, "l40s": 1}  # pool class -> replicas
    specs = tuple(PipelineSpec(model="tiny", device="cpu", gpu_type=c, num_cpus=0, replicas=n,
                               max_streams=slots_of(classes[c], PipelineSpec(model="tiny"), (H, W, STEPS)))
                  for c, n in layout.items())
    registry, big_key = TenantRegistry().add_key("big", tier="premium", quota=Quota(max_streams=16))
    registry, small_key = registry.add_key("small", tier="free", quota=Quota(max_streams=1))
    registry, revoked_key = registry.add_key("small")
    registry = registry.revoke(split_key(revoked_key)[0])
    service = ServiceConfig(pipelines=specs, grpc_port=free_port(), http_port=free_port(), stats_interval_s=0.5,
                            tenants=registry, retry_after_s=1.0)
    target = tmp_path_factory.mktemp("fleet") / "h100_replicas"
    target.write_text("2")

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
        for name, spec in zip(service.pipeline_names, specs):
            gpu = classes[spec.gpu_type]
            pooled = spec.replicas > 1
            opts = pipeline_deployment_options(gpu, spec, shape=(H, W, STEPS), autoscale=pooled,
                                               min_replicas=1, max_replicas=spec.replicas,
                                               initial_replicas=spec.replicas)
            opts["name"] = name  # the router addresses pools by ServiceConfig.pipeline_names
            opts["graceful_shutdown_timeout_s"] = 60.0 if pooled else 5.0  # the drain outlasts a stream
            if pooled:
                opts["autoscaling_config"].update(
                    upscale_delay_s=0.5, downscale_delay_s=0.5,
                    policy={"policy_function": f"{__name__}:FileTarget", "policy_kwargs": {"path": str(target)}})
            pipelines[name] = Pipeline.options(**opts).bind(name, spec, service, metrics, None)
        router = Router.options(ray_actor_options={"num_cpus": 0}).bind(service, pipelines, metrics)
        app = Ingress.options(num_replicas=2, ray_actor_options={"num_cpus": 0}).bind(
            service, router, pipelines, metrics)
        serve.run(app, name=service.app_name, route_prefix="/")
        fleet = {"service": service, "pools": dict(zip(service.pipeline_names, layout)), "target": target,
                 "big": big_key, "small": small_key, "revoked": revoked_key}
        asyncio.run(_wait_routable(fleet, 3))
        yield fleet
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
        from cluster.client import channel, metadata
        from protos import weir_pb2_grpc

        self._ch = channel(self.address)
        stub = weir_pb2_grpc.WeirStub(self._ch)
        opts = _opts(self.api_key)

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


def _opts(api_key: str, seed: int = 0):
    from cluster.client import OpenOptions

    return OpenOptions(prompt="a test", height=H, width=W, fps=FPS, num_steps=STEPS, api_key=api_key, seed=seed,
                       ttff_ms=60000, frame_deadline_ms=60000)


def _addr(fleet) -> str:
    return f"localhost:{fleet['service'].grpc_port}"


def _router(fleet):
    from ray import serve

    return serve.get_deployment_handle("Router", fleet["service"].app_name)


async def _refused(fleet, api_key: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Held(_addr(fleet), api_key).open()
    return err.value


async def _wait_routable(fleet, replicas: int, timeout_s: float = 60.0) -> None:
    """Until the router knows `replicas` replicas that take streams (each reported, Serve routes to it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cap = await _router(fleet).capacity.remote()
        if sum(1 for r in cap["replicas"] if r["replica"] != r["pool"] and not r["draining"]) >= replicas:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {replicas} routable replicas after {timeout_s} s: {cap['replicas']}")


async def _wait_idle(fleet, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cap = await _router(fleet).capacity.remote()
        if cap["active_streams"] == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"streams still active after {timeout_s} s")


def _clip(n: int, seed: int) -> list[np.ndarray]:
    from cluster.video import generated_clip

    return list(generated_clip(n, H, W, seed=seed))


def _pool_states() -> Counter:
    from ray import serve

    deployments = serve.status().applications["weir"].deployments
    return Counter({getattr(state, "value", state): n for state, n in deployments[POOL].replica_states.items()})


def test_pipelines_take_the_resources_of_their_node_type(fleet):
    import ray

    free = ray.available_resources()
    assert free.get("weir_gpu_h100", 0) == 0 and free.get("weir_gpu_l40s", 0) == 0, free
    assert ray.cluster_resources()["weir_gpu_h100"] == 2 and ray.cluster_resources()["weir_gpu_l40s"] == 1


def test_streams_fill_each_replica_to_its_capacity_cheapest_class_first(fleet):
    async def run():
        held = [await Held(_addr(fleet), fleet["big"]).open() for _ in range(5)]  # 1 + 2 + 2 slots
        try:
            placement = await _router(fleet).placement.remote()
            first = placement[held[0].stream_id]
            over = await _refused(fleet, fleet["big"])
        finally:
            for h in held:
                await h.cancel()
        return placement, first, over

    placement, first, over = asyncio.run(run())
    assert fleet["pools"][first[0]] == "l40s"  # the cheaper class takes the first stream
    assert Counter(fleet["pools"][pool] for pool, _ in placement.values()) == {"h100": 4, "l40s": 1}
    assert sorted(Counter(placement.values()).values()) == [1, 2, 2]  # every replica full, none over
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota" not in over.details()  # the fleet is full, not the tenant
    assert int(dict(over.trailing_metadata())["retry-after-ms"]) > 0
    asyncio.run(_wait_idle(fleet))


async def _stream_four(fleet, n: int, during=None):
    """Four streams of n frames at once (l40s 1, then the h100 pool's replicas 2 + 1); `during(ids)` runs
    once all four are admitted. Returns (results, placement, what `during` returned)."""
    from cluster.client import stream_frames

    tasks = []
    for i in range(4):  # one at a time, so that placement is deterministic
        tasks.append(asyncio.create_task(stream_frames(_addr(fleet), _clip(n, seed=i), _opts(fleet["big"], i))))
        deadline = time.monotonic() + 20
        while len(await _router(fleet).placement.remote()) < i + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    placement = await _router(fleet).placement.remote()
    extra = await during(list(placement)) if during is not None else None
    return await asyncio.gather(*tasks), placement, extra


def _assert_complete(results, n: int) -> None:
    for r in results:
        assert r.seqs == list(range(n)), r.seqs  # every frame, in order: no call went to another replica
        assert r.server_stats is not None and r.server_stats.frames_out == n
        assert r.server_stats.frames_skipped == 0


def test_streams_keep_to_their_replica_inside_a_pool(fleet):
    from cluster.client import unary
    from protos import weir_pb2

    n = 13

    async def stats_of(ids):  # through either ingress replica: the owner comes from routing stats too
        await asyncio.sleep(1.5)
        return [await unary(_addr(fleet), "GetStreamStats", weir_pb2.GetStreamStatsRequest(stream_id=sid))
                for sid in ids for _ in range(2)]

    results, placement, stats = asyncio.run(_stream_four(fleet, n, stats_of))
    pool_replicas = Counter(rid for pool, rid in placement.values() if pool == POOL)
    assert sorted(pool_replicas.values()) == [1, 2]  # spread over both replicas of the pool
    assert {r.stream_id for r in results} == set(placement)
    _assert_complete(results, n)
    assert all(s.frames_in > 0 for s in stats)
    asyncio.run(_wait_idle(fleet))


def test_tenant_over_quota_is_refused_by_every_ingress_replica(fleet):
    async def run():
        first = await Held(_addr(fleet), fleet["small"]).open()
        try:
            # six tries spread over both ingress replicas: each is refused, the quota is counted once
            overs = [await _refused(fleet, fleet["small"]) for _ in range(6)]
            other = await Held(_addr(fleet), fleet["big"]).open()  # another tenant is not affected
            await other.cancel()
        finally:
            await first.cancel()
        return overs

    overs = asyncio.run(run())
    for over in overs:
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


def test_scaling_the_pool_down_cuts_no_live_stream(fleet):
    """Both replicas of the pool carry streams when its target drops to one: Serve must stop a busy
    replica, which drains — it keeps serving its stream to the last frame, then exits. (Runs last: it
    leaves the pool at one replica.)"""
    n = 32  # 8 s of frames

    async def shrink(ids):
        fleet["target"].write_text("1")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = _pool_states()
            if states["STOPPING"] == 1:
                return states
            await asyncio.sleep(0.1)
        raise AssertionError(f"the pool did not start shrinking: {_pool_states()}")

    results, placement, during = asyncio.run(_stream_four(fleet, n, shrink))
    assert sorted(Counter(rid for pool, rid in placement.values() if pool == POOL).values()) == [1, 2]
    assert during["RUNNING"] == 1 and during["STOPPING"] == 1  # the stopped replica held a live stream
    _assert_complete(results, n)
    deadline = time.monotonic() + 20
    while _pool_states() != Counter({"RUNNING": 1}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pool_states() == Counter({"RUNNING": 1})  # its stream done, the drained replica exited
