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
    ticks: list[tuple[int, float]] = []
    assert asyncio.run(warm_up_executor(ex, 32, 48, steps=(1, 2), chunks=3, ticks=ticks)) > 0
    assert asyncio.run(ex.ready_streams()) == []
    assert {rows for rows, _ in ticks} == {1, 2} and all(t > 0 for _, t in ticks)
    assert not [r for r in caplog.records if "warm-up" in r.getMessage() or "closing" in r.getMessage()]


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
    ticks = [(1, enc_dec + 0.5 * 30 * before(1))] * 3 + [(2, enc_dec + 0.001)] * 3
    assert core.calibrate(ticks) == 3  # one-stream 2-row ticks are cheaper per row: not used
    after = profile.snapshot().dit_block
    assert after.fixed_s == pytest.approx(before.fixed_s / 2) and after.per_item_s == pytest.approx(before.per_item_s / 2)
    assert core.calibrate([(1, 0.0)]) == 0  # a tick shorter than encode + decode teaches nothing
