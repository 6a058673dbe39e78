"""The pipeline's batching loop (BatchingScheduler over the real tiny engine), and the router's admission
logic (scheduling.admission over pipeline profiles). No Ray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.config import PipelineSpec, ServiceConfig
from deployments.messages import InFrame, OpenRequest, PipelineStats
from deployments.pipeline import InProcessExecutor, PipelineCore, now_us
from deployments.router import RouterAdmission
from scheduling.admission import STARTUP_CHUNKS, Warming
from scheduling.batching import BatchMode
from scheduling.priors import PRIORS, seed_profile
from scheduling.profile import AffineTime, Stage, StageProfile
from stages.config import DIT_PRESETS
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


def _frames(seqs, value: int = 0, age_s: float = 0.0) -> list[InFrame]:
    """Frames received `age_s` ago (a stale frame that waited upstream)."""
    received = now_us() - int(age_s * 1e6)
    return [InFrame(seq=s, frame=np.full((H, W, 3), (value + 10 * s) % 256, np.uint8), capture_ts_us=s,
                    received_ts_us=received) for s in seqs]


async def _collect(core: PipelineCore, sid: str, stats_events: list | None = None):
    frames, stats = [], None
    async for ev in core.events(sid):
        frames.extend(f.seq for f in ev.frames)
        stats = ev.stats or stats
        if ev.stats is not None and stats_events is not None:
            stats_events.append(ev.stats)
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
    assert core.load().warm_shapes == [(H, W, "wan")]  # the shape its streams ran, for admission
    assert not core.streams


class _OneByOne(InProcessExecutor):
    """The executor as it runs on a GPU with CUDA graphs: one step per stream costs the same."""

    forwards_per_stream = True


def test_streams_stepped_one_by_one_get_every_frame_and_the_stage_times_add_up(engine, monkeypatch):
    async def run():
        spec = PipelineSpec(model="tiny", max_streams=4, num_cpus=0)
        executor = _OneByOne(engine)
        calls = []
        step = engine.step

        def recording_step(ids):
            calls.append(list(ids))
            return step(ids)

        monkeypatch.setattr(engine, "step", recording_step)  # what the executor runs in its thread
        core = PipelineCore("p0", spec, executor, service=ServiceConfig(stats_interval_s=0.2))
        await core.open("a", _req(seed=1, input_fps=16.0))
        await core.open("b", _req(seed=2, input_fps=16.0))
        ta = asyncio.create_task(_collect(core, "a"))
        tb = asyncio.create_task(_collect(core, "b"))
        await core.push("a", _frames([0]))
        await core.push("b", _frames([0]))
        await asyncio.sleep(0.5)  # both prefilled: the next chunks arrive together
        warming = core.load().warming  # 8 start-up chunks left each, at 16 fps: 2 s
        assert set(warming) == {"a", "b"} and warming["a"].wall_s == pytest.approx(8 * 4 / 16.0)
        # 16 chunks, paced: the steady curves learn only from the chunks after each stream's start-up
        for first in range(1, 65, 4):
            await core.push("a", _frames(range(first, first + 4)))
            await core.push("b", _frames(range(first, first + 4), value=5))
            await asyncio.sleep(0.25)  # the input rate
        await core.end("a")
        await core.end("b")
        (fa, _), (fb, _) = await ta, await tb
        await core.stop()
        return fa, fb, calls, core

    encode_before = seed_profile("tiny", "cpu").encode_s(1)
    fa, fb, calls, core = asyncio.run(run())
    assert fa == list(range(65)) and fb == list(range(65))
    assert calls and all(len(ids) == 1 for ids in calls)  # never one step over both streams
    assert core.scheduler.profile.encode_s(1) != encode_before  # measured stage times reached the profile


def test_a_stream_start_up_is_timed_into_the_profile(engine):
    async def run():
        core = PipelineCore("p0", PipelineSpec(model="tiny", max_streams=4, num_cpus=0), _OneByOne(engine),
                            service=ServiceConfig(stats_interval_s=0.2))
        await core.open("a", _req(seed=1, num_steps=1, input_fps=16.0))
        ta = asyncio.create_task(_collect(core, "a"))
        for seq in range(1 + 4 * STARTUP_CHUNKS):  # paced at its input rate (faster frames overflow)
            await core.push("a", _frames([seq]))
            await asyncio.sleep(1 / 16)
        await asyncio.sleep(0.5)
        left = core.load().warming
        await core.end("a")
        frames, _ = await ta
        await core.stop()
        return frames, left, core

    frames, left, core = asyncio.run(run())
    assert frames == list(range(1 + 4 * STARTUP_CHUNKS))
    assert left == {}  # its start-up chunks have run
    assert core.scheduler.profile.curve(Stage.STARTUP).num_samples == 1
    # the steady curves learn from no start-up step: of the prefill and 9 chunks, only the last
    # (after the STARTUP_CHUNKS steps of its start-up) is a steady chunk
    for stage in (Stage.ENCODE, Stage.DIT_BLOCK, Stage.DECODE):
        assert core.scheduler.profile.curve(stage).num_samples == 1, stage


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


def test_a_late_chunk_is_skipped_and_reported_to_its_client(engine):
    async def run():
        core = _core(engine)
        await core.open("late", _req(frame_deadline_ms=1500, input_fps=16.0))
        stats_events: list = []
        collected = asyncio.create_task(_collect(core, "late", stats_events))
        await core.push("late", _frames([0]))  # the first chunk is never skipped (TTFF)
        await asyncio.sleep(0.3)
        await core.push("late", _frames(range(1, 5), age_s=5.0))  # waited 5 s upstream: its deadline passed
        await asyncio.sleep(0.3)
        await core.push("late", _frames(range(5, 9)))  # fresh: runs
        await core.end("late")
        frames, stats = await collected
        load = core.load()
        await core.stop()
        return frames, stats, stats_events, load

    frames, stats, stats_events, load = asyncio.run(run())
    assert frames == [0, 5, 6, 7, 8]
    assert stats.frames_skipped == 4 and stats.frames_out == 5
    assert any(st.frames_skipped == 4 for st in stats_events[:-1]), "told before the end of the stream"
    assert load.frames_skipped_total == 4 and load.skipped_by_reason == {"deadline_passed": 4}


def test_a_tight_deadline_puts_a_stream_in_step_by_step_mode(engine):
    async def run():
        core = _core(engine)
        # at 4 fps stream batching needs >= 3/4 s buffering + 1 s for the next chunk: only step by step fits
        await core.open("tight", _req(frame_deadline_ms=1500, input_fps=4.0))
        await core.open("loose", _req(frame_deadline_ms=10_000, input_fps=8.0))
        tight = asyncio.create_task(_collect(core, "tight"))
        loose = asyncio.create_task(_collect(core, "loose"))
        modes = set()
        for seq in range(9):
            await core.push("tight", _frames([seq]))
            await core.push("loose", _frames([seq]))
            await asyncio.sleep(0.02)
            modes.add(core.mode_of("tight"))
        await core.end("tight")
        await core.end("loose")
        (ft, _), (fl, _) = await tight, await loose
        await core.stop()
        return modes, ft, fl

    modes, ft, fl = asyncio.run(run())
    assert modes == {BatchMode.STEP_BY_STEP}
    assert ft == list(range(9)) and fl == list(range(9))


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


def _controller(max_streams: int = 2, retry_after_s: float = 3.0) -> tuple[RouterAdmission, _Clock]:
    clock = _Clock()
    service = ServiceConfig(pipelines=(PipelineSpec(max_streams=max_streams),), retry_after_s=retry_after_s)
    return RouterAdmission(service, clock=clock), clock


def _load(active: list[str], profile: StageProfile | None = None,
          requests: dict[str, OpenRequest] | None = None, max_streams: int = 2,
          warm_shapes: list[tuple[int, int, str]] | None = None,
          warming_shapes: list[tuple[int, int, str]] | None = None) -> PipelineStats:
    return PipelineStats(pipeline="Pipeline-0-tiny", model="tiny", gpu_type="cpu", max_streams=max_streams,
                         active_streams=len(active), active_stream_ids=list(active),
                         active_requests=requests or {},
                         profile=(profile or seed_profile("tiny", "cpu")).snapshot(),
                         warm_shapes=warm_shapes or [], warming_shapes=warming_shapes or [])


def test_every_model_has_a_profile_prior_per_vae():
    assert set(PRIORS) == {(m, v) for m in DIT_PRESETS for v in ("wan", "taehv")}
    for (model, vae), prior in PRIORS.items():
        assert prior.num_blocks == DIT_PRESETS[model].num_layers
        assert prior.shape.model == model and prior.shape.vae == vae
    # TAEHV is priced far below the Wan VAE on GPUs, and slower classes scale every stage
    wan, taehv = seed_profile("wan-1.3b", "H200"), seed_profile("wan-1.3b", "H200", "taehv")
    assert taehv.encode_s(1) + taehv.decode_s(1) < 0.25 * (wan.encode_s(1) + wan.decode_s(1))
    a100 = seed_profile("wan-1.3b", "A100")
    assert a100.dit_s(1, 30) == pytest.approx(2.6 * wan.dit_s(1, 30))


def test_a_confirmed_stream_its_replica_no_longer_has_is_released():
    ctl, _ = _controller(max_streams=2)
    ctl.admit("s1", _req())
    ctl.admit("s2", _req())
    ctl.update("Pipeline-0-tiny", _load(["s1", "s2"]))  # both confirmed: they live until release
    assert ctl.capacity()["active_streams"] == 2
    ctl.update("Pipeline-0-tiny", _load(["s2"]))  # s1 ended on the pipeline, its release was lost
    assert ctl.capacity()["active_streams"] == 1 and set(ctl.placement()) == {"s2"}
    ctl.admit("s3", _req())  # the freed slot is usable again
    ctl.update("Pipeline-0-tiny", _load(["s2"]))  # s3 is still reserved (not yet reported): kept
    assert set(ctl.placement()) == {"s2", "s3"}


def test_the_router_takes_the_start_ups_a_replica_reports_and_keeps_its_own_for_unreported_streams():
    ctl, _ = _controller(max_streams=4)
    ctl.admit("s1", _req())
    key = ctl.placement()["s1"]
    assert set(ctl.admission.warming_on(key)) == {"s1"}  # admitted: starting up, at the profile's cost
    load = _load(["s1"])
    load.warming = {"s1": Warming(0.01, 0.5)}
    ctl.admit("s2", _req())
    ctl.update("Pipeline-0-tiny", load)  # sent before s2 reached the replica
    warming = ctl.admission.warming_on(key)
    assert warming["s1"] == Warming(0.01, 0.5) and "s2" in warming
    load = _load(["s1", "s2"])  # both through their start-up
    ctl.update("Pipeline-0-tiny", load)
    assert ctl.admission.warming_on(key) == {}


def test_a_report_older_than_one_taken_changes_nothing():
    """A pulled report can be answered after a newer pushed one: its stream list is stale."""
    ctl, _ = _controller(max_streams=2)
    ctl.admit("s1", _req())
    ctl.admit("s2", _req())
    newer, older = _load(["s1", "s2"]), _load(["s1"])  # older: built before s2 opened
    newer.report_seq, older.report_seq = 7, 6
    ctl.update("Pipeline-0-tiny", newer)
    ctl.update("Pipeline-0-tiny", older)  # arrives last: ignored, s2 keeps its slot
    assert set(ctl.placement()) == {"s1", "s2"}
    with pytest.raises(AdmissionRefusedError):
        ctl.admit("s3", _req())
    gone = _load(["s2"])  # a newer report without s1: s1 really ended
    gone.report_seq = 8
    ctl.update("Pipeline-0-tiny", gone)
    assert set(ctl.placement()) == {"s2"}


def test_a_restarted_router_adopts_the_streams_its_replicas_run():
    ctl, _ = _controller(max_streams=2)  # a fresh router: it admitted nothing itself
    running = {"s1": _req(tenant="acme"), "s2": _req(tenant="acme")}
    ctl.update("Pipeline-0-tiny", _load(["s1", "s2"], requests=running))
    assert ctl.capacity()["active_streams"] == 2 and set(ctl.placement()) == {"s1", "s2"}
    with pytest.raises(AdmissionRefusedError):  # both slots are really taken
        ctl.admit("s3", _req())
    assert ctl.quota.live_streams("acme") == 2
    ctl.update("Pipeline-0-tiny", _load(["s1", "s2"], requests=running))  # adopted once only
    assert ctl.quota.live_streams("acme") == 2
    ctl.update("Pipeline-0-tiny", _load(["s2"], requests={"s2": running["s2"]}))  # s1 ended meanwhile
    assert set(ctl.placement()) == {"s2"} and ctl.quota.live_streams("acme") == 1
    ctl.release("s2")
    ctl.update("Pipeline-0-tiny", _load(["s2"], requests={"s2": running["s2"]}))  # a report from before
    assert ctl.placement() == {}  # the release: not adopted back


def test_slots_then_refusal_with_retry_hint():
    ctl, _ = _controller(max_streams=2)
    grant = ctl.admit("s1", _req())
    assert grant.pipeline == "Pipeline-0-tiny" and grant.predicted_ttff_ms > 0
    ctl.admit("s2", _req())
    with pytest.raises(AdmissionRefusedError) as err:
        ctl.admit("s3", _req())
    assert err.value.retry_after_s == 3.0
    assert ctl.capacity()["refused_total"] == 1
    ctl.release("s1")
    ctl.admit("s3", _req())


def test_a_pipeline_whose_measured_profile_is_slow_refuses():
    ctl, _ = _controller()
    slow = StageProfile("cpu", PRIORS[("tiny", "wan")].shape, encode=AffineTime(0.02, 0.02),
                        dit_block=AffineTime(0.01, 0.03), decode=AffineTime(0.02, 0.03))
    ctl.update("Pipeline-0-tiny", _load([], slow))
    nominal = dict(height=64, width=64)  # the tiny model's profile shape: work scales 1
    ctl.admit("s1", _req(input_fps=8.0, **nominal))  # row load 2 chunks/s * (2 rows * 4 blocks * 0.03 + 0.05) = 0.58
    with pytest.raises(AdmissionRefusedError, match="row load") as err:
        ctl.admit("s2", _req(input_fps=8.0, **nominal))  # 1.16 > 0.85
    assert err.value.retry_after_s == 3.0
    ctl.admit("s3", _req(input_fps=2.0, **nominal))  # a 2 s chunk period adds only 0.145


def test_a_streams_resolution_sets_its_price():
    """Admission prices a stream by its shape's work on the profile's nominal one (scheduling.priors
    work_scales): with the profile above, a 128x128 stream is more than even an idle replica can run
    (DiT rows x4.61, chunks x4: row load 2 * (0.24 * 4.61 + 0.05 * 4) = 2.61), and two 32x32 streams
    fit where two 64x64 did not (0.14 each, against 0.58)."""
    ctl, _ = _controller()
    slow = StageProfile("cpu", PRIORS[("tiny", "wan")].shape, encode=AffineTime(0.02, 0.02),
                        dit_block=AffineTime(0.01, 0.03), decode=AffineTime(0.02, 0.03))
    ctl.update("Pipeline-0-tiny", _load([], slow))
    with pytest.raises(SLOUnattainableError, match="row load 2.61"):
        ctl.admit("big", _req(input_fps=8.0, height=128, width=128))
    for i in range(2):
        ctl.admit(f"small{i}", _req(input_fps=8.0, height=32, width=32))


def test_a_new_resolution_goes_where_its_compiles_stall_nobody():
    """A stream of a resolution the replica has not run costs its compiles first (cold_shape_s, 5 s
    here), which every stream there waits through: refused beside a stream with 2 s deadlines, a
    stream of the warm resolution still admitted; on an idle replica admitted, its TTFF priced with
    the compiles, and the next stream of that shape waits for them but is not charged them twice."""
    def controller():
        service = ServiceConfig(pipelines=(PipelineSpec(max_streams=3, cold_shape_s=5.0),), retry_after_s=3.0)
        ctl = RouterAdmission(service, clock=_Clock())
        ctl.update("Pipeline-0-tiny", _load([], max_streams=3, warm_shapes=[(32, 32, "wan")]))
        return ctl

    ctl = controller()
    ctl.admit("tight", _req(frame_deadline_ms=2000))
    with pytest.raises(AdmissionRefusedError, match="start-up"):
        ctl.admit("cold", _req(height=48, width=48))
    ctl.admit("warm", _req())
    idle = controller()
    grant = idle.admit("cold", _req(height=48, width=48))
    assert grant.predicted_ttff_ms >= 5000
    # a second stream of that shape waits for the compiles in progress, but is not charged them again
    second = idle.admit("same-shape", _req(height=48, width=48))
    assert grant.predicted_ttff_ms <= second.predicted_ttff_ms < grant.predicted_ttff_ms + 5000


def test_a_cold_shape_the_ttff_cannot_wait_for_is_warmed_up_on_an_idle_replica():
    """A stream whose TTFF (2 s) cannot include its shape's compiles (5 s) but would fit once they are
    done: refused, naming an idle replica to warm the shape up on and a retry hint of the compiles'
    time; a second such stream meanwhile is refused without a second warm-up, its hint when that one
    is through; the replica's report of the shape warm admits the retry. A shape is per VAE kind."""
    clock = _Clock()
    service = ServiceConfig(pipelines=(PipelineSpec(max_streams=3, cold_shape_s=5.0),), retry_after_s=1.0)
    ctl = RouterAdmission(service, clock=clock)
    ctl.update("Pipeline-0-tiny", _load([], max_streams=3, warm_shapes=[(32, 32, "wan")]))
    with pytest.raises(AdmissionRefusedError, match="warms 48x48 \\(wan VAE\\) up for it") as refused:
        ctl.admit("cold", _req(height=48, width=48, ttff_ms=2000))
    assert refused.value.details["warm_up_replica"] == "Pipeline-0-tiny"
    assert refused.value.details["warm_up_shape"] == (48, 48, "wan")
    assert refused.value.retry_after_s == 5.0
    clock.t += 2.0
    with pytest.raises(AdmissionRefusedError, match="compiling shapes") as again:
        ctl.admit("cold-2", _req(height=48, width=48, ttff_ms=2000))
    assert "warm_up_replica" not in again.value.details and again.value.retry_after_s == pytest.approx(3.0)
    # a stream whose TTFF allows the wait for the warm-up in progress is admitted behind it
    patient = ctl.admit("patient", _req(ttff_ms=30000))
    assert patient.predicted_ttff_ms >= 3000
    ctl.release("patient")
    clock.t += 3.0
    ctl.update("Pipeline-0-tiny", _load([], max_streams=3, warm_shapes=[(32, 32, "wan"), (48, 48, "wan")]))
    grant = ctl.admit("cold", _req(height=48, width=48, ttff_ms=2000))
    assert grant.predicted_ttff_ms < 2000
    # the same resolution with the other VAE kind is a shape of its own
    with pytest.raises(AdmissionRefusedError, match="start-up|TTFF"):
        ctl.admit("taehv", _req(height=48, width=48, ttff_ms=2000, vae="taehv"))


