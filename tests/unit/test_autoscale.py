"""Autoscaling decisions, and a fleet ramp over two GPU classes on a simulated clock."""

from __future__ import annotations

import pytest

from scheduling.admission import replica_capacity
from scheduling.autoscale import (
    AutoscaleConfig,
    Autoscaler,
    FleetSignals,
    FleetSimulator,
    PoolSignals,
    PoolSpec,
    ReplicaLoad,
    SimPool,
)
from scheduling.batching import StreamSpec
from scheduling.profile import AffineTime, ShapeKey, StageProfile
from scheduling.slo import StreamSLO

SHAPE = ShapeKey("wan-1.3b", 512, 512)
BLOCKS = 30
TEMPLATE = StreamSpec(num_steps=2, input_fps=16.0, slo=StreamSLO(1.0, 1.0))


def make_profile(gpu_class: str, scale: float) -> StageProfile:
    return StageProfile(
        gpu_class,
        SHAPE,
        encode=AffineTime(0.010 * scale, 0.003 * scale),
        dit_block=AffineTime(0.001 * scale, 0.0002 * scale),
        decode=AffineTime(0.012 * scale, 0.005 * scale),
    )


def two_pools() -> tuple[PoolSpec, PoolSpec]:
    big = PoolSpec("H100", max_replicas=3, slots_per_replica=8, cost_per_hour=4.0, startup_s=30.0)
    small = PoolSpec("L40", max_replicas=4, slots_per_replica=3, cost_per_hour=1.0, startup_s=30.0)
    return big, small


def test_scale_up_goes_to_the_cheapest_slot_before_anyone_is_refused():
    big, small = two_pools()
    scaler = Autoscaler([big, small], AutoscaleConfig(headroom_slots=2))
    signals = FleetSignals(
        (PoolSignals("H100", (ReplicaLoad("h0", 7, 1),)), PoolSignals("L40", (ReplicaLoad("l0", 2, 0),))),
    )
    decisions = {d.gpu_class: d for d in scaler.decide(signals, now=0.0)}
    assert decisions["L40"].target == 2 and decisions["H100"].target == 1  # 1 free < 2 headroom
    assert decisions["L40"].remove == () and decisions["H100"].remove == ()


def test_worked_example_deficit_and_spill():
    big, small = two_pools()
    scaler = Autoscaler([big, small], AutoscaleConfig(headroom_slots=2))
    # 4 free slots, 5 requests waiting: deficit 3 -> one 3-slot replica
    signals = FleetSignals((PoolSignals("H100", (ReplicaLoad("h0", 4, 4),)),), waiting_requests=5)
    decisions = {d.gpu_class: d for d in scaler.decide(signals, now=0.0)}
    assert (decisions["L40"].current, decisions["L40"].target) == (0, 1)
    # a deficit larger than the small pool's quota spills to the H100 pool
    signals = FleetSignals((PoolSignals("H100", (ReplicaLoad("h0", 8, 0),)),), waiting_requests=20)
    decisions = {d.gpu_class: d for d in scaler.decide(signals, now=0.0)}
    # deficit 2 + 20 - 0 = 22: four 3-slot replicas (12), then two 8-slot ones (16)
    assert decisions["L40"].target == 4 and decisions["H100"].target == 3


def test_scale_down_only_idle_replicas_after_cooldown():
    big, small = two_pools()
    config = AutoscaleConfig(headroom_slots=2, idle_before_removal_s=60.0, scale_down_cooldown_s=120.0)
    scaler = Autoscaler([big, small], config)
    replicas = (
        ReplicaLoad("h0", 3, 5),  # live streams: never removed
        ReplicaLoad("h1", 0, 8, idle_since_s=0.0),
        ReplicaLoad("h2", 0, 8, idle_since_s=150.0),  # not idle long enough at t=200
    )
    signals = FleetSignals(
        (PoolSignals("H100", replicas), PoolSignals("L40", (ReplicaLoad("l0", 0, 3, idle_since_s=0.0),)))
    )
    decisions = {d.gpu_class: d for d in scaler.decide(signals, now=200.0)}
    assert decisions["H100"].remove == ("h1",)
    assert decisions["L40"].remove == ("l0",)
    assert decisions["H100"].target == 2 and decisions["L40"].target == 0
    # right after a scale-up nothing is removed
    scaler.decide(FleetSignals((PoolSignals("H100", (ReplicaLoad("h0", 8, 0),)),)), now=300.0)
    decisions = {d.gpu_class: d for d in scaler.decide(signals, now=310.0)}
    assert decisions["H100"].remove == () and decisions["L40"].remove == ()


def test_scale_down_keeps_headroom_and_minimum():
    big = PoolSpec("H100", max_replicas=3, slots_per_replica=8, min_replicas=1)
    scaler = Autoscaler([big], AutoscaleConfig(headroom_slots=4, scale_down_cooldown_s=0.0))
    replicas = (ReplicaLoad("h0", 0, 8, idle_since_s=0.0), ReplicaLoad("h1", 0, 8, idle_since_s=0.0))
    (decision,) = scaler.decide(FleetSignals((PoolSignals("H100", replicas),)), now=1000.0)
    assert decision.remove == ("h0",) and decision.target == 1  # one kept: the minimum and the headroom


