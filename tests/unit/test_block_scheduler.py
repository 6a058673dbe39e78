"""Splitting DiT blocks over (possibly different) GPUs, and rebalancing a live ring."""

from __future__ import annotations

import itertools
import random

import pytest

from scheduling.block_scheduler import (
    BlockMove,
    BlockPlan,
    BlockRebalancer,
    RebalanceConfig,
    StageTiming,
    block_moves,
    optimal_split,
    reference_split,
    stage_times,
    uniform_block_times,
)

H100_BLOCK, SMALL_BLOCK = 0.003, 0.006
ENCODE, DECODE = 0.020, 0.030


def brute_force_bottleneck(times: list[list[float]], extra: list[float]) -> float:
    num_stages, num_blocks = len(times), len(times[0])
    best = float("inf")
    for cuts in itertools.combinations(range(1, num_blocks), num_stages - 1):
        bounds = (0, *cuts, num_blocks)
        plan = BlockPlan(tuple(zip(bounds, bounds[1:])))
        best = min(best, max(stage_times(plan, times, extra)))
    return best


@pytest.mark.parametrize(
    "num_blocks, num_stages, expected",
    [
        (30, 2, ((0, 15), (15, 30))),
        (30, 4, ((0, 8), (8, 16), (16, 23), (23, 30))),
        (40, 3, ((0, 14), (14, 27), (27, 40))),
        (40, 4, ((0, 10), (10, 20), (20, 30), (30, 40))),
        (31, 2, ((0, 15), (15, 31))),
        (5, 1, ((0, 5),)),
    ],
)
def test_reference_split(num_blocks, num_stages, expected):
    assert reference_split(num_blocks, num_stages).ranges == expected


def test_h100_plus_smaller_gpu_worked_example():
    times = uniform_block_times([H100_BLOCK, SMALL_BLOCK], 30)
    extra = [ENCODE, DECODE]
    reference = stage_times(reference_split(30, 2), times, extra)
    assert reference == pytest.approx((0.065, 0.120))
    best = optimal_split(times, extra)
    assert best.plan.ranges == ((0, 21), (21, 30))
    assert best.stage_times_s == pytest.approx((0.083, 0.084))
    assert best.bottleneck_s == pytest.approx(brute_force_bottleneck(times, extra))
    # the smaller GPU first (it encodes) gets the short range instead
    flipped = optimal_split(uniform_block_times([SMALL_BLOCK, H100_BLOCK], 30), [ENCODE, DECODE])
    assert flipped.plan.counts[0] < flipped.plan.counts[1]


def test_four_gpu_mix_beats_the_reference_split():
    per_block = [H100_BLOCK, H100_BLOCK, SMALL_BLOCK, SMALL_BLOCK]
    times = uniform_block_times(per_block, 30)
    extra = [ENCODE, 0.001, 0.001, DECODE]
    best = optimal_split(times, extra)
    reference = max(stage_times(reference_split(30, 4), times, extra))
    assert best.bottleneck_s < reference
    assert best.bottleneck_s == pytest.approx(brute_force_bottleneck(times, extra))


def test_optimal_matches_brute_force_on_small_cases():
    rng = random.Random(7)
    for _ in range(150):
        num_stages = rng.randint(1, 4)
        num_blocks = rng.randint(num_stages, 9)
        times = [[rng.uniform(0.001, 0.01) for _ in range(num_blocks)] for _ in range(num_stages)]
        extra = [rng.uniform(0.0, 0.03) for _ in range(num_stages)]
        result = optimal_split(times, extra)
        assert result.plan.num_blocks == num_blocks and result.plan.num_stages == num_stages
        assert all(c >= 1 for c in result.plan.counts)
        assert result.bottleneck_s == pytest.approx(brute_force_bottleneck(times, extra), rel=1e-12)


def test_equal_gpus_get_the_most_even_split():
    best = optimal_split(uniform_block_times([0.004] * 4, 30), [0.0] * 4)
    assert sorted(best.plan.counts) == [7, 7, 8, 8]


