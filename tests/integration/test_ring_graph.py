"""The single-stream ring (W = 2 interleaved stream-batch chains) on the compiled graph: a real local
Ray (CPU, shared-memory channels), tiny model, fp32, the 2-shard graph of test_compiled_graph
(encode | blocks 0-2 | blocks 2-4 | decode), its fixtures reused.

  1. a chains=2 stream (n = 2, a prompt change and a steps change issued while two of its ticks are
     in the graph) next to a chains=1 stream gives exactly the single-process StreamEngine's frames
     with the same chains; two ticks of the ring stream were in the graph at once;
  2. closing a stream with two ticks in flight finishes them and frees it everywhere; then a chains=2
     stream at n = 1 (no buffer dependency, only in-order KV updates) again equals the engine.
The references are computed before Ray starts (graph actors busy-poll the 2 cores).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque

import pytest
import torch

from tests.integration.test_compiled_graph import _assert_same, _EngineAsync, executor, loop  # noqa: F401

pytestmark = pytest.mark.integration

H, W = 32, 48
CHUNKS = 6
"""Chunks of 4 frames after the first frame, per stream."""


def _clip(seed):
    from cluster.video import generated_clip

    return list(generated_clip(1 + 4 * CHUNKS, H, W, seed=seed))


def _params(prompt, steps, seed, chains):
    from stages.engine import StreamParams

    return StreamParams(prompt=prompt, height=H, width=W, num_steps=steps, seed=seed, chains=chains)


def _script(sid, clip, *, controls=()):
    """(sid, op, arg) calls: the first frame and its step, then per chunk its 4 frames and a step;
    `controls` are (after chunk c, op, arg) issued right after that chunk's step."""
    calls = [(sid, "frames", [(0, clip[0])]), (sid, "step", None)]
    for c in range(CHUNKS):
        calls += [(sid, "frames", [(i, clip[i]) for i in range(1 + 4 * c, 5 + 4 * c)]), (sid, "step", None)]
        calls += [(sid, op, arg) for after, op, arg in controls if after == c]
    return calls


def _interleave(*scripts):
    out = []
    for i in range(max(len(s) for s in scripts)):
        out += [s[i] for s in scripts if i < len(s)]
    return out


async def _drive(ex, calls, window=2):
    """Issue the calls in order, each as its own task: up to `window` step calls of a stream at once
    (the executor lets a stream's tick in as soon as its chain is free); a control waits for the
    stream's calls before it. Each stream's frames are collected in call order."""
    out, pending = defaultdict(list), defaultdict(deque)

    async def settle(sid, keep):
        while len(pending[sid]) > keep:
            got = await pending[sid].popleft()
            out[sid] += got or []

    async def call(sid, op, arg):
        if op == "step":
            return (await ex.step([sid]))[sid]
        if op == "prompt":
            return await ex.set_prompt(sid, arg)
        if op == "steps":
            return await ex.set_steps(sid, arg)
        assert op == "flush", op
        return await ex.flush(sid)

    for sid, op, arg in calls:
        if op == "frames":
            await ex.add_frames(sid, arg)
            continue
        pending[sid].append(asyncio.ensure_future(call(sid, op, arg)))
        await settle(sid, window if op == "step" else 0)
    for sid in list(pending):
        await settle(sid, 0)
    return dict(out)


async def _ring_and_single(ex, prefix=""):
    """Stream r: chains=2, n=2, prompt change after chunk 1, steps 2 -> 3 after chunk 3. Stream s:
    chains=1, n=2. Both flushed and closed."""
    r, s = prefix + "r", prefix + "s"
    await ex.open_stream(r, _params("a cat", 2, 5, chains=2))
    await ex.open_stream(s, _params("a dog", 2, 7, chains=1))
    calls = _interleave(
        _script(r, _clip(1), controls=[(1, "prompt", "a red fox"), (3, "steps", 3)]),
        _script(s, _clip(2)),
    )
    out = await _drive(ex, calls + [(r, "flush", None), (s, "flush", None)])
    for sid in (r, s):
        await ex.close_stream(sid)
    return {sid[len(prefix):]: frames for sid, frames in out.items()}


async def _ring_one_step(ex, sid="n1"):
    await ex.open_stream(sid, _params("a boat", 1, 9, chains=2))
    out = await _drive(ex, _script(sid, _clip(3)) + [(sid, "flush", None)])
    await ex.close_stream(sid)
    return out[sid]


@pytest.fixture(scope="module")
def reference(loop):  # noqa: F811 - requested by the reused `executor` fixture: runs before Ray starts
    from stages.engine import EngineSpec, StreamEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = _EngineAsync(StreamEngine(EngineSpec(model="tiny")))
        two = loop.run_until_complete(_ring_and_single(ex))
        one = loop.run_until_complete(_ring_one_step(ex))
    finally:
        torch.set_num_threads(threads)
    return {"two": two, "one": one}


def test_ring_stream_equals_the_engine_with_controls_in_flight(executor, reference, loop):  # noqa: F811
    executor.peak_ticks_in_flight(reset=True)
    got = loop.run_until_complete(asyncio.wait_for(_ring_and_single(executor), 120))
    assert executor.peak_ticks_in_flight() == 2  # two ticks of stream r were in the graph at once
    frames = 1 + 4 * CHUNKS
    for sid in ("r", "s"):
        assert [f.seq for f in got[sid]] == list(range(frames))
        _assert_same(reference["two"][sid], got[sid])


def test_close_with_ticks_in_flight_then_a_one_step_ring_equals_the_engine(executor, reference, loop):  # noqa: F811
    async def close_in_flight():
        clip = _clip(4)
        await executor.open_stream("gone", _params("a kite", 2, 1, chains=2))
        await executor.add_frames("gone", [(i, clip[i]) for i in range(9)])
        await executor.step(["gone"])  # the prefill
        ticks = [asyncio.ensure_future(executor.step(["gone"])) for _ in range(2)]
        close = asyncio.ensure_future(executor.close_stream("gone"))
        await asyncio.sleep(0.05)
        assert not close.done()  # it waits for the ticks in flight
        results = await asyncio.gather(*ticks)
        await close
        assert [f for r in results for f in r["gone"]] == []  # warm-up ticks of both chains
        for actor in range(executor.plan.num_actors):
            assert "gone" not in await executor.chain.call(actor, "stream_ids")
        executor.peak_ticks_in_flight(reset=True)
        out = await _ring_one_step(executor)
        return out, executor.peak_ticks_in_flight()

    got, peak = loop.run_until_complete(asyncio.wait_for(close_in_flight(), 120))
    assert peak == 2
    _assert_same(reference["one"], got)
