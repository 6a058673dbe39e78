"""The stage workers chained in one process (no Ray) equal the single-process engine bit for bit,
including across an in-process block move; the replayed random weights equal the engine's."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from cluster.graph import ChainExecutor, LocalChain
from cluster.plan import build_plan
from cluster.stage_actor import StageWorker, WorkerOptions
from cluster.video import generated_clip
from scheduling.block_scheduler import BlockMove
from stages.config import DIT_PRESETS
from stages.engine import EngineSpec, StreamEngine, StreamParams
from stages.loading import build_dit_shard

H, W = 32, 48
FRAMES = 9


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _frames(out):
    return [(f.seq, f.frame) for f in out]


def _engine_run(clip):
    engine = StreamEngine(EngineSpec(model="tiny"))
    engine.open_stream("s", StreamParams(prompt="a cat", height=H, width=W, num_steps=2, seed=3))
    out = []
    for i, frame in enumerate(clip):
        out += engine.push_frame("s", i, frame)
    return out + engine.flush("s")


async def _chain_run(ex, clip, move_at=None):
    await ex.open_stream("s", StreamParams(prompt="a cat", height=H, width=W, num_steps=2, seed=3))
    out = []
    for i, frame in enumerate(clip):
        await ex.add_frames("s", [(i, frame)])
        if "s" in await ex.ready_streams():
            out += (await ex.step(["s"]))["s"]
        if i == move_at:
            await ex.apply_moves([BlockMove(block=1, src=0, dst=1)])
    out += await ex.flush("s")
    await ex.close_stream("s")
    return out


def test_replayed_shard_weights_equal_the_full_models():
    plan = build_plan(2, model="tiny", device="cpu")
    full = build_dit_shard(DIT_PRESETS["tiny"], None, device=torch.device("cpu"), dtype=torch.float32, seed=0)
    worker = StageWorker(plan, 1, num_threads=1)  # blocks [2, 4) + head
    state = worker.shard.model.state_dict()
    reference = full.model.state_dict()
    assert "blocks.2.ffn.0.weight" in state and "blocks.0.ffn.0.weight" not in state
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key


def test_local_chain_with_a_block_move_equals_the_engine():
    clip = list(generated_clip(FRAMES, H, W, seed=4))
    reference = _engine_run(clip)
    plan = build_plan(2, model="tiny", device="cpu")
    ex = ChainExecutor(plan, LocalChain.build(plan, WorkerOptions(num_threads=1)))
    got = asyncio.run(_chain_run(ex, clip, move_at=4))
    assert ex.plan.spec == "enc+0-1|1-4+dec"
    assert [s for s, _ in _frames(got)] == list(range(FRAMES))
    for (seq, a), (_, b) in zip(_frames(reference), _frames(got)):
        assert np.array_equal(a, b), f"frame {seq} differs"


def test_drifted_stage_times_trigger_a_live_rebalance_that_keeps_the_output():
    from scheduling.block_scheduler import BlockPlan, BlockRebalancer, RebalanceConfig, StageTiming

    clip = list(generated_clip(FRAMES, H, W, seed=4))
    reference = _engine_run(clip)
    plan = build_plan(2, model="tiny", device="cpu")
    ex = ChainExecutor(plan, LocalChain.build(plan, WorkerOptions(num_threads=1, sync_timing=True)))
    rebalancer = BlockRebalancer(BlockPlan(plan.shard_ranges), 0.0,
                                 RebalanceConfig(threshold=0.1, min_interval_s=0.0, min_samples=1))
    for _ in range(8):  # stage 0's GPU has become 4x slower per block (hand-built measurements)
        rebalancer.observe(StageTiming(stage=0, dit_s=0.8, extra_s=0.0))
        rebalancer.observe(StageTiming(stage=1, dit_s=0.2, extra_s=0.0))

    async def run():
        await ex.open_stream("s", StreamParams(prompt="a cat", height=H, width=W, num_steps=2, seed=3))
        out, new_plan = [], None
        for i, frame in enumerate(clip):
            await ex.add_frames("s", [(i, frame)])
            if "s" in await ex.ready_streams():
                out += (await ex.step(["s"]))["s"]
            if i == 4:
                new_plan = await ex.maybe_rebalance(rebalancer, now=100.0)
        out += await ex.flush("s")
        return out, new_plan

    got, new_plan = asyncio.run(run())
    assert new_plan is not None and new_plan.shard_ranges[0][1] < plan.shard_ranges[0][1]
    for (seq, a), (_, b) in zip(_frames(reference), _frames(got)):
        assert np.array_equal(a, b), f"frame {seq} differs after the rebalance"