def test_block_moves_and_plan_helpers():
    old = BlockPlan(((0, 15), (15, 30)))
    new = BlockPlan(((0, 21), (21, 30)))
    assert block_moves(old, new) == tuple(BlockMove(b, 1, 0) for b in range(15, 21))
    assert block_moves(new, old) == tuple(BlockMove(b, 0, 1) for b in range(15, 21))
    assert block_moves(old, old) == ()
    plan = reference_split(30, 4)
    assert plan.owner(20) == 2 and plan.counts == (8, 8, 7, 7)
    with pytest.raises(ValueError, match="contiguous"):
        BlockPlan(((0, 8), (9, 30)))
    with pytest.raises(ValueError, match="outside"):
        plan.owner(30)


def feed(rebalancer: BlockRebalancer, per_block: list[float], extra: list[float], times: int = 5) -> None:
    for _ in range(times):
        for stage, count in enumerate(rebalancer.plan.counts):
            rebalancer.observe(StageTiming(stage, per_block[stage] * count, extra[stage]))


def test_rebalance_triggers_past_threshold_with_the_right_moves():
    config = RebalanceConfig(threshold=0.1, min_interval_s=30.0, min_samples=5)
    rebalancer = BlockRebalancer(reference_split(30, 2), now=0.0, config=config)
    feed(rebalancer, [H100_BLOCK, SMALL_BLOCK], [ENCODE, DECODE])
    assert rebalancer.propose(now=10.0) is None  # too soon after the start
    result = rebalancer.propose(now=31.0)
    assert result is not None
    assert result.plan.ranges == ((0, 21), (21, 30))
    assert result.moves == tuple(BlockMove(b, 1, 0) for b in range(15, 21))
    assert result.measured_bottleneck_s == pytest.approx(0.120)
    assert result.predicted_bottleneck_s == pytest.approx(0.084)
    assert rebalancer.plan == result.plan
    # measured times under the new plan agree with the prediction: nothing more to do
    feed(rebalancer, [H100_BLOCK, SMALL_BLOCK], [ENCODE, DECODE])
    assert rebalancer.propose(now=100.0) is None


def test_rebalance_ignores_drift_within_threshold():
    config = RebalanceConfig(threshold=0.1, min_interval_s=0.0, min_samples=3)
    rebalancer = BlockRebalancer(reference_split(30, 2), now=0.0, config=config)
    # stage 1 is 5% slower per block: the best split wins less than 10%
    feed(rebalancer, [0.004, 0.0042], [0.0, 0.0], times=3)
    assert rebalancer.propose(now=1.0) is None
    # then it drifts to 40% slower: past the threshold
    feed(rebalancer, [0.004, 0.0056], [0.0, 0.0], times=8)
    result = rebalancer.propose(now=2.0)
    assert result is not None and result.plan.counts[0] > 15
    assert all(m.src == 1 and m.dst == 0 for m in result.moves)


def test_rebalance_waits_for_samples_and_validates():
    rebalancer = BlockRebalancer(reference_split(30, 2), now=0.0, config=RebalanceConfig(min_interval_s=0.0))
    rebalancer.observe(StageTiming(0, 0.045, ENCODE))
    assert rebalancer.propose(now=100.0) is None
    with pytest.raises(ValueError, match="stage 2"):
        rebalancer.observe(StageTiming(2, 0.01))
    with pytest.raises(ValueError, match="threshold"):
        RebalanceConfig(threshold=0.0)


def test_optimal_split_validates_inputs():
    with pytest.raises(ValueError, match="cannot give"):
        optimal_split(uniform_block_times([0.001] * 3, 2), [0.0] * 3)
    with pytest.raises(ValueError, match="extra_s"):
        optimal_split(uniform_block_times([0.001] * 2, 4), [0.0])
    with pytest.raises(ValueError, match="W <= L"):
        reference_split(3, 4)
