"""Admission control over replicas of different GPU classes, with hand-built profiles."""

from __future__ import annotations

import pytest

from scheduling.admission import (
    AdmissionConfig,
    AdmissionController,
    ReplicaInfo,
    StreamRequest,
    replica_capacity,
)
from scheduling.batching import (
    BatchingConfig,
    BatchingScheduler,
    BatchMode,
    BatchOutput,
    Chunk,
    StreamSpec,
)
from scheduling.profile import AffineTime, ProfileBook, ShapeKey, StageProfile
from scheduling.slo import StreamSLO
from stages.errors import (
    AdmissionRefusedError,
    BadRequestError,
    SLOUnattainableError,
    StreamExistsError,
    StreamNotFoundError,
)

SHAPE = ShapeKey("wan-1.3b", 512, 512)
BLOCKS = 30


def make_profile(gpu_class: str, scale: float = 1.0) -> StageProfile:
    """A = 0.052 s, B = 0.006 s/row, C = 0.008 s/chunk on the reference GPU; `scale` slows it."""
    return StageProfile(
        gpu_class,
        SHAPE,
        encode=AffineTime(0.010 * scale, 0.003 * scale),
        dit_block=AffineTime(0.001 * scale, 0.0002 * scale),
        decode=AffineTime(0.012 * scale, 0.005 * scale),
    )


def spec(deadline: float = 1.0, ttff: float = 1.0, steps: int = 2, fps: float = 16.0) -> StreamSpec:
    return StreamSpec(num_steps=steps, input_fps=fps, slo=StreamSLO(ttff, deadline))


def controller(*replicas: tuple[str, str, float, float, int]) -> AdmissionController:
    """replicas: (replica_id, gpu_class, speed scale, price, slots)."""
    book = ProfileBook()
    for _, gpu_class, scale, _, _ in replicas:
        if book.find(gpu_class, SHAPE) is None:
            book.put(make_profile(gpu_class, scale))
    ctl = AdmissionController(book)
    for replica_id, gpu_class, _, price, slots in replicas:
        ctl.add_replica(ReplicaInfo(replica_id, gpu_class, SHAPE, BLOCKS, slots, price))
    return ctl


def request(stream_id: str, s: StreamSpec | None = None) -> StreamRequest:
    return StreamRequest(stream_id, SHAPE, s or spec())


def test_worked_example_capacity():
    ctl = controller(("h", "H100", 1.0, 4.0, 16))
    for i in range(6):
        ctl.admit(request(f"s{i}"), now=0.0)
    assert ctl.free_slots("h", spec()) == 3
    assert replica_capacity(make_profile("H100"), BLOCKS, 16, spec()) == 9


def test_refusal_carries_a_retry_hint_and_the_numbers():
    ctl = controller(("h", "H100", 1.0, 4.0, 16))
    for i in range(9):
        ctl.admit(request(f"s{i}"), now=0.0)
    with pytest.raises(AdmissionRefusedError) as err:
        ctl.admit(request("late"), now=1.0, retry_after_s=12.5)
    assert err.value.retry_after_s == 12.5
    (estimate,) = err.value.details["estimates"]
    assert not estimate.fits and estimate.replica_id == "h"
    assert estimate.latency_s > 0.9 or estimate.row_load > 0.85 or "slow" in estimate.reason
    assert "h:" in err.value.message
    # without a hint from the caller, the configured default
    with pytest.raises(AdmissionRefusedError) as err:
        ctl.admit(request("late"), now=1.0)
    assert err.value.retry_after_s == AdmissionConfig().retry_after_s
    assert ctl.stats().refused == 2


def test_slot_cap_refuses():
    ctl = controller(("h", "H100", 1.0, 4.0, 2))
    ctl.admit(request("a"), 0.0)
    ctl.admit(request("b"), 0.0)
    with pytest.raises(AdmissionRefusedError, match="stream slots taken"):
        ctl.admit(request("c"), 0.0)


def test_chooses_the_cheaper_fitting_replica():
    # the smaller GPU is 1.5x slower but a quarter of the price: it is the cheaper home for a stream
    ctl = controller(("h100-0", "H100", 1.0, 4.0, 16), ("l40-0", "L40", 1.5, 1.0, 16))
    decision = ctl.admit(request("a"), 0.0)
    assert decision.replica_id == "l40-0"
    by_id = {e.replica_id: e for e in decision.estimates}
    assert by_id["l40-0"].cost_per_hour < by_id["h100-0"].cost_per_hour
    assert decision.predicted_latency_s <= 0.9 and decision.predicted_ttff_s <= 0.9
    # once the small GPU is full, streams spill to the H100
    placed = [ctl.admit(request(f"s{i}"), 0.0).replica_id for i in range(6)]
    assert "h100-0" in placed
    assert ctl.check_replica("l40-0") == [] and ctl.check_replica("h100-0") == []


def test_admitted_streams_are_protected():
    ctl = controller(("h", "H100", 1.0, 4.0, 16))
    for i in range(7):
        ctl.admit(request(f"tight{i}", spec(deadline=0.8)), 0.0)
    lax = request("lax", spec(deadline=5.0, ttff=5.0))
    with pytest.raises(AdmissionRefusedError) as err:
        ctl.admit(lax, 0.0)
    (estimate,) = err.value.details["estimates"]
    assert estimate.latency_s <= 5.0 * 0.9  # the newcomer itself would be fine ...
    assert estimate.worst_slack_s < 0 or not estimate.fits  # ... but an admitted stream would not
    assert ctl.check_replica("h") == []
    assert len(ctl.streams_on("h")) == 7


