"""Admission control over replicas of different GPU classes, with hand-built profiles."""

from __future__ import annotations

import pytest

from scheduling.admission import (
    AdmissionConfig,
    AdmissionController,
    ReplicaInfo,
    StreamRequest,
    Warming,
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
from scheduling.profile import AffineTime, ProfileBook, ShapeKey, Stage, StageProfile
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


def test_a_pool_fills_its_replicas_in_registration_order():
    """Streams pack onto the oldest replicas, so the newest go idle first (the ones Serve stops first)."""
    ctl = controller(("h-0", "H100", 1.0, 4.0, 2), ("h-1", "H100", 1.0, 4.0, 2), ("h-2", "H100", 1.0, 4.0, 2))
    placed = [ctl.admit(request(f"s{i}"), 0.0).replica_id for i in range(5)]
    assert placed == ["h-0", "h-0", "h-1", "h-1", "h-2"]
    ctl.finish_stream("s0")
    assert ctl.admit(request("s5"), 0.0).replica_id == "h-0"  # a freed slot of an older replica first
    ctl.finish_stream("s4")
    assert ctl.streams_on("h-2") == ()  # the newest emptied and stays empty while older ones have room


# ---- the router's view: pools of replicas that report ------------------------------------------------------


def _router(replicas: int = 1, max_streams: int = 2, tenants=None):
    from deployments.config import PipelineSpec, ServiceConfig
    from deployments.router import RouterAdmission

    clock = [100.0]
    service = ServiceConfig(pipelines=(PipelineSpec(max_streams=max_streams, replicas=replicas),), tenants=tenants)
    return RouterAdmission(service, clock=lambda: clock[0]), clock


def _report(replica_id: str, active: tuple[str, ...] = (), *, draining: bool = False, max_streams: int = 2):
    from deployments.messages import PipelineStats

    return PipelineStats(pipeline="Pipeline-0-tiny", model="tiny", gpu_type="cpu", max_streams=max_streams,
                         active_streams=len(active), active_stream_ids=list(active), replica_id=replica_id,
                         draining=draining)


def _open(tenant: str = "default"):
    from deployments.messages import OpenRequest

    return OpenRequest(prompt="p", height=32, width=32, input_fps=4.0, ttff_ms=60000, frame_deadline_ms=60000,
                       tenant=tenant)


def test_router_admits_per_replica_of_a_pool_as_they_report():
    ctl, clock = _router(replicas=2)
    ctl.update("Pipeline-0-tiny", _report("r1"))
    ctl.update("Pipeline-0-tiny", _report("r2"))
    assert {r["replica"] for r in ctl.replicas()} == {"r1", "r2"}  # the pool's stand-in went
    grants = [ctl.admit(f"s{i}", _open()) for i in range(4)]
    assert [(g.pipeline, g.replica) for g in grants] == [("Pipeline-0-tiny", "r1")] * 2 + [("Pipeline-0-tiny", "r2")] * 2
    with pytest.raises(AdmissionRefusedError):  # admitted to the pool only if some replica can hold it
        ctl.admit("s4", _open())
    assert ctl.owner["s3"] == "Pipeline-0-tiny" and ctl.placement()["s3"] == "r2"
    ctl.release("s0")
    ctl.update("Pipeline-0-tiny", _report("r1", ("s1",), draining=True))  # Serve stopped routing to r1
    with pytest.raises(AdmissionRefusedError, match="draining"):
        ctl.admit("s5", _open())
    assert ctl.placement()["s1"] == "r1"  # a draining replica keeps its streams
    ctl.update("Pipeline-0-tiny", _report("r3"))  # a replica the autoscaler added
    assert ctl.admit("s5", _open()).replica == "r3"
    assert ctl.capacity()["healthy_pipelines"] == 2 and ctl.capacity()["pipelines"] == 3


def test_router_forgets_replicas_that_stop_reporting_once_empty():
    from deployments.router import FORGET_AFTER_S, STALE_AFTER_S

    ctl, clock = _router(replicas=2)
    ctl.update("Pipeline-0-tiny", _report("r1"))
    ctl.update("Pipeline-0-tiny", _report("r2"))
    ctl.admit("s0", _open())
    ctl.update("Pipeline-0-tiny", _report("r1", ("s0",)))
    clock[0] += STALE_AFTER_S + 1
    ctl.update("Pipeline-0-tiny", _report("r2"))
    assert ctl.admit("s1", _open()).replica == "r2"  # r1 went silent: no new stream there
    assert ctl.unreported_pools() == []
    clock[0] += FORGET_AFTER_S
    ctl.expire()
    assert {r["replica"] for r in ctl.replicas()} == {"r1", "r2"}  # r1 still holds s0
    ctl.release("s0")
    ctl.expire()
    assert {r["replica"] for r in ctl.replicas()} == {"r2"}
    assert ctl.unreported_pools() == ["Pipeline-0-tiny"]  # r2 is silent too by now: the router pulls


def test_tenant_stream_quota_is_counted_once_at_the_router():
    from deployments.tenants import Quota, TenantRegistry

    registry, _ = TenantRegistry().add_key("small", tier="free", quota=Quota(max_streams=1))
    ctl, clock = _router(max_streams=4, tenants=registry)
    ctl.admit("a", _open("small"))
    with pytest.raises(AdmissionRefusedError, match="quota max_streams=1") as err:
        ctl.admit("b", _open("small"))  # whichever ingress replica asks
    assert err.value.details["quota"] == "max_streams"
    ctl.admit("c", _open("other"))  # names the registry lacks are not limited
    ctl.release("a")
    ctl.admit("b", _open("small"))
    clock[0] += 60  # b's client vanished before opening: its reservation, and its quota, expire
    ctl.update("Pipeline-0-tiny", _report("", ("c",)))
    ctl.admit("d", _open("small"))
    ctl.release("d")
    ctl.release("d")  # idempotent
    assert ctl.quota.live_streams("small") == 0


def test_a_refused_stream_does_not_keep_its_quota():
    from deployments.tenants import Quota, TenantRegistry

    registry, _ = TenantRegistry().add_key("t", quota=Quota(max_streams=2))
    ctl, _ = _router(max_streams=1, tenants=registry)
    ctl.admit("a", _open("t"))
    with pytest.raises(AdmissionRefusedError, match="stream slots"):
        ctl.admit("b", _open("t"))
    assert ctl.quota.live_streams("t") == 1


# ---- affinity inside a pool ------------------------------------------------------------------------------


def test_affinity_table_learns_lists_retains_and_forgets():
    from scheduling.affinity import AffinityTable

    t = [0.0]
    table = AffinityTable(lambda: t[0], unlisted_grace_s=30.0)
    table.learn("a", "r1")
    table.learn("b", "r1")
    table.learn("c", "r2")
    assert table.owner("c") == "r2" and table.owner("x") is None
    table.update_listings({"r1": ["a", "b"], "r2": ["c"], "r3": ["z"]})
    assert table.owner("z") == "r3"  # opened by another caller: known from the listing
    table.update_listings({"r1": ["a", "b"]})  # r2 is no longer advertised: it is stopping
    assert table.owner("c") == "r2" and table.retained({"r1"}) == {"r2"}
    assert table.place({"r1": 1}) == "r1"  # new streams only on advertised replicas
    assert table.forget("c") == "r2" and table.retained({"r1"}) == set()
    table.update_listings({"r1": ["a"]})  # b was listed and no longer is: it ended
    assert table.owner("b") is None and table.owner("a") == "r1"
    table.learn("d", "r1")  # an open that failed: r1 never lists d
    t[0] = 31.0
    table.update_listings({"r1": ["a"]})
    assert table.owner("d") is None
    table.drop_replica("r1")
    assert table.owner("a") is None and len(table) == 0


def test_affinity_places_unnamed_streams_on_the_most_free_slots():
    from scheduling.affinity import AffinityTable

    assert AffinityTable.place({"r1": 1, "r2": 3, "r3": 3}) == "r2"
    assert AffinityTable.place({}) is None
    with pytest.raises(ValueError, match="unlisted_grace_s"):
        AffinityTable(lambda: 0.0, unlisted_grace_s=-1)


def _with_startup(startup_s: float) -> AdmissionController:
    book = ProfileBook()
    base = make_profile("H100")
    book.put(StageProfile("H100", SHAPE, encode=base.curve(Stage.ENCODE).model,
                          dit_block=base.curve(Stage.DIT_BLOCK).model, decode=base.curve(Stage.DECODE).model,
                          startup=AffineTime(startup_s, 0.0)))
    ctl = AdmissionController(book)
    ctl.add_replica(ReplicaInfo("h", "H100", SHAPE, BLOCKS, 16, 4.0))
    return ctl


def test_streams_join_one_after_another_when_start_ups_would_eat_the_admitted_streams_slack():
    # 1 s deadlines, 1-step streams: a stream's latency is about 0.19 + 2 ticks, its slack about 0.55 s;
    # a start-up costs 0.4 s of device work that every stream on the replica waits through
    ctl = _with_startup(0.4)
    one_step = spec(steps=1)
    ctl.admit(request("first", one_step), now=0.0)  # alone: nobody to delay
    assert ctl.warming_on("h")["first"].work_s == pytest.approx(0.4)
    assert ctl.warming_on("h")["first"].wall_s == pytest.approx(9 * 0.25)  # STARTUP_CHUNKS at 16 fps
    ctl.set_warming("h", {})  # the replica reports "first" through its start-up
    ctl.admit(request("second", one_step), now=1.0)  # 0.4 s of start-up fits first's slack
    with pytest.raises(AdmissionRefusedError, match="starting up") as err:
        ctl.admit(request("third", one_step), now=1.1)  # second's 0.4 s + its own 0.4 s do not
    assert err.value.retry_after_s == pytest.approx(9 * 0.25)  # when second is through
    ctl.set_warming("h", {"second": Warming(work_s=0.05, wall_s=0.5)})  # nearly through
    ctl.admit(request("third", one_step), now=2.0)
    assert set(ctl.warming_on("h")) == {"second", "third"}
    ctl.finish_stream("third")
    assert set(ctl.warming_on("h")) == {"second"}


def test_a_report_keeps_the_estimate_of_a_stream_it_does_not_know_yet():
    ctl = _with_startup(0.4)
    ctl.admit(request("a", spec(steps=1)), now=0.0)
    ctl.set_warming("h", {}, keep=["a"])  # a report sent before "a" arrived there
    assert "a" in ctl.warming_on("h")
    ctl.set_warming("h", {"a": Warming(0.1, 1.0)}, keep=["a"])  # the replica's own figure wins
    assert ctl.warming_on("h")["a"] == Warming(0.1, 1.0)


def test_a_cold_shape_is_warmed_on_the_cheapest_idle_replica_and_per_vae_kind():
    """Three replicas, none warm for 480x832 with the Wan VAE, the cheaper class's first one busy: the
    refusal asks the cheaper class's idle one to warm the shape up (its Wan VAE figure, 40 s, not its
    TAEHV one); the retry after its report goes there."""
    book = ProfileBook([make_profile("h100"), make_profile("l40s", 1.5)])
    ctl = AdmissionController(book)
    cold = {"wan": 40.0, "taehv": 8.0}
    for rid, gpu_class, price in (("h-0", "h100", 4.0), ("l-0", "l40s", 1.0), ("l-1", "l40s", 1.0)):
        ctl.add_replica(ReplicaInfo(rid, gpu_class, SHAPE, BLOCKS, 4, price, cold_shape_s=cold))
        ctl.set_warm_shapes(rid, [(512, 512, SHAPE.vae)])
    busy = ctl.admit(StreamRequest("busy", SHAPE, spec(deadline=2.0, ttff=60.0), resolution=(512, 512)), now=0.0)
    assert busy.replica_id == "l-0"
    request = StreamRequest("s", SHAPE, spec(deadline=2.0, ttff=2.0), resolution=(480, 832), vae="wan")
    assert request.warm_key == (480, 832, "wan")
    with pytest.raises(AdmissionRefusedError, match="l-1 warms 480x832") as refused:
        ctl.admit(request, now=0.0)
    assert refused.value.details["warm_up_replica"] == "l-1" and refused.value.retry_after_s == 40.0
    assert ctl.warm_ups_on("l-1") == {(480, 832, "wan"): (0.0, 40.0)}
    assert not ctl.warm_ups_on("h-0") and not ctl.warm_ups_on("l-0")
    ctl.set_warm_shapes("l-1", [(480, 832, "wan")], now=41.0)
    assert not ctl.warm_ups_on("l-1")
    assert ctl.admit(request, now=41.0).replica_id == "l-1"