def test_a_warm_up_is_asked_only_of_an_idle_replica_and_dropped_when_never_reported():
    clock = _Clock()
    service = ServiceConfig(pipelines=(PipelineSpec(max_streams=3, cold_shape_s=5.0),), retry_after_s=1.0)
    ctl = RouterAdmission(service, clock=clock)
    ctl.update("Pipeline-0-tiny", _load([], max_streams=3, warm_shapes=[(32, 32, "wan")]))
    ctl.admit("busy", _req())
    with pytest.raises(AdmissionRefusedError) as refused:
        ctl.admit("cold", _req(height=48, width=48, ttff_ms=2000))
    assert "warm_up_replica" not in refused.value.details  # its compiles would stall "busy"
    ctl.release("busy")
    ctl.update("Pipeline-0-tiny", _load([], max_streams=3, warm_shapes=[(32, 32, "wan")]))
    with pytest.raises(AdmissionRefusedError) as asked:
        ctl.admit("cold", _req(height=48, width=48, ttff_ms=2000))
    assert asked.value.details["warm_up_shape"] == (48, 48, "wan")
    # reported in progress: kept past the grace; then neither warm nor warming: dropped, asked again
    clock.t += 20.0
    ctl.update("Pipeline-0-tiny", _load([], max_streams=3, warm_shapes=[(32, 32, "wan")],
                                       warming_shapes=[(48, 48, "wan")]))
    assert ctl.admission.warm_ups_on("Pipeline-0-tiny")
    ctl.update("Pipeline-0-tiny", _load([], max_streams=3, warm_shapes=[(32, 32, "wan")]))
    assert not ctl.admission.warm_ups_on("Pipeline-0-tiny")
    with pytest.raises(AdmissionRefusedError) as again:
        ctl.admit("cold", _req(height=48, width=48, ttff_ms=2000))
    assert again.value.details["warm_up_shape"] == (48, 48, "wan")


