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
    assert asyncio.run(warm_up_executor(ex, 32, 48, steps=(1, 2), chunks=1)) > 0
    assert asyncio.run(ex.ready_streams()) == []
    assert not [r for r in caplog.records if "warm-up" in r.getMessage() or "closing" in r.getMessage()]