def test_tight_deadline_is_admitted_step_by_step():
    ctl = controller(("h", "H100", 0.5, 4.0, 16))
    decision = ctl.admit(request("a", spec(deadline=0.6, steps=3)), 0.0)
    assert decision.mode is BatchMode.STEP_BY_STEP
    decision = ctl.admit(request("b", spec(deadline=2.0, steps=3)), 0.0)
    assert decision.mode is BatchMode.STREAM_BATCH


def test_unattainable_slo_is_not_a_refusal():
    ctl = controller(("h", "H100", 1.0, 4.0, 16), ("l", "L40", 1.5, 1.0, 16))
    with pytest.raises(SLOUnattainableError) as err:
        ctl.admit(request("a", spec(ttff=0.05)), 0.0)  # below the prefill floor of the fastest GPU
    assert "H100" in err.value.message
    with pytest.raises(SLOUnattainableError):
        ctl.admit(request("b", spec(deadline=0.15)), 0.0)  # below the 4-frame chunk's own buffering
    assert ctl.stats().unattainable == 2
    with pytest.raises(BadRequestError):
        ctl.admit(StreamRequest("c", ShapeKey("wan-14b", 512, 512), spec()), 0.0)


def test_affinity_finish_and_replica_lifecycle():
    ctl = controller(("h", "H100", 1.0, 4.0, 16), ("h2", "H100", 1.0, 4.0, 16))
    placed = ctl.admit(request("a"), 0.0).replica_id
    assert ctl.replica_of("a") == placed
    with pytest.raises(StreamExistsError):
        ctl.admit(request("a"), 0.0)
    with pytest.raises(ValueError, match="live streams"):
        ctl.remove_replica(placed)
    ctl.set_draining(placed)
    other = ctl.admit(request("b"), 0.0).replica_id
    assert other != placed and ctl.replica_of("a") == placed  # draining keeps its stream
    assert ctl.free_slots(placed, spec()) == 0
    ctl.finish_stream("a")
    with pytest.raises(StreamNotFoundError):
        ctl.replica_of("a")
    ctl.remove_replica(placed)
    assert [r.replica_id for r in ctl.replicas()] == [other]


def test_admitted_load_meets_every_deadline_in_the_batching_scheduler():
    """Admission's capacity is real: fill a replica to what admission accepts, then run the batching
    scheduler on a GPU that behaves as profiled; no frame misses its deadline."""
    profile = make_profile("H100")
    ctl = AdmissionController(ProfileBook([profile]))
    ctl.add_replica(ReplicaInfo("h", "H100", SHAPE, BLOCKS, 32))
    specs = [spec(deadline=0.9), spec(deadline=1.0), spec(deadline=1.2, steps=3), spec(deadline=1.5, steps=1)]
    admitted: list[tuple[str, StreamSpec]] = []
    for i in range(40):
        s = specs[i % len(specs)]
        try:
            ctl.admit(request(f"s{i}", s), 0.0)
        except AdmissionRefusedError:
            break
        admitted.append((f"s{i}", s))
    assert len(admitted) >= 4

    sched = BatchingScheduler(BatchingConfig(num_blocks=BLOCKS), profile)
    arrivals = []
    for i, (sid, s) in enumerate(admitted):
        t0 = 0.017 * i
        sched.add_stream(sid, s, t0)
        arrivals.append((t0, sid, Chunk(0, (t0,))))
        seq, t = 1, t0 + 1 / s.input_fps
        while t < 8.0:
            frames = tuple(t + k / s.input_fps for k in range(4))
            arrivals.append((frames[-1], sid, Chunk(seq, frames)))
            seq, t = seq + 1, t + 4 / s.input_fps
    arrivals.sort(key=lambda a: a[0])
    now, i = 0.0, 0
    while now < 10.0:
        while i < len(arrivals) and arrivals[i][0] <= now:
            sched.add_chunk(arrivals[i][1], arrivals[i][2])
            i += 1
        plan = sched.schedule(now)
        if plan.is_empty:
            if i < len(arrivals):
                now = arrivals[i][0]
            else:
                for sid, _ in admitted:
                    sched.end_input(sid)
                now += 0.05
            continue
        sched.update_from_output(plan, BatchOutput(plan.plan_id, now, now + plan.predicted_s))
        now += plan.predicted_s
    stats = sched.stats()
    assert stats.deadline_misses == 0
    assert sum(stats.skipped_frames.values()) == 0
    assert all(s.ttff_s is not None and s.ttff_s <= 1.0 for s in stats.streams)


def test_config_names_the_bad_value():
    with pytest.raises(ValueError, match="max_row_load"):
        AdmissionConfig(max_row_load=1.0)
    with pytest.raises(ValueError, match="retry_after_s"):
        AdmissionConfig(retry_after_s=0.0)
    with pytest.raises(ValueError, match="max_streams"):
        ReplicaInfo("r", "H100", SHAPE, BLOCKS, 0)
