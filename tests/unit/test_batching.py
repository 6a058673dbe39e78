"""The SLO-aware batching scheduler, driven with hand-built chunks and hand-built forward outputs."""

from __future__ import annotations

import pytest

from scheduling.batching import (
    BatchingConfig,
    BatchingScheduler,
    BatchMode,
    BatchOutput,
    BatchPlan,
    Chunk,
    SkipReason,
    StreamLoad,
    StreamSpec,
    estimate_load,
    predicted_latency_s,
)
from scheduling.profile import AffineTime, ShapeKey, Stage, StageCurve, StageProfile, fit_affine
from scheduling.slo import StreamSLO, chunk_deadline, percentile, summarize
from stages.errors import StreamExistsError, StreamNotFoundError

SHAPE = ShapeKey("wan-1.3b", 512, 512)
BLOCKS = 30
FPS = 16.0


def make_profile(scale: float = 1.0, gpu_class: str = "H100") -> StageProfile:
    """A = 0.052 s per forward, B = 0.006 s per row, C = 0.008 s per chunk (times `scale`)."""
    return StageProfile(
        gpu_class,
        SHAPE,
        encode=AffineTime(0.010 * scale, 0.003 * scale),
        dit_block=AffineTime(0.001 * scale, 0.0002 * scale),
        decode=AffineTime(0.012 * scale, 0.005 * scale),
    )


def chunk(seq: int, first_arrival: float, frames: int = 4) -> Chunk:
    return Chunk(seq, tuple(first_arrival + k / FPS for k in range(frames)))


def spec(num_steps: int = 2, deadline: float = 1.0, ttff: float = 1.0) -> StreamSpec:
    return StreamSpec(num_steps=num_steps, input_fps=FPS, slo=StreamSLO(ttff, deadline))


def execute(sched: BatchingScheduler, plan: BatchPlan, start: float, duration: float | None = None):
    """Run a plan 'on the GPU' for `duration` (default: the profile's prediction) and report it."""
    if duration is None:
        duration = plan.predicted_s
    out = BatchOutput(plan.plan_id, start, start + duration)
    return sched.update_from_output(plan, out), start + duration


def open_prefilled(sched: BatchingScheduler, specs: dict[str, StreamSpec], now: float = 0.0) -> float:
    """Open streams, push each first (1-frame) chunk through its prefill instantly; returns the time."""
    for sid, s in specs.items():
        sched.add_stream(sid, s, now)
        sched.add_chunk(sid, Chunk(0, (now,)))
    for _ in range(10):
        plan = sched.schedule(now)
        if plan.is_empty:
            break
        assert all(w.prefill for w in plan.work)
        execute(sched, plan, now, 0.0)
    assert all(sched.stream_stats(sid).frames_out == 1 for sid in specs)
    return now


def test_first_chunk_is_a_step_by_step_prefill_with_ttff_deadline():
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), make_profile())
    sched.add_stream("a", spec(num_steps=2, ttff=0.8), now=10.0)
    sched.add_chunk("a", Chunk(0, (10.0,)))
    plan = sched.schedule(10.0)
    (work,) = plan.work
    assert work.prefill and work.mode is BatchMode.STEP_BY_STEP
    assert [(r.chunk_seq, r.step) for r in work.rows] == [(0, 0)]
    assert work.deadline_s == pytest.approx(10.8)
    _, now = execute(sched, plan, 10.0, 0.05)
    plan = sched.schedule(now)
    assert [(r.chunk_seq, r.step) for r in plan.work[0].rows] == [(0, 1)]
    assert plan.work[0].emitted == (0,)
    done, now = execute(sched, plan, now, 0.05)
    assert done[0].frames_late == 0
    assert sched.stream_stats("a").ttff_s == pytest.approx(0.1)


def test_a_late_chunk_is_skipped_not_queued_and_counted():
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), make_profile())
    now = open_prefilled(sched, {"a": spec(deadline=0.5)})
    sched.add_chunk("a", chunk(1, first_arrival=now - 2.0))  # its deadline passed 1.5 s ago
    plan = sched.schedule(now)
    assert plan.is_empty
    assert [(s.stream_id, s.chunk_seq, s.reason) for s in plan.skipped] == [
        ("a", 1, SkipReason.DEADLINE_PASSED)
    ]
    stats = sched.stats()
    assert stats.skipped_frames == {SkipReason.DEADLINE_PASSED: 4}
    assert stats.streams[0].skipped_frames == {SkipReason.DEADLINE_PASSED: 4}
    assert stats.queue_depth == 0
    # skips are reported once
    assert sched.schedule(now).skipped == ()


