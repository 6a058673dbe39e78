"""Weir over Serve's gRPC proxy, end to end, with the real tiny engine on CPU.

One local Ray + Serve for the whole module (starting one costs ~10-20 s on a 2-core box). The pipeline
has 3 stream slots; frames are 32x32 at 4 fps with generous SLOs, so nothing is skipped on a slow box
and every frame must come back. (Admission predicts from the pipeline's measured profile: at 8 fps,
three 2-step streams would load the 2-core box's tiny pipeline past its row-load cap and the third would
rightly be refused.)
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import urllib.request

import grpc
import numpy as np
import pytest

pytestmark = pytest.mark.integration

H = W = 32
FPS = 4.0
SLOTS = 3
COLD_S = 8.0
"""What a shape the pipeline has not run is said to cost (the tiny model's warm-up of one takes a few
seconds on the box): a stream whose TTFF cannot wait for that is refused and the shape warmed up."""


@pytest.fixture(scope="module")
def weir(tmp_path_factory):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from cluster.cli import free_port, init_ray
    from deployments import app as weir_app
    from deployments.config import PipelineSpec, ServiceConfig

    service = ServiceConfig(
        pipelines=(PipelineSpec(model="tiny", device="cpu", max_streams=SLOTS, num_cpus=0, cold_shape_s=COLD_S),),
        grpc_port=free_port(), http_port=free_port(), stats_interval_s=0.5,
        recordings_dir=str(tmp_path_factory.mktemp("recordings")),
    )
    init_ray(num_cpus=2)
    try:
        weir_app.start(service)
        yield service
    finally:
        serve.shutdown()
        ray.shutdown()


def _address(service) -> str:
    return f"localhost:{service.grpc_port}"


def _clip(n: int, seed: int = 0) -> list[np.ndarray]:
    from cluster.video import generated_clip

    return list(generated_clip(n, H, W, seed=seed))


def _opts(**kw):
    from cluster.client import OpenOptions

    base = dict(prompt="a watercolor street", height=H, width=W, fps=FPS, ttff_ms=60000, frame_deadline_ms=60000)
    base.update(kw)
    return OpenOptions(**base)


async def _wait_idle(service, timeout_s: float = 20.0) -> None:
    """Until every stream slot is free again (closed streams released)."""
    from cluster.client import unary
    from protos import weir_pb2

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = await unary(_address(service), "Health", weir_pb2.HealthRequest())
        if health.active_streams == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"streams still active after {timeout_s} s: {health}")


def test_three_concurrent_streams_get_every_frame_in_order(weir):
    from cluster.client import stream_frames

    n = 9

    async def run():
        return await asyncio.gather(*(stream_frames(_address(weir), _clip(n, seed=i), _opts(seed=i))
                                      for i in range(3)))

    results = asyncio.run(run())
    assert len({r.stream_id for r in results}) == 3
    for r in results:
        assert r.seqs == list(range(n)), r.seqs
        assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for _, f in r.frames)
        assert r.server_stats is not None and r.server_stats.frames_out == n
        assert r.server_stats.frames_skipped == 0
        assert 0 < r.open_ms < r.ttff_ms  # the open's reply, then frame 0 sent, then its output
    asyncio.run(_wait_idle(weir))


def test_killed_client_disturbs_no_other_stream(weir):
    from cluster.client import stream_frames

    n = 13

    async def run():
        survivor = asyncio.create_task(stream_frames(_address(weir), _clip(n), _opts()))
        killed = asyncio.create_task(stream_frames(_address(weir), _clip(n, seed=1), _opts(), stop_after=3))
        return await survivor, await killed

    survivor, killed = asyncio.run(run())
    assert survivor.seqs == list(range(n))
    assert killed.sent == 3
    asyncio.run(_wait_idle(weir))  # the killed stream's slot came back


def test_stream_over_capacity_is_refused_with_retry_hint(weir):
    from cluster.client import stream_frames, unary
    from protos import weir_pb2
    from stages.errors import AdmissionRefusedError

    n = 24
    loop_errors = []

    async def run():
        # a refused call must end the client's request side cleanly: no task left failing in the
        # background ("aclose(): asynchronous generator is already running" when gRPC closed a request
        # generator that was waiting inside)
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: loop_errors.append(context))
        holders = [asyncio.create_task(stream_frames(_address(weir), _clip(n, seed=i), _opts()))
                   for i in range(SLOTS)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            health = await unary(_address(weir), "Health", weir_pb2.HealthRequest())
            if health.free_stream_slots == 0:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(AdmissionRefusedError) as refused:
            await stream_frames(_address(weir), _clip(4), _opts())
        # a client that retries at the hint gets in once a slot frees up, and gets its whole stream
        told = []
        waiter = asyncio.create_task(stream_frames(_address(weir), _clip(4), _opts(), retry_for_s=60.0,
                                                   on_refused=lambda err, wait_s: told.append(wait_s)))
        results = await asyncio.gather(*holders)
        waited = await waiter
        await asyncio.sleep(0.5)
        gc.collect()
        return refused.value, results, waited, told

    refused, results, waited, told = asyncio.run(run())
    assert not loop_errors, loop_errors
    assert waited.admission_retries == len(told) >= 1 and all(t > 0 for t in told)
    assert waited.admission_wait_s > 0
    assert waited.seqs == list(range(4))
    rpc_error = refused.__cause__
    assert rpc_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(rpc_error.trailing_metadata())
    assert int(trailing["retry-after-ms"]) > 0
    assert refused.retry_after_s > 0
    for r in results:  # the admitted streams were not slowed into losing frames
        assert r.seqs == list(range(n))
    asyncio.run(_wait_idle(weir))


def test_a_new_resolution_is_warmed_up_for_a_stream_that_cannot_wait_and_admits_its_retry(weir):
    """A stream at a resolution the pipeline has not run, whose TTFF cannot include the compiles (COLD_S),
    is refused with RESOURCE_EXHAUSTED naming the warm-up it started and a hint of its duration; the
    client that retries at the hints is admitted once the replica reports the shape warm, and gets every
    frame. A second stream of that shape is then admitted at once."""
    from cluster.client import stream_frames
    from cluster.video import generated_clip

    h, w, n = 48, 64, 5
    clip = list(generated_clip(n, h, w, seed=3))
    told = []

    async def run():
        first = await stream_frames(_address(weir), clip, _opts(height=h, width=w, ttff_ms=4000), retry_for_s=90.0,
                                    on_refused=lambda err, wait_s: told.append((str(err), wait_s)))
        second = await stream_frames(_address(weir), clip, _opts(height=h, width=w, ttff_ms=4000))
        return first, second

    first, second = asyncio.run(run())
    assert told and f"warms {h}x{w} (wan VAE) up for it" in told[0][0], told
    assert told[0][1] >= COLD_S
    assert first.admission_retries == len(told) and first.seqs == list(range(n))
    assert all(f.shape == (h, w, 3) for _, f in first.frames)
    assert second.admission_retries == 0 and second.seqs == list(range(n))
    asyncio.run(_wait_idle(weir))
    assert _metric(weir, 'weir_shape_warmups_total{gpu_type="cpu",model="tiny"}') >= 1  # counted


def _metric(service, series: str, timeout_s: float = 15.0) -> float:
    """The value of one series on the metrics endpoint, once it is there (pipelines push their stats
    every stats interval)."""
    url = f"http://127.0.0.1:{service.http_port}/metrics"
    deadline = time.monotonic() + timeout_s
    while True:
        for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
            if line.startswith(series + " ") and float(line.split()[-1]) > 0:
                return float(line.split()[-1])
        if time.monotonic() > deadline:
            raise AssertionError(f"{series} not on {url} (or 0) after {timeout_s} s")
        time.sleep(0.5)


def test_corrupt_frame_is_invalid_argument_and_costs_no_other_stream(weir):
    from cluster.client import stream_frames
    from protos import weir_pb2
    from stages.errors import BadFrameError

    n = 13
    corrupt = weir_pb2.ClientMessage(frame=weir_pb2.InputFrame(
        seq=1000, encoding=weir_pb2.JPEG, data=b"\xff\xd8\xff\xe0" + bytes(200)))

    async def run():
        healthy = asyncio.create_task(stream_frames(_address(weir), _clip(n), _opts()))
        bad = asyncio.create_task(stream_frames(_address(weir), _clip(n, seed=2), _opts(),
                                                extra_messages=lambda i: [corrupt] if i == 3 else []))
        with pytest.raises(BadFrameError) as err:
            await bad
        return await healthy, err.value

    healthy, err = asyncio.run(run())
    assert err.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert healthy.seqs == list(range(n))
    asyncio.run(_wait_idle(weir))


def test_unary_rpcs_and_metrics_endpoint(weir):
    from cluster.client import unary
    from protos import weir_pb2
    from stages.errors import StreamNotFoundError

    models = asyncio.run(unary(_address(weir), "ListModels", weir_pb2.ListModelsRequest()))
    assert [m.model for m in models.models] == ["tiny"]
    with pytest.raises(StreamNotFoundError) as missing:
        asyncio.run(unary(_address(weir), "GetStreamStats", weir_pb2.GetStreamStatsRequest(stream_id="nope")))
    assert missing.value.__cause__.code() == grpc.StatusCode.NOT_FOUND

    from cluster.client import stream_frames

    assert asyncio.run(stream_frames(_address(weir), _clip(5), _opts())).seqs == list(range(5))
    url = f"http://127.0.0.1:{weir.http_port}/metrics"
    deadline = time.monotonic() + 15
    while True:  # pipelines push their stats every stats interval
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if 'weir_ttff_seconds_count{gpu_type="cpu",model="tiny",tier="standard"}' in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in ("weir_ttff_seconds_count", "weir_frame_latency_seconds_bucket", "weir_frame_jitter_seconds",
                 "weir_deadline_misses", "weir_frames_skipped", "weir_queue_depth", "weir_active_streams",
                 "weir_admitted_streams", "weir_streams_refused_total", "weir_pipeline_fps", "weir_stage_seconds",
                 "weir_gpu_memory_bytes", "weir_stream_opens_total", "weir_streams_starting",
                 "weir_cuda_graphs_disabled", "weir_slow_ticks_total",
                 "weir_stream_startup_seconds", "weir_shape_warmups_total", "weir_shapes_warming"):
        assert name in text, name
    assert 'weir_ttff_seconds_count{gpu_type="cpu",model="tiny",tier="standard"}' in text
    assert 'weir_stream_opens_total{outcome="refused",tier="standard"}' in text
    for stage in ("step", "executor_step"):  # the whole tick, and the executor's part of it
        assert f'weir_stage_seconds_count{{gpu_type="cpu",model="tiny",stage="{stage}"}}' in text, stage
    assert "stream_id" not in text


def _decode(path) -> tuple[list[np.ndarray], float]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], float(stream.average_rate)


def test_recordings_and_a_blended_prompt_change_over_grpc(weir, tmp_path):
    from cluster.client import (
        fetch_recording,
        set_prompt_message,
        start_recording_message,
        stop_recording_message,
        stream_frames,
    )
    from protos import weir_pb2
    from stages.errors import RecordingNotFoundError

    n = 13

    def controls(i: int) -> list:
        return {1: [start_recording_message()],
                5: [set_prompt_message([("a red fox", 1.0), ("a snowy forest", 1.0)], blend_chunks=2, blend="slerp")],
                9: [stop_recording_message()]}.get(i, [])

    async def run():
        whole = stream_frames(_address(weir), _clip(n), _opts(record=True, seed=1))
        part = stream_frames(_address(weir), _clip(n, seed=2), _opts(prompt="", prompts=(("a cat", 1.0),)),
                             extra_messages=controls)
        return await asyncio.gather(whole, part)

    whole, part = asyncio.run(run())
    started, finished = weir_pb2.RECORDING_STARTED, weir_pb2.RECORDING_FINISHED
    for r in (whole, part):
        assert r.seqs == list(range(n))  # recording and blending cost the stream no frame
        assert [e.state for e in r.recording_events] == [started, finished], r.recording_events
        assert list(r.recordings) == [r.recording_events[1]]  # StreamEnded lists it
    assert whole.recordings[0].frames == n  # recorded from the first output frame to the last
    assert 0 < part.recordings[0].frames <= n
    for r in (whole, part):
        status = r.recordings[0]
        path = tmp_path / f"{status.recording_id}.mp4"
        size = asyncio.run(fetch_recording(_address(weir), status.recording_id, str(path)))
        assert size == status.bytes == path.stat().st_size
        frames, fps = _decode(path)
        assert len(frames) == status.frames and fps == pytest.approx(FPS)
        assert all(f.shape == (H, W, 3) for f in frames)
    with pytest.raises(RecordingNotFoundError) as missing:
        asyncio.run(fetch_recording(_address(weir), "0" * 32, str(tmp_path / "none.mp4")))
    assert missing.value.__cause__.code() == grpc.StatusCode.NOT_FOUND
    asyncio.run(_wait_idle(weir))


def test_a_failing_frame_source_ends_the_stream_with_its_error(weir):
    """The client's frame source failing mid-stream (a camera unplugged) cancels the call and raises
    that error, instead of leaving the client waiting on a server that waits for frames; the stream's
    slot comes back."""
    from cluster.client import stream_frames

    def frames():
        yield from _clip(3)
        raise OSError("camera unplugged")

    async def run():
        with pytest.raises(OSError, match="camera unplugged"):
            await asyncio.wait_for(stream_frames(_address(weir), frames(), _opts()), timeout=60)

    asyncio.run(run())
    asyncio.run(_wait_idle(weir))