def test_warm_shape_compiles_a_shape_once_and_reports_it(engine):
    """PipelineCore.warm_shape runs the throwaway streams at the shape, reports it warming meanwhile
    and warm after; a second call for it does nothing more; a shape the executor cannot run stays cold."""
    spec = PipelineSpec(model="tiny", max_streams=2, num_cpus=0)
    core = PipelineCore("p0", spec, InProcessExecutor(engine), service=ServiceConfig(stats_interval_s=0.2))

    async def run():
        task = asyncio.get_running_loop().create_task(core.warm_shape(32, 48, "wan"))
        await asyncio.sleep(0)
        warming = core.load().warming_shapes
        first, second = await task, await core.warm_shape(32, 48, "wan")
        bad = await core.warm_shape(30, 48, "wan")  # not a multiple of 16: the engine refuses it
        return warming, first, second, bad

    warming, first, second, bad = asyncio.run(run())
    assert warming == [(32, 48, "wan")] and first and second and not bad
    assert core.load().warm_shapes == [(32, 48, "wan")] and not core.load().warming_shapes


def test_an_slo_below_the_latency_floor_is_unattainable():
    ctl, _ = _controller()
    with pytest.raises(SLOUnattainableError, match="latency"):
        ctl.admit("s1", _req(input_fps=8.0, num_steps=2, frame_deadline_ms=200))  # buffering alone is 3/8 s


