"""The pipeline's batching loop over the real tiny engine, and the router's admission logic. No Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import PipelineSpec, ServiceConfig
from deployments.messages import InFrame, OpenRequest, PipelineStats
from deployments.pipeline import InProcessExecutor, PipelineCore, now_us
from deployments.router import AdmissionController, tick_ms
from stages.errors import AdmissionRefusedError, BadFrameError, SLOUnattainableError, StreamNotFoundError

H = W = 32


@pytest.fixture(scope="module")
def engine():
    import torch

    from stages.engine import EngineSpec, StreamEngine

    torch.set_num_threads(1)
    return StreamEngine(EngineSpec(model="tiny", device="cpu"))


def _req(**kw) -> OpenRequest:
    base = dict(prompt="a watercolor street", height=H, width=W, input_fps=8.0, ttff_ms=60000,
                frame_deadline_ms=60000)
    base.update(kw)
    return OpenRequest(**base)


def _frames(seqs, value: int = 0) -> list[InFrame]:
    return [InFrame(seq=s, frame=np.full((H, W, 3), (value + 10 * s) % 256, np.uint8), capture_ts_us=s,
                    received_ts_us=now_us()) for s in seqs]


async def _collect(core: PipelineCore, sid: str):
    frames, stats = [], None
    async for ev in core.events(sid):
        frames.extend(f.seq for f in ev.frames)
        stats = ev.stats or stats
        assert ev.error is None
    return frames, stats


def _core(engine, **spec_kw) -> PipelineCore:
    spec = PipelineSpec(model="tiny", max_streams=spec_kw.pop("max_streams", 4), num_cpus=0)
    return PipelineCore("p0", spec, InProcessExecutor(engine), service=ServiceConfig(stats_interval_s=0.2))


def test_two_streams_share_the_loop_and_get_every_frame_in_order(engine):
    async def run():
        core = _core(engine)
        await core.open("a", _req(seed=1))
        await core.open("b", _req(seed=2))
        ta = asyncio.create_task(_collect(core, "a"))
        tb = asyncio.create_task(_collect(core, "b"))
        for seq in range(9):
            await core.push("a", _frames([seq]))
            await core.push("b", _frames([seq], value=5))
            await asyncio.sleep(0.01)
        await core.end("a")
        await core.end("b")
        (fa, sa), (fb, sb) = await ta, await tb
        await core.stop()
        return fa, sa, fb, sb, core

    fa, sa, fb, sb, core = asyncio.run(run())
    assert fa == list(range(9)) and fb == list(range(9))
    assert sa.frames_out == 9 and sa.frames_skipped == 0 and sa.ttff_ms > 0
    assert core.load().tick_ms_by_batch, "ticks were measured"
    assert not core.streams


def test_a_vanished_consumer_closes_only_its_stream(engine):
    async def run():
        core = _core(engine)
        await core.open("gone", _req())
        await core.open("stays", _req())
        gone = asyncio.create_task(_collect(core, "gone"))
        stays = asyncio.create_task(_collect(core, "stays"))
        await core.push("gone", _frames(range(3)))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client went away
        await asyncio.gather(gone, return_exceptions=True)
        for seq in range(5):
            await core.push("stays", _frames([seq]))
        await core.end("stays")
        frames, _ = await stays
        with pytest.raises(StreamNotFoundError):
            await core.push("gone", _frames([3]))
        await core.stop()
        return frames, core

    frames, core = asyncio.run(run())
    assert frames == list(range(5))
    assert not engine.has_stream("gone")


def test_frames_that_cannot_meet_their_deadline_are_skipped_and_counted(engine):
    async def run():
        core = _core(engine)
        await core.open("late", _req(frame_deadline_ms=50))
        collected = asyncio.create_task(_collect(core, "late"))
        await core.push("late", _frames([0]))
        await asyncio.sleep(0.3)  # the first frame goes through (never skipped: TTFF)
        core._tick_ms_ema = 10_000.0  # the engine is now predicted far too slow for a 50 ms deadline
        await core.push("late", _frames(range(1, 9)))
        await asyncio.sleep(0.3)
        await core.end("late")
        frames, stats = await collected
        await core.stop()
        return frames, stats

    frames, stats = asyncio.run(run())
    assert frames[0] == 0
    assert stats.frames_skipped >= 1
    assert len(frames) + stats.frames_skipped == 9


def test_bad_frames_and_full_pipelines_are_typed_errors(engine):
    async def run():
        core = _core(engine, max_streams=1)
        await core.open("a", _req())
        with pytest.raises(AdmissionRefusedError):
            await core.open("b", _req())
        await core.push("a", _frames([0, 1]))
        with pytest.raises(BadFrameError, match="seqs must increase"):
            await core.push("a", _frames([1]))
        await core.stop()

    asyncio.run(run())


# ---- admission ------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _controller(max_streams: int = 2) -> tuple[AdmissionController, _Clock]:
    clock = _Clock()
    service = ServiceConfig(pipelines=(PipelineSpec(max_streams=max_streams),), retry_after_s=3.0)
    return AdmissionController(service, clock=clock), clock


def _load(active: list[str], ticks: dict[int, float]) -> PipelineStats:
    return PipelineStats(pipeline="Pipeline-0-tiny", model="tiny", gpu_type="cpu", max_streams=2,
                         active_streams=len(active), active_stream_ids=list(active), tick_ms_by_batch=ticks)


def test_tick_model_interpolates_and_extrapolates():
    st = _load([], {1: 40.0, 4: 100.0})
    assert tick_ms(st, 2) == pytest.approx(60.0)
    assert tick_ms(st, 5) == pytest.approx(120.0)
    assert tick_ms(_load([], {}), 3) == 0.0


def test_slots_then_refusal_with_retry_hint():
    ctl, _ = _controller(max_streams=2)
    assert ctl.admit("s1", _req()).pipeline == "Pipeline-0-tiny"
    ctl.admit("s2", _req())
    with pytest.raises(AdmissionRefusedError) as err:
        ctl.admit("s3", _req())
    assert err.value.retry_after_s == 3.0
    ctl.release("s1")
    ctl.admit("s3", _req())


def test_a_pipeline_that_would_fall_behind_refuses():
    ctl, _ = _controller()
    ctl.update("Pipeline-0-tiny", _load(["x"], {1: 300.0}))  # T(2) ~ 600 ms > 4 frames at 8 fps = 500 ms
    with pytest.raises(AdmissionRefusedError):
        ctl.admit("s1", _req(input_fps=8.0))
    ctl.admit("s2", _req(input_fps=4.0))  # a 1 s chunk interval keeps up


def test_an_slo_below_the_latency_floor_is_unattainable():
    ctl, _ = _controller()
    with pytest.raises(SLOUnattainableError, match="frame deadline"):
        ctl.admit("s1", _req(input_fps=8.0, num_steps=2, frame_deadline_ms=200))  # floor 3/8 + 4/8 s


def test_unconfirmed_reservations_expire():
    ctl, clock = _controller(max_streams=1)
    ctl.admit("s1", _req())
    clock.t += 60
    ctl.update("Pipeline-0-tiny", _load([], {}))  # the pipeline never saw s1: its client vanished
    ctl.admit("s2", _req())
