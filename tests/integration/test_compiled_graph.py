"""The compiled-graph pipeline on a real local Ray (CPU, shared-memory channels), tiny model, fp32.

One Ray and one 4-actor graph (encode | blocks 0-2 | blocks 2-4 | decode) for the whole module:
  1. two interleaved streams (a prompt change and a steps change included) give exactly the frames
     of the single-process StreamEngine with the same seeds;
  2. a block move between the two shards keeps a live stream bit-identical;
  3. killing a shard actor mid-stream fails that stream with PipelineFailedError, the graph is rebuilt
     with a replacement actor, and a new stream is again bit-identical to the engine.
The references are computed before Ray starts (graph actors busy-poll the 2 cores).
"""

from __future__ import annotations

import asyncio
import os
import pathlib

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

H, W = 32, 48
FRAMES = 13
REPO = pathlib.Path(__file__).resolve().parents[2]


class _EngineAsync:
    """The StreamEngine behind the executor's coroutine API (the reference)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def open_stream(self, sid, params):
        self.engine.open_stream(sid, params)

    async def add_frames(self, sid, frames):
        for seq, f in frames:
            self.engine.add_frame(sid, seq, f)

    async def ready_streams(self):
        return self.engine.ready_streams()

    async def step(self, ids):
        return self.engine.step(ids)

    async def set_prompt(self, sid, prompt):
        self.engine.set_prompt(sid, prompt)

    async def set_steps(self, sid, n):
        return self.engine.set_steps(sid, n)

    async def flush(self, sid):
        return self.engine.flush(sid)

    async def close_stream(self, sid):
        self.engine.close_stream(sid)


def _clip(seed):
    from cluster.video import generated_clip

    return list(generated_clip(FRAMES, H, W, seed=seed))


def _params(prompt, steps, seed):
    from stages.engine import StreamParams

    return StreamParams(prompt=prompt, height=H, width=W, num_steps=steps, seed=seed)


async def _two_streams(ex, prefix=""):
    """Streams a (2 steps) and b (3 steps) interleaved; a prompt change on a, a steps change on b."""
    a, b = prefix + "a", prefix + "b"
    clips = {a: _clip(1), b: _clip(2)}
    out = {a: [], b: []}
    await ex.open_stream(a, _params("a cat", 2, 5))
    await ex.open_stream(b, _params("a dog", 3, 7))
    for i in range(FRAMES):
        await ex.add_frames(a, [(i, clips[a][i])])
        if i % 3 != 2:  # b skips some ticks: ticks of one and of both streams
            await ex.add_frames(b, [(i, clips[b][i])])
        ready = await ex.ready_streams()
        if ready:
            for sid, frames in (await ex.step(sorted(ready))).items():
                out[sid] += frames
        if i == 6:
            await ex.set_prompt(a, "a red fox")
        if i == 8:
            out[b] += await ex.set_steps(b, 2)
    for sid in (a, b):
        out[sid] += await ex.flush(sid)
        await ex.close_stream(sid)
    return {sid[len(prefix):]: frames for sid, frames in out.items()}


async def _one_stream(ex, sid, *, between=None, frames=FRAMES):
    """One stream of `frames` frames, `between(i)` awaited after each frame (a block move, a kill)."""
    clip = _clip(3)
    out = []
    await ex.open_stream(sid, _params("a boat", 2, 9))
    for i in range(frames):
        await ex.add_frames(sid, [(i, clip[i])])
        if sid in await ex.ready_streams():
            out += (await ex.step([sid]))[sid]
        if between is not None:
            await between(i)
    out += await ex.flush(sid)
    await ex.close_stream(sid)
    return out


def _assert_same(ref, got):
    assert [f.seq for f in got] == [f.seq for f in ref]
    for r, g in zip(ref, got):
        assert np.array_equal(r.frame, g.frame), f"frame {r.seq} differs"


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def reference(loop):
    from stages.engine import EngineSpec, StreamEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = _EngineAsync(StreamEngine(EngineSpec(model="tiny")))
        two = loop.run_until_complete(_two_streams(ex))
        one = loop.run_until_complete(_one_stream(ex, "m"))
    finally:
        torch.set_num_threads(threads)
    return {"two": two, "one": one}


@pytest.fixture(scope="module")
def executor(reference, loop):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    import ray

    from cluster.graph import CompiledGraphExecutor
    from cluster.plan import build_plan
    from cluster.stage_actor import WorkerOptions

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ex = None
    try:
        plan = build_plan(4, model="tiny", layout="separate", device="cpu")
        assert plan.spec == "enc|0-2|2-4|dec"
        ex = loop.run_until_complete(
            CompiledGraphExecutor.create(
                plan, options=WorkerOptions(num_threads=1), tick_timeout_s=60, teardown_timeout_s=10,
                actor_start_timeout_s=120,
            )
        )
        yield ex
    finally:
        if ex is not None:
            loop.run_until_complete(ex.close())
        ray.shutdown()


def test_graph_equals_single_process_engine(executor, reference, loop):
    got = loop.run_until_complete(_two_streams(executor))
    assert [f.seq for f in got["a"]] == list(range(FRAMES))
    assert [f.seq for f in got["b"]] == [i for i in range(FRAMES) if i % 3 != 2]
    for sid in ("a", "b"):
        _assert_same(reference["two"][sid], got[sid])


def test_block_move_keeps_a_live_stream_identical(executor, reference, loop):
    from scheduling.block_scheduler import BlockMove

    async def move(i):
        if i == 6:  # mid-stream: shard 1 hands block 2 (weights + KV caches) to shard 0
            plan = await executor.apply_moves([BlockMove(block=2, src=1, dst=0)])
            assert plan.spec == "enc|0-3|3-4|dec"

    got = loop.run_until_complete(_one_stream(executor, "m", between=move))
    _assert_same(reference["one"], got)
    assert executor.plan.shard_ranges == ((0, 3), (3, 4))


def test_dead_shard_fails_the_stream_and_the_graph_is_rebuilt(executor, reference, loop):
    import ray

    from stages.errors import PipelineFailedError

    async def scenario():
        clip = _clip(4)
        await executor.open_stream("victim", _params("a kite", 2, 1))
        for i in range(5):  # prefill + one tick
            await executor.add_frames("victim", [(i, clip[i])])
            if "victim" in await executor.ready_streams():
                await executor.step(["victim"])
        ray.kill(executor.actors[2], no_restart=True)  # the shard holding the last block
        await executor.add_frames("victim", [(i, clip[i]) for i in range(5, 9)])
        with pytest.raises(PipelineFailedError):
            await executor.step(["victim"])
        with pytest.raises(PipelineFailedError):  # the stream stays failed: its state is gone
            await executor.flush("victim")
        await executor.close_stream("victim")
        executor.check_health()
        assert executor.rebuilds == 1
        return await _one_stream(executor, "after")

    got = loop.run_until_complete(asyncio.wait_for(scenario(), 120))
    _assert_same(reference["one"], got)  # the replacement actor built the moved range's weights