def test_an_unreachable_pipeline_takes_no_stream():
    ctl, _ = _controller()
    ctl.update("Pipeline-0-tiny", None)
    with pytest.raises(AdmissionRefusedError, match="draining"):
        ctl.admit("s1", _req())
    ctl.update("Pipeline-0-tiny", _load([]))
    ctl.admit("s1", _req())


def test_unconfirmed_reservations_expire():
    ctl, clock = _controller(max_streams=1)
    ctl.admit("s1", _req())
    clock.t += 60
    ctl.update("Pipeline-0-tiny", _load([]))  # the pipeline never saw s1: its client vanished
    ctl.admit("s2", _req())
    ctl.update("Pipeline-0-tiny", _load(["s2"]))  # confirmed: kept however long it lives
    clock.t += 60
    ctl.update("Pipeline-0-tiny", _load(["s2"]))
    assert ctl.owner == {"s2": "Pipeline-0-tiny"}


def test_step_each_steps_the_streams_back_to_back_and_reports_each_in_order(engine):
    """The executor steps every listed stream in its own thread without returning to the event loop in
    between; each stream's result reaches the loop, in order, before step_each returns, with the same
    frames as a plain step."""
    from stages.engine import StreamParams

    async def run():
        executor = _OneByOne(engine)
        got, threads = [], []
        for sid in ("p", "q"):
            await executor.open_stream(sid, StreamParams(prompt="x", num_steps=1, height=H, width=W))
            await executor.add_frames(sid, [(0, np.full((H, W, 3), 40, np.uint8))])

        def on_done(sid, frames, tick_times, step_s):
            threads.append(threading.get_ident())
            got.append((sid, [f.seq for f in frames], step_s >= 0))

        await executor.step_each(["p", "q"], on_done)
        seen_before_return = list(got)
        for sid in ("p", "q"):
            await executor.close_stream(sid)
        return got, seen_before_return, threads

    import threading

    got, seen, threads = asyncio.run(run())
    assert got == [("p", [0], True), ("q", [0], True)] and seen == got
    assert set(threads) == {threading.main_thread().ident}  # on the event loop's thread