def test_chunk_behind_its_own_backlog_is_skipped_so_the_newest_is_on_time():
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), make_profile())
    open_prefilled(sched, {"a": spec(num_steps=2, deadline=0.45)}, now=0.0)
    now = 1.0
    # four chunks queued, each with ~0.25 s left; one 2-step chunk alone takes 2 forwards of ~0.076 s
    for seq in range(1, 5):
        sched.add_chunk("a", chunk(seq, now - 0.2 + 0.001 * seq))
    plan = sched.schedule(now)
    skipped = {s.chunk_seq: s.reason for s in plan.skipped}
    assert skipped == {2: SkipReason.PREDICTED_LATE, 3: SkipReason.PREDICTED_LATE}
    assert plan.work[0].admitted.seq == 1  # the oldest still fits; the newest is never dropped for backlog
    assert sched.stream_stats("a").queue_depth == 1


def test_batch_grows_while_it_fits():
    config = BatchingConfig(num_blocks=BLOCKS, light_load=0.01, heavy_load=0.02)
    sched = BatchingScheduler(config, make_profile())
    ids = [f"s{i}" for i in range(6)]
    now = open_prefilled(sched, {sid: spec(deadline=1.0) for sid in ids})
    for i, sid in enumerate(ids):
        sched.add_chunk(sid, chunk(1, now + 0.01 * i))
    now += 0.3
    plan = sched.schedule(now)
    assert {w.stream_id for w in plan.work} == set(ids)
    assert all(w.mode is BatchMode.STREAM_BATCH for w in plan.work)
    assert plan.num_rows == 6 and plan.num_admitted == 6
    assert sched.stats().batch_rows_histogram[6] >= 1


def _one_step_candidates(profile: StageProfile, slack: float) -> BatchPlan:
    """Six 1-step streams, each with one chunk queued whose deadline is `slack` after now (chunks
    started 0.2 s ago): each forward admits and finishes its members' chunks."""
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), profile)
    ids = [f"s{i}" for i in range(6)]
    open_prefilled(sched, {sid: spec(num_steps=1, deadline=0.2 + slack) for sid in ids})
    now = 5.0
    for i, sid in enumerate(ids):
        sched.add_chunk(sid, chunk(1, now - 0.2 + 0.0001 * i))
    return sched.schedule(now)


def test_slow_gpu_shrinks_batches():
    sf = BatchingConfig(num_blocks=BLOCKS).safety_factor
    fast, slow = make_profile(1.0), make_profile(1.5)
    slack = sf * fast.tick_s(6, 6, 6, BLOCKS) * 1.01  # all six fit on the fast GPU, just
    fast_plan = _one_step_candidates(fast, slack)
    slow_plan = _one_step_candidates(slow, slack)
    assert len(fast_plan.work) == 6
    largest = max(k for k in range(1, 7) if sf * slow.tick_s(k, k, k, BLOCKS) <= slack)
    assert 1 <= largest < 6
    assert len(slow_plan.work) == largest
    assert slow_plan.skipped == ()  # the others wait for the next forward, they are not dropped


def test_tight_deadline_forces_step_by_step_even_under_heavy_load():
    # light_load tiny: load alone would never choose step by step
    config = BatchingConfig(num_blocks=BLOCKS, light_load=0.01, heavy_load=0.02)
    sched = BatchingScheduler(config, make_profile(0.5))
    # 3 steps at 16 fps: stream batching needs >= 0.1875 + 2 * 0.25 = 0.6875 s > 0.6 s
    now = open_prefilled(
        sched, {"lax": spec(num_steps=3, deadline=2.0), "tight": spec(num_steps=3, deadline=0.6)}
    )
    sched.add_chunk("lax", chunk(1, now))
    sched.add_chunk("tight", chunk(1, now))
    now += 0.1875
    plan = sched.schedule(now)
    assert sched.mode_of("tight") is BatchMode.STEP_BY_STEP
    assert sched.mode_of("lax") is BatchMode.STREAM_BATCH
    # step by step: the tight chunk runs its 3 steps in 3 consecutive forwards and leaves
    steps = []
    for _ in range(3):
        work = {w.stream_id: w for w in plan.work}
        steps.append([(r.chunk_seq, r.step) for r in work["tight"].rows])
        done, now = execute(sched, plan, now)
        plan = sched.schedule(now)
    assert steps == [[(1, 0)], [(1, 1)], [(1, 2)]]
    assert [c.chunk_seq for c in done if c.stream_id == "tight"] == [1]
    assert sched.stream_stats("tight").deadline_misses == 0