def test_deadline_misses_add_a_replica():
    big, small = two_pools()
    scaler = Autoscaler([big, small], AutoscaleConfig(headroom_slots=0, max_miss_rate=0.01))
    signals = FleetSignals((PoolSignals("H100", (ReplicaLoad("h0", 4, 4),), deadline_miss_rate=0.05),))
    decisions = {d.gpu_class: d for d in scaler.decide(signals, now=0.0)}
    assert decisions["H100"].target == 2 and "miss rate" in decisions["H100"].reason


def test_ramp_to_twenty_streams_over_two_gpu_classes():
    h100, l40 = make_profile("H100", 1.0), make_profile("L40", 1.5)
    h_slots = replica_capacity(h100, BLOCKS, 16, TEMPLATE)
    l_slots = replica_capacity(l40, BLOCKS, 16, TEMPLATE)
    assert h_slots > l_slots >= 1  # different capacities per class
    pools = [
        SimPool(PoolSpec("H100", 3, h_slots, cost_per_hour=4.0, startup_s=30.0), h100, BLOCKS, 16),
        SimPool(
            PoolSpec("L40", 4, l_slots, cost_per_hour=1.0, startup_s=30.0),
            l40,
            BLOCKS,
            16,
            initial_replicas=1,
        ),
    ]
    config = AutoscaleConfig(headroom_slots=2, idle_before_removal_s=60.0, scale_down_cooldown_s=60.0)
    sim = FleetSimulator(pools, SHAPE, TEMPLATE, autoscale=config, decide_every_s=5.0)

    def load(t: float) -> int:  # 1 -> 20 streams over 400 s, held, then gone at 600 s
        return 1 + int(19 * min(1.0, t / 400.0)) if t < 600.0 else 0

    report = sim.run(load, duration_s=1000.0, step_s=1.0)
    assert report.max_live_streams == 20 and report.admitted == 20
    assert report.slo_violations == 0  # no admitted stream's SLO was ever broken
    assert report.dropped_live_streams == 0  # scale-down never touched a live stream
    assert report.refusals == 0  # capacity arrived ahead of the ramp
    assert report.peak_replicas["H100"] >= 1 and report.peak_replicas["L40"] >= 2
    assert sum(report.final_replicas.values()) < sum(report.peak_replicas.values())
    # while streams ran, free capacity never dropped so far that the live count exceeded what was ready
    assert all(live <= 20 for _, live, _ in report.timeline)


def test_fast_ramp_is_refused_then_admitted_with_retry():
    h100 = make_profile("H100", 1.0)
    slots = replica_capacity(h100, BLOCKS, 16, TEMPLATE)
    pools = [SimPool(PoolSpec("H100", 4, slots, cost_per_hour=4.0, startup_s=20.0), h100, BLOCKS, 16, 1)]
    sim = FleetSimulator(pools, SHAPE, TEMPLATE, autoscale=AutoscaleConfig(headroom_slots=1))
    report = sim.run(lambda t: 20, duration_s=120.0)
    assert report.refusals > 0 and report.ever_waited > 0
    assert report.admitted == 20 and report.max_wait_s <= 60.0
    assert report.slo_violations == 0 and report.dropped_live_streams == 0


def test_config_names_the_bad_value():
    with pytest.raises(ValueError, match="headroom_slots"):
        AutoscaleConfig(headroom_slots=-1)
    with pytest.raises(ValueError, match="max_replicas"):
        PoolSpec("H100", max_replicas=0, slots_per_replica=1)
    with pytest.raises(ValueError, match="unique"):
        Autoscaler([PoolSpec("H100", 1, 1), PoolSpec("H100", 1, 1)])


def test_under_churn_the_pool_shrinks_without_stopping_a_busy_replica():
    """Streams of 90 s come and go: the load climbs to 40 and settles at 10. Serve picks which replica a
    scale-down stops (the newest); admission fills the oldest replicas, so the newest are the idle ones."""
    h100 = make_profile("H100", 1.0)
    slots = replica_capacity(h100, BLOCKS, 16, TEMPLATE)
    pools = [SimPool(PoolSpec("H100", 8, slots, cost_per_hour=4.0, startup_s=30.0), h100, BLOCKS, 16, 1)]
    config = AutoscaleConfig(headroom_slots=2, idle_before_removal_s=30.0, scale_down_cooldown_s=60.0)
    sim = FleetSimulator(pools, SHAPE, TEMPLATE, autoscale=config)

    def load(t: float) -> int:
        return int(40 * t / 300) if t < 300 else max(10, 40 - int(30 * (t - 300) / 300))

    report = sim.run(load, duration_s=1500.0, stream_lifetime_s=90.0)
    assert report.slo_violations == 0 and report.dropped_live_streams == 0
    assert report.drained_busy_replicas == 0
    assert report.peak_replicas["H100"] >= 5 and report.final_replicas["H100"] <= 2  # 10 streams of `slots`
    with pytest.raises(ValueError, match="stream_lifetime_s"):
        sim.run(load, duration_s=10.0, stream_lifetime_s=0.0)