def test_warm_resolutions_are_warmed_before_clients_and_reported(engine, caplog):
    """A pipeline with warm_resolutions runs a throwaway stream at each before clients arrive and
    reports them as warm (admission then prices no compiles for them); the CLI writes them HxW."""
    import argparse

    from cluster.cli import _resolutions
    from deployments.pipeline import warm_up_pipeline

    spec = PipelineSpec(model="tiny", max_streams=2, num_cpus=0, warm_resolutions=[[32, 48]])
    assert spec.warm_resolutions == ((32, 48),)
    core = PipelineCore("p0", spec, InProcessExecutor(engine), service=ServiceConfig(stats_interval_s=0.2))
    with caplog.at_level("INFO", logger="weir.pipeline"):
        asyncio.run(warm_up_pipeline(core))
    assert core.load().warm_shapes == [(32, 48, "wan")] and not core.streams
    assert any("warmed 32x48" in r.getMessage() for r in caplog.records)
    assert not any("failed" in r.getMessage() for r in caplog.records)
    assert _resolutions("512x512, 720x1280") == ((512, 512), (720, 1280)) and _resolutions("") == ()
    with pytest.raises(argparse.ArgumentTypeError, match="HEIGHTxWIDTH"):
        _resolutions("512")
    with pytest.raises(ValueError, match="multiple of 16"):
        PipelineSpec(warm_resolutions=((500, 832),))


