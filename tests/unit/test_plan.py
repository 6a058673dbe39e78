"""Pipeline plans: building from a GPU count (and timings), the compact spec, validation."""

from __future__ import annotations

import pytest

from cluster.plan import PipelinePlan, StagePlacement, build_plan, parse_spec


def test_default_plans_follow_the_reference_split():
    assert build_plan(1, model="wan-1.3b").spec == "enc+0-30+dec"
    two = build_plan(2, model="wan-1.3b")
    assert two.spec == "enc+0-15|15-30+dec"
    assert [s.gpu for s in two.stages] == [0, 1]
    assert two.dtype == "bfloat16" and two.num_gpus == 2 and two.on_gpu
    assert build_plan(4, model="wan-1.3b").shard_ranges == ((0, 8), (8, 16), (16, 23), (23, 30))
    assert build_plan(3, model="wan-14b").shard_ranges == ((0, 14), (14, 27), (27, 40))


def test_separate_layout_and_cpu_plans():
    plan = build_plan(4, model="tiny", layout="separate", device="cpu")
    assert plan.spec == "enc|0-2|2-4|dec"
    assert plan.dtype == "float32" and plan.num_gpus == 0 and not plan.on_gpu
    assert plan.shard_actors == (1, 2)
    assert plan.block_plan.ranges == ((0, 2), (2, 4))
    with pytest.raises(ValueError, match="needs >= 3"):
        build_plan(2, model="tiny", layout="separate")


def test_timings_give_the_optimal_split():
    plan = build_plan(
        2, model="wan-1.3b", block_times_s=[[0.003] * 30, [0.006] * 30], extra_s=[0.02, 0.03]
    )
    assert plan.spec == "enc+0-21|21-30+dec"
    with pytest.raises(ValueError, match="rows"):
        build_plan(2, model="wan-1.3b", block_times_s=[[0.003] * 30])
    with pytest.raises(ValueError, match="needs block_times_s"):
        build_plan(2, model="wan-1.3b", extra_s=[0.0, 0.0])


def test_spec_round_trips_and_json():
    plan = parse_spec("enc|0-10|10-30+dec", model="wan-1.3b", gpu_offset=1)
    assert [s.gpu for s in plan.stages] == [1, 2, 3]
    assert plan.spec == "enc|0-10|10-30+dec"
    assert PipelinePlan.from_json(plan.to_json()) == plan
    moved = plan.with_ranges([(0, 12), (12, 30)])
    assert moved.spec == "enc|0-12|12-30+dec" and plan.spec == "enc|0-10|10-30+dec"
    assert "actor 2  gpu3" in plan.describe()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("enc+0-15|16-30+dec", "contiguous"),
        ("enc+0-15|15-29+dec", "cover"),
        ("0-15|enc+15-30+dec", "first actor must encode"),
        ("enc+0-15+dec|15-30", "last actor must decode"),
        ("enc+0-10|dec|10-30", "last actor must decode"),
        ("enc|0-15|xyz|15-30+dec", "role 'xyz'"),
        ("enc+0-15|15-a+dec", "not 'a-b'"),
        ("enc+0-15|||15-30+dec", "no role"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec, model="wan-1.3b")


def test_placement_validation():
    with pytest.raises(ValueError, match="repeat"):
        PipelinePlan(
            model="tiny",
            stages=(
                StagePlacement(0, 0, encode=True, blocks=(0, 2)),
                StagePlacement(1, 0, blocks=(2, 4), decode=True),
            ),
        )
    with pytest.raises(ValueError, match="mix of CPU and GPU"):
        PipelinePlan(
            model="tiny",
            stages=(
                StagePlacement(0, None, encode=True, blocks=(0, 2)),
                StagePlacement(1, 1, blocks=(2, 4), decode=True),
            ),
        )
    with pytest.raises(ValueError, match="model="):
        build_plan(1, model="wan-7b")
    with pytest.raises(ValueError, match="dtype="):
        build_plan(1, model="tiny", dtype="int8")
    with pytest.raises(ValueError, match="at most 4"):
        build_plan(5, model="tiny", device="cpu")