def test_light_load_runs_step_by_step_and_heavy_load_stream_batches():
    light = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), make_profile())
    open_prefilled(light, {"a": spec(deadline=1.0)})
    light.add_chunk("a", chunk(1, 0.5))
    light.schedule(0.7)
    assert light.mode_of("a") is BatchMode.STEP_BY_STEP

    heavy = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), make_profile())
    ids = [f"s{i}" for i in range(8)]
    open_prefilled(heavy, {sid: spec(deadline=1.0) for sid in ids})
    for sid in ids:
        heavy.add_chunk(sid, chunk(1, 0.5))
    heavy.schedule(0.7)
    loads = [StreamLoad(spec(), BatchMode.STEP_BY_STEP)] * 8
    assert estimate_load(make_profile(), BLOCKS, loads).utilization > 0.8
    assert all(heavy.mode_of(sid) is BatchMode.STREAM_BATCH for sid in ids)


def test_stream_batch_emits_a_chunk_when_the_next_one_arrives():
    config = BatchingConfig(num_blocks=BLOCKS, light_load=0.01, heavy_load=0.02)
    sched = BatchingScheduler(config, make_profile())
    now = open_prefilled(sched, {"a": spec(num_steps=2, deadline=1.0)})
    sched.add_chunk("a", chunk(1, 0.0625))
    plan = sched.schedule(0.25)
    assert [(r.chunk_seq, r.step) for r in plan.work[0].rows] == [(1, 0)]
    assert plan.work[0].emitted == ()
    _, now = execute(sched, plan, 0.25)
    assert sched.schedule(now).is_empty  # waits for the next chunk to push the buffer along
    assert sched.next_wakeup_s(now) == pytest.approx(0.75)  # unless none comes for two periods
    sched.add_chunk("a", chunk(2, 0.3125))
    plan = sched.schedule(0.5)
    assert [(r.chunk_seq, r.step) for r in plan.work[0].rows] == [(2, 0), (1, 1)]
    assert plan.work[0].emitted == (1,)
    done, _ = execute(sched, plan, 0.5)
    assert [(c.chunk_seq, c.frames_late) for c in done] == [(1, 0)]
    assert done[0].latency_s == pytest.approx(0.5 + plan.predicted_s - 0.0625)


def test_a_paused_stream_is_flushed_at_its_wakeup():
    config = BatchingConfig(num_blocks=BLOCKS, light_load=0.01, heavy_load=0.02)
    sched = BatchingScheduler(config, make_profile())
    open_prefilled(sched, {"a": spec(num_steps=2, deadline=1.0)})
    sched.add_chunk("a", chunk(1, 0.0625))
    _, now = execute(sched, sched.schedule(0.25), 0.25)
    wakeup = sched.next_wakeup_s(now)
    plan = sched.schedule(wakeup)
    assert plan.work[0].admitted is None and plan.work[0].emitted == (1,)
    done, _ = execute(sched, plan, wakeup)
    assert done[0].frames_late == 0
    assert sched.next_wakeup_s(wakeup + 1.0) is None


def test_end_input_flushes_chunks_in_flight():
    config = BatchingConfig(num_blocks=BLOCKS, light_load=0.01, heavy_load=0.02)
    sched = BatchingScheduler(config, make_profile())
    open_prefilled(sched, {"a": spec(num_steps=2, deadline=1.0)})
    sched.add_chunk("a", chunk(1, 0.0625))
    plan = sched.schedule(0.25)
    _, now = execute(sched, plan, 0.25)
    sched.end_input("a")
    plan = sched.schedule(now)
    assert [(r.chunk_seq, r.step) for r in plan.work[0].rows] == [(1, 1)]
    assert plan.work[0].admitted is None and plan.work[0].emitted == (1,)
    execute(sched, plan, now)
    assert not sched.has_work("a")
    with pytest.raises(ValueError, match="input has ended"):
        sched.add_chunk("a", chunk(2, 1.0))