def test_a_stream_of_the_other_vae_kind_is_priced_at_its_kind():
    """On a pipeline whose profile measures TAEHV, a Wan VAE stream's chunks count 5.2 TAEHV chunks
    (the priors' per-chunk ratio), and the other way round; the default kind counts 1."""
    from deployments.pipeline import stream_spec

    on_taehv = stream_spec(_req(vae="wan", height=480, width=832), "wan-1.3b", "taehv")
    assert on_taehv.vae_scale == pytest.approx((0.027 + 0.054) / (0.0065 + 0.009))
    assert on_taehv.dit_scale == 1.0
    on_wan = stream_spec(_req(vae="taehv", height=480, width=832), "wan-1.3b", "wan")
    assert on_wan.vae_scale == pytest.approx(1 / on_taehv.vae_scale)
    assert stream_spec(_req(vae="", height=480, width=832), "wan-1.3b", "taehv").vae_scale == 1.0
    assert stream_spec(_req(vae="wan", height=512, width=512), "wan-1.3b", "wan").vae_scale == pytest.approx(0.6564, abs=1e-4)


def test_a_released_stream_still_closing_on_its_replica_keeps_its_slot():
    """The router released a stream (its client left) that the replica still reports running: its slot
    is not free until the replica lets it go, so a new stream is not granted a slot the replica would
    refuse; once the replica stops reporting it, the slot is free."""
    ctl, _ = _controller(max_streams=2)
    ctl.update("Pipeline-0-tiny", _load([]))
    ctl.admit("a", _req())
    ctl.admit("b", _req())
    ctl.update("Pipeline-0-tiny", _load(["a", "b"]))
    ctl.release("a")
    ctl.update("Pipeline-0-tiny", _load(["a", "b"]))  # "a" is still closing there
    with pytest.raises(AdmissionRefusedError, match="still closing"):
        ctl.admit("c", _req())
    ctl.update("Pipeline-0-tiny", _load(["b"]))
    ctl.admit("c", _req())


