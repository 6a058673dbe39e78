"""Two GPU stage actors with NCCL channels (plan enc+0-2 | 2-4+dec, tiny model, fp32) give exactly
the frames of the single-process StreamEngine on one GPU, for two interleaved streams, and across a
block move between the GPUs. Skipped without 2 CUDA GPUs; run with NCCL_NVLS_ENABLE=0.
"""

from __future__ import annotations

import asyncio
import os
import pathlib

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.multi_gpu, pytest.mark.integration]

H, W = 64, 96
FRAMES = 13
REPO = pathlib.Path(__file__).resolve().parents[2]


def _clip(seed):
    from cluster.video import generated_clip

    return list(generated_clip(FRAMES, H, W, seed=seed))


def _params(prompt, steps, seed):
    from stages.engine import StreamParams

    return StreamParams(prompt=prompt, height=H, width=W, num_steps=steps, seed=seed)


def _engine_outputs():
    from stages.engine import EngineSpec, StreamEngine

    torch.backends.cudnn.deterministic = True
    engine = StreamEngine(EngineSpec(model="tiny", device="cuda", dtype="float32"))
    torch.backends.cudnn.benchmark = False  # build_models turns it on
    out = {"a": [], "b": []}
    engine.open_stream("a", _params("a cat", 2, 5))
    engine.open_stream("b", _params("a dog", 3, 7))
    clips = {"a": _clip(1), "b": _clip(2)}
    for i in range(FRAMES):
        for sid in ("a", "b"):
            engine.add_frame(sid, i, clips[sid][i])
        for sid, frames in engine.step(engine.ready_streams()).items():
            out[sid] += frames
    for sid in ("a", "b"):
        out[sid] += engine.flush(sid)
    return out


async def _graph_outputs(ex):
    from scheduling.block_scheduler import BlockMove

    out = {"a": [], "b": []}
    await ex.open_stream("a", _params("a cat", 2, 5))
    await ex.open_stream("b", _params("a dog", 3, 7))
    clips = {"a": _clip(1), "b": _clip(2)}
    for i in range(FRAMES):
        for sid in ("a", "b"):
            await ex.add_frames(sid, [(i, clips[sid][i])])
        for sid, frames in (await ex.step(await ex.ready_streams())).items():
            out[sid] += frames
        if i == 7:  # GPU 1 hands block 2 to GPU 0 mid-stream
            await ex.apply_moves([BlockMove(block=2, src=1, dst=0)])
    for sid in ("a", "b"):
        out[sid] += await ex.flush(sid)
    return out


def test_nccl_pipeline_equals_single_gpu_engine():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    reference = _engine_outputs()
    torch.cuda.empty_cache()

    import ray

    from cluster.graph import CompiledGraphExecutor
    from cluster.plan import build_plan
    from cluster.stage_actor import WorkerOptions

    plan = build_plan(2, model="tiny", device="cuda", dtype="float32")
    assert plan.spec == "enc+0-2|2-4+dec"
    ray.init(include_dashboard=False, log_to_driver=True)
    try:
        from ray.util.placement_group import placement_group

        pg = placement_group([{"GPU": 1, "CPU": 1}] * 2, strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=120)

        async def run():
            ex = await CompiledGraphExecutor.create(
                plan, placement_group=pg, options=WorkerOptions(deterministic=True), transport="nccl",
                tick_timeout_s=120, ring=False,  # one chain per stream, as the engine's default
            )
            try:
                return await _graph_outputs(ex), ex.plan.spec
            finally:
                await ex.close()

        got, spec = asyncio.run(asyncio.wait_for(run(), 600))
    finally:
        ray.shutdown()
    assert spec == "enc+0-3|3-4+dec"
    for sid in ("a", "b"):
        assert [f.seq for f in got[sid]] == [f.seq for f in reference[sid]] == list(range(FRAMES))
        for r, g in zip(reference[sid], got[sid]):
            assert np.array_equal(r.frame, g.frame), f"stream {sid} frame {r.seq} differs"