def test_edf_order_and_row_budget():
    config = BatchingConfig(num_blocks=BLOCKS, max_rows=2, light_load=0.99, heavy_load=1.0)
    sched = BatchingScheduler(config, make_profile())
    deadlines = {"late": 0.9, "soon": 0.5, "mid": 0.7}
    now = open_prefilled(sched, {sid: spec(deadline=d) for sid, d in deadlines.items()})
    for sid in deadlines:
        sched.add_chunk(sid, chunk(1, now))
    plan = sched.schedule(now + 0.1875)
    assert [w.stream_id for w in plan.work] == ["soon", "mid"]
    assert [w.deadline_s for w in plan.work] == sorted(w.deadline_s for w in plan.work)
    assert plan.num_rows == 2


def test_backpressure_drops_the_oldest_chunk():
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS, max_queued_chunks=2), make_profile())
    open_prefilled(sched, {"a": spec()})
    dropped = [sched.add_chunk("a", chunk(seq, 0.25 * seq)) for seq in range(1, 6)]
    assert [d.chunk_seq if d else None for d in dropped] == [None, None, 1, 2, 3]
    assert all(d.reason is SkipReason.QUEUE_OVERFLOW for d in dropped if d)
    stats = sched.stream_stats("a")
    assert stats.queue_depth == 2 and stats.skipped_frames == {SkipReason.QUEUE_OVERFLOW: 12}
    plan = sched.schedule(1.3)
    assert [s.chunk_seq for s in plan.skipped][:3] == [1, 2, 3]


def test_measured_durations_feed_the_profile_and_late_frames_count_as_misses():
    profile = make_profile()
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), profile)
    now = open_prefilled(sched, {"a": spec(num_steps=1, deadline=0.5)})
    before = profile.dit_s(1, BLOCKS)
    for seq in range(1, 5):
        sched.add_chunk("a", chunk(seq, now))
        plan = sched.schedule(now + 0.1875)
        out = BatchOutput(plan.plan_id, now + 0.1875, now + 0.9, dit_s=before * 4)
        done = sched.update_from_output(plan, out)
        assert done[0].frames_late == 4  # 0.9 s after arrival > 0.5 s
        now += 1.0
    assert profile.dit_s(1, BLOCKS) == pytest.approx(before * 4)
    assert profile.curve(Stage.DIT_BLOCK).num_samples >= 3
    stats = sched.stats()
    assert stats.deadline_misses == 16
    assert stats.streams[0].latency.miss_rate > 0.9
    with pytest.raises(ValueError, match="not outstanding"):
        sched.update_from_output(plan, out)


def test_streams_in_an_outstanding_plan_are_not_rescheduled():
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), make_profile())
    sched.add_stream("a", spec(), 0.0)
    sched.add_chunk("a", Chunk(0, (0.0,)))
    first = sched.schedule(0.0)
    assert not first.is_empty
    assert sched.schedule(0.0).is_empty
    execute(sched, first, 0.0)
    assert not sched.schedule(0.1).is_empty


def test_stream_lifecycle_errors_and_finish():
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), make_profile())
    sched.add_stream("a", spec(), 0.0)
    with pytest.raises(StreamExistsError):
        sched.add_stream("a", spec(), 0.0)
    with pytest.raises(StreamNotFoundError):
        sched.add_chunk("b", chunk(0, 0.0))
    sched.add_chunk("a", chunk(0, 0.0))
    with pytest.raises(ValueError, match="must exceed"):
        sched.add_chunk("a", chunk(0, 0.0))
    sched.add_chunk("a", chunk(1, 0.25))
    final = sched.finish_stream("a")
    assert final.skipped_frames == {SkipReason.STREAM_FINISHED: 8}
    assert sched.stats().num_streams == 0


def test_every_deadline_met_at_a_load_the_model_accepts():
    """A 10 s closed loop: 8 streams at 16 fps on a GPU that runs exactly as profiled."""
    profile = make_profile()
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), profile)
    ids = [f"s{i}" for i in range(8)]
    arrivals = []
    for i, sid in enumerate(ids):
        t0 = 0.013 * i
        sched.add_stream(sid, spec(num_steps=2, deadline=1.0), t0)
        arrivals.append((t0, sid, Chunk(0, (t0,))))
        seq, t = 1, t0 + 1 / FPS
        while t < 10.0:
            c = chunk(seq, t)
            arrivals.append((c.ready_s, sid, c))
            seq, t = seq + 1, t + 4 / FPS
    arrivals.sort(key=lambda a: a[0])
    now, i = 0.0, 0
    while now < 12.0:
        while i < len(arrivals) and arrivals[i][0] <= now:
            sched.add_chunk(arrivals[i][1], arrivals[i][2])
            i += 1
        plan = sched.schedule(now)
        if plan.is_empty:
            if i < len(arrivals):
                now = arrivals[i][0]
            else:
                for sid in ids:
                    sched.end_input(sid)
                now += 0.05
            continue
        _, now = execute(sched, plan, now)
    stats = sched.stats()
    assert stats.deadline_misses == 0
    assert sum(stats.skipped_frames.values()) == 0
    assert all(s.frames_out == s.frames_in for s in stats.streams)
    assert stats.mean_batch_rows > 4  # streams share forwards
    assert all(s.latency.p99_s <= 1.0 for s in stats.streams)