class _StallsOnce(InProcessExecutor):
    """The engine stalls once, for 0.6 s, in its `stall_at`-th step (a compile, a collection...)."""

    def __init__(self, engine, stall_at: int) -> None:
        super().__init__(engine)
        self.steps, self.stall_at = 0, stall_at

    def _step_now(self, stream_ids):
        import time

        self.steps += 1
        if self.steps == self.stall_at:
            time.sleep(0.6)
        return super()._step_now(stream_ids)


def test_a_stalled_tick_is_counted_logged_and_costs_no_frame(engine, caplog):
    from deployments.metrics import MetricsExporter

    async def run():
        core = PipelineCore("p0", PipelineSpec(model="tiny", max_streams=4, num_cpus=0),
                            _StallsOnce(engine, stall_at=3), service=ServiceConfig(stats_interval_s=0.2))
        await core.open("a", _req(seed=1))
        task = asyncio.create_task(_collect(core, "a"))
        for first in (0, 1, 5, 9, 13):
            await core.push("a", _frames([first] if first == 0 else range(first, first + 4)))
            await asyncio.sleep(0.05)
        await core.end("a")
        frames, _ = await task
        await core.stop()
        return frames, core.load()

    with caplog.at_level("WARNING", logger="weir.pipeline"):
        frames, stats = asyncio.run(run())
    assert frames == list(range(17))
    assert stats.slow_ticks_total >= 1  # the stall; a slow machine may add its own
    took = [float(r.getMessage().split("a tick took ")[1].split(" ms")[0]) for r in caplog.records
            if "a tick took" in r.getMessage()]
    # one warning per 10 s: the stall's, unless a slow machine's own slow tick came first
    assert took and (max(took) >= 600 or stats.slow_ticks_total > 1), took
    exporter = MetricsExporter()
    exporter.record_pipeline(stats)
    exporter.record_pipeline(stats)  # the same cumulative total again adds nothing
    assert exporter.slow_ticks.labels("tiny", stats.gpu_type)._value.get() == stats.slow_ticks_total
