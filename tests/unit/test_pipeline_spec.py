"""Which executor a pipeline deployment owns, and the engine's start-up warm-up."""

from __future__ import annotations

import pytest
import torch

from deployments.config import PipelineSpec
from stages.engine import EngineSpec, StreamEngine


def test_graph_executor_on_gpus_inprocess_on_cpu():
    assert PipelineSpec(device="cuda", model="wan-1.3b", dtype="bfloat16").resolved_executor == "graph"
    assert PipelineSpec().resolved_executor == "inprocess"
    assert PipelineSpec(device="cpu", executor="graph").resolved_executor == "graph"


def test_several_gpus_need_the_graph_executor():
    with pytest.raises(ValueError, match="num_gpus=2 needs executor='graph'"):
        PipelineSpec(num_gpus=2)
    with pytest.raises(ValueError, match="executor='cluster'"):
        PipelineSpec(executor="cluster")
    assert PipelineSpec(device="cuda", num_gpus=2).num_gpus == 2


def test_warm_up_leaves_no_stream_behind():
    torch.set_num_threads(1)
    engine = StreamEngine(EngineSpec(model="tiny"))
    assert engine.warm_up(32, 48, steps=(1, 2), vaes=("wan",), chunks=1) > 0
    assert engine.stats().active_streams == 0
    assert engine.components.dit.shards[0].stream_ids == []


def test_executor_warm_up_runs_through_the_protocol_and_leaves_nothing_open(caplog):
    import asyncio

    from cluster.graph import ChainExecutor, LocalChain
    from cluster.plan import build_plan
    from cluster.stage_actor import WorkerOptions
    from deployments.pipeline import warm_up_executor

    torch.set_num_threads(1)
    plan = build_plan(2, model="tiny", device="cpu")
    ex = ChainExecutor(plan, LocalChain.build(plan, WorkerOptions(num_threads=1)))
    ticks: list[tuple[int, float, object]] = []
    assert asyncio.run(warm_up_executor(ex, 32, 48, steps=(1, 2), chunks=3, ticks=ticks)) > 0
    assert asyncio.run(ex.ready_streams()) == []
    assert {rows for rows, _, _ in ticks} == {1, 2} and all(t > 0 for _, t, _ in ticks)
    assert all(times is None for _, _, times in ticks)  # stage times are not measured across actors
    assert not [r for r in caplog.records if "warm-up" in r.getMessage() or "closing" in r.getMessage()]


def test_the_warm_pool_leaves_spare_states_and_times_a_start_up_on_them():
    """warm_up_executor(streams=k) runs k streams per step count at once and closes them: k spare DiT
    states per step count remain for the first clients; the start-up probes open on that pool (each a
    recycled state) and report their start-up cost."""
    import asyncio

    from deployments.pipeline import STARTUP_PROBES, InProcessExecutor, warm_up_executor

    torch.set_num_threads(1)
    engine = StreamEngine(EngineSpec(model="tiny"))
    shard = engine.components.dit.shards[0]
    ex = InProcessExecutor(engine)
    startups: list[float] = []
    ticks: list[tuple[int, float, object]] = []
    asyncio.run(warm_up_executor(ex, 32, 48, steps=(1, 2), vae="wan", chunks=2, ticks=ticks, streams=3,
                                 startups=startups))
    assert engine.stats().active_streams == 0
    assert len(shard.spares) == 6 and shard.stream_ids == []
    assert shard.spares.num_recycled == STARTUP_PROBES == len(startups) and all(s >= 0.0 for s in startups)
    assert {rows for rows, _, _ in ticks} == {1, 2}
    assert ex.graphs_disabled() == 0  # no CUDA-graph runner on the CPU, so none disabled
    core_spec = PipelineSpec(max_streams=4)
    assert core_spec.resolved_warm_streams == 4 and PipelineSpec(max_streams=4, warm_streams=0).resolved_warm_streams == 0
    with pytest.raises(ValueError, match="warm_streams=5"):
        PipelineSpec(max_streams=4, warm_streams=5)


def test_gpu_type_must_name_a_class_and_only_ray_named_types_pin():
    with pytest.raises(ValueError, match="gpu_type"):
        PipelineSpec(device="cuda", gpu_type="")
    assert PipelineSpec(device="cuda", gpu_type="H200").accelerator_type == "H200"
    assert PipelineSpec(device="cuda", gpu_type="unlabelled-NVIDIA-X").accelerator_type is None
    assert PipelineSpec().accelerator_type is None


def test_warm_up_ticks_calibrate_the_profile_the_router_admits_from():
    from deployments.pipeline import PipelineCore, build_engine_executor

    spec = PipelineSpec(model="wan-1.3b", device="cpu", gpu_type="H200", vae="taehv")
    core = PipelineCore("p", spec, build_engine_executor(PipelineSpec()))
    profile = core.scheduler.profile
    before = profile.snapshot().dit_block
    enc_dec = profile.encode_s(1) + profile.decode_s(1)
    # a GPU whose one-row forward takes half the prior's: the prior's shape, scaled by 0.5
    ticks = [(1, enc_dec + 0.5 * 30 * before(1), None)] * 3 + [(2, enc_dec + 0.001, None)] * 3
    assert core.calibrate(ticks) == 3  # one-stream 2-row ticks are cheaper per row: not used
    after = profile.snapshot().dit_block
    assert after.fixed_s == pytest.approx(before.fixed_s / 2) and after.per_item_s == pytest.approx(before.per_item_s / 2)
    assert core.calibrate([(1, 0.0, None)]) == 0  # a tick shorter than encode + decode teaches nothing


def test_measured_stage_times_teach_every_curve_and_the_tick_keeps_its_host_work():
    from deployments.pipeline import PipelineCore, build_engine_executor
    from scheduling.slo import median
    from stages.engine import TickTimes

    spec = PipelineSpec(model="wan-1.3b", device="cpu", gpu_type="H200", vae="taehv")
    core = PipelineCore("p", spec, build_engine_executor(PipelineSpec()))
    profile = core.scheduler.profile
    # stages of 2 + 15 + 4 ms measured in a 25 ms tick: 4 ms of host work, shared out in proportion
    one_row = TickTimes(0.002, 1, 0.015, 1, 0.004, 1)
    two_rows = TickTimes(0.002, 1, 0.025, 2, 0.004, 1)
    assert core.calibrate([(1, 0.025, one_row)] * 3 + [(2, 0.035, two_rows)] * 3) == 6
    scale = 0.025 / 0.021
    assert profile.dit_s(1, 30) == pytest.approx(0.015 * scale)  # only the one-row ticks teach the DiT
    assert profile.encode_s(1) == pytest.approx(median([0.002 * scale] * 3 + [0.002 * 0.035 / 0.031] * 3))
    assert profile.decode_s(1) == pytest.approx(median([0.004 * scale] * 3 + [0.004 * 0.035 / 0.031] * 3))
    # counts that do not match the tick (another stream's prefill ran in it): stage times are not used
    mismatched = TickTimes(0.002, 2, 0.015, 1, 0.004, 1)
    before = profile.snapshot()
    assert core.calibrate([(1, 0.5, mismatched)]) == 1  # the DiT learns from the wall time, not the VAEs
    assert profile.snapshot().encode == before.encode