def test_a_smaller_streams_times_feed_the_profile_at_the_nominal_shape():
    """A stream priced at a quarter of the profile's shape (its rows and chunks at dit_scale and
    vae_scale 0.25) is predicted at a quarter of the nominal per-item work, and the times measured on
    it feed the nominal curves scaled back up: the profile keeps describing its own shape."""
    import dataclasses

    profile = make_profile()
    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), profile)
    small = dataclasses.replace(spec(num_steps=1, deadline=5.0), dit_scale=0.25, vae_scale=0.25)
    now = open_prefilled(sched, {"a": small})
    nominal_dit, nominal_enc = profile.dit_s(1, BLOCKS), profile.encode_s(1)
    for seq in range(1, 5):
        sched.add_chunk("a", chunk(seq, now))
        plan = sched.schedule(now + 0.1875)
        assert plan.predicted_s == pytest.approx(profile.tick_s(0.25, 0.25, 0.25, BLOCKS))
        out = BatchOutput(plan.plan_id, now + 0.1875, now + 0.3, encode_s=nominal_enc * 0.25,
                          dit_s=nominal_dit * 0.25)
        sched.update_from_output(plan, out)
        now += 1.0
    assert profile.dit_s(1, BLOCKS) == pytest.approx(nominal_dit)
    assert profile.encode_s(1) == pytest.approx(nominal_enc)
    assert profile.curve(Stage.DIT_BLOCK).num_samples >= 3


def test_profile_fit_is_robust_and_seeded():
    fit = fit_affine([(1, 0.010), (1, 0.011), (1, 0.500), (2, 0.012), (4, 0.016)])
    assert fit.fixed_s == pytest.approx(0.009333, abs=1e-6) and fit.per_item_s == pytest.approx(
        0.001667, abs=1e-6
    )
    curve = StageCurve(AffineTime(0.01, 0.001))
    assert curve.predict(4) == pytest.approx(0.014) and curve.predict(0) == 0.0
    for _ in range(3):
        curve.observe(4, 0.028)
    assert curve.predict(8) == pytest.approx(0.036)  # the seed's shape, scaled through the measurement
    with pytest.raises(ValueError, match="per_item_s"):
        AffineTime(0.0, -1.0)


def test_slo_statistics_worked_examples():
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    summary = summarize([0.2, 0.6, 0.4, 0.7], 0.5)
    assert (summary.count, summary.p50_s, summary.miss_rate) == (4, pytest.approx(0.5), 0.5)
    assert summary.jitter_mean_s == pytest.approx(0.3)
    assert chunk_deadline((10.0, 10.0625, 10.125, 10.1875), 0.5) == 10.5


def test_predicted_latency_worked_example():
    s = spec(num_steps=2)
    assert predicted_latency_s(s, BatchMode.STREAM_BATCH, 0.05) == pytest.approx(0.5375)
    assert predicted_latency_s(s, BatchMode.STEP_BY_STEP, 0.05) == pytest.approx(0.3375)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": 30, "max_rows": 0}, "max_rows"),
        ({"num_blocks": 30, "safety_factor": 0.5}, "safety_factor"),
        ({"num_blocks": 30, "light_load": 0.9, "heavy_load": 0.8}, "heavy_load"),
        ({"num_blocks": 30, "max_queued_chunks": 0}, "max_queued_chunks"),
    ],
)
def test_config_names_the_bad_value(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BatchingConfig(**kwargs)


def test_stream_spec_validation():
    with pytest.raises(ValueError, match="num_steps"):
        StreamSpec(num_steps=5)
    with pytest.raises(ValueError, match="input_fps"):
        StreamSpec(input_fps=0.0)
    with pytest.raises(ValueError, match="ttff_s"):
        StreamSLO(ttff_s=0.0)
