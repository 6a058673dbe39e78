"""Prompt blending and weighted prompts on the tiny model: the interpolation itself, the engine's
per-chunk blend, typed errors, and the stage workers chained in one process equal to the engine."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from cluster.video import generated_clip
from stages.engine import EngineSpec, StreamEngine, StreamParams
from stages.errors import BadRequestError, StreamNotFoundError
from stages.prompt_blend import PromptBlend, interpolate, mix_embeddings
from stages.prompts import MAX_BLEND_CHUNKS, MAX_PROMPTS, PromptMix, WeightedPrompt

H, W = 32, 48
OLD, NEW = "a cat on a sofa", "a dog in the snow"


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the chained workers run on one thread; equal results need the same
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine():
    return StreamEngine(EngineSpec(model="tiny"))


def _mix(*pairs, mode="linear") -> PromptMix:
    return PromptMix(tuple(WeightedPrompt(t, w) for t, w in pairs), mode)


def _cross_kv(engine, sid):
    return engine.components.dit.shards[0].state(sid).cross_kv


def _push_chunk(engine, sid, clip, seq):
    """Push the 4 frames of one chunk from `seq` on; returns the next seq."""
    for i in range(seq, seq + 4):
        engine.push_frame(sid, i, clip[i % len(clip)])
    return seq + 4


# ---- the interpolation ------------------------------------------------------------------------------


def test_interpolate_hits_both_endpoints_exactly_and_the_modes_differ():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g) * 2
    for mode in ("linear", "slerp"):
        assert interpolate(a, b, 0.0, mode) is a and interpolate(a, b, 1.0, mode) is b
    lin, sph = interpolate(a, b, 0.5, "linear"), interpolate(a, b, 0.5, "slerp")
    assert not torch.allclose(lin, sph)
    assert torch.allclose(lin, (a + b) / 2)
    # slerp keeps each row's length on the line between |a| and |b|; linear shrinks it
    expected = (a.norm(dim=-1) + b.norm(dim=-1)) / 2
    assert torch.allclose(sph.norm(dim=-1), expected, rtol=1e-5)
    assert (lin.norm(dim=-1) < expected).all()


def test_slerp_worked_example_and_padding_rows_fall_back_to_linear():
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 2.0], [3.0, 4.0], [2.0, 2.0]]])
    out = interpolate(a, b, 0.5, "slerp")
    c = 1.5 * math.cos(math.pi / 4)
    assert torch.allclose(out[0, 0], torch.tensor([c, c]), atol=1e-6)  # the module docstring's example
    assert torch.equal(out[0, 1], torch.tensor([1.5, 2.0]))           # a's row is zero (padding): linear
    assert torch.allclose(out[0, 2], torch.tensor([1.5, 1.5]))        # parallel rows: linear


def test_blend_state_steps_to_its_target_and_retargets_from_where_it_is():
    a, b, c = torch.zeros(1, 2, 4), torch.ones(1, 2, 4), torch.full((1, 2, 4), 5.0)
    blend = PromptBlend()
    assert blend.retarget(a, 3, "linear") is a  # the first prompt is set at once
    assert blend.retarget(b, 4, "linear") is None and blend.current is a
    seen = [blend.advance() for _ in range(2)]
    assert [float(x[0, 0, 0]) for x in seen] == [0.25, 0.5] and blend.remaining == 2
    assert blend.retarget(c, 2, "linear") is None  # from 0.5, not from a
    assert float(blend.advance()[0, 0, 0]) == pytest.approx(2.75)
    assert blend.advance() is c and blend.advance() is None and blend.remaining == 0


# ---- the engine ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_blend_moves_monotonically_and_ends_bit_identical_to_a_plain_change(engine, mode):
    clip = list(generated_clip(8, H, W, seed=2))
    streamer = engine.components.dit
    for sid in ("blend", "plain"):
        engine.open_stream(sid, StreamParams(prompt=OLD, height=H, width=W, num_steps=2))
        engine.push_frame(sid, 0, clip[0])
    old = streamer.prompt_context("blend")
    new = engine._embed(PromptMix.of(NEW, mode))
    n = 4
    engine.set_prompt("blend", PromptMix.of(NEW, mode), blend_chunks=n)
    assert streamer.prompt_context("blend") is old  # nothing moves before the next chunk
    seq, contexts = 1, []
    for _ in range(n):
        seq = _push_chunk(engine, "blend", clip, seq)
        contexts.append(streamer.prompt_context("blend"))
        assert streamer.prompt_blend_remaining("blend") == n - len(contexts)
    to_new = [float((c - new).norm()) for c in contexts]
    to_old = [float((c - old).norm()) for c in contexts]
    assert all(x > y for x, y in zip(to_new, to_new[1:])), to_new
    assert all(x < y for x, y in zip(to_old, to_old[1:])), to_old
    assert torch.equal(contexts[-1], new)
    engine.set_prompt("plain", PromptMix.of(NEW, mode))
    blended, plain = _cross_kv(engine, "blend"), _cross_kv(engine, "plain")
    for block in plain:
        assert torch.equal(blended[block][0], plain[block][0]) and torch.equal(blended[block][1], plain[block][1])
    _push_chunk(engine, "blend", clip, seq)  # after the blend nothing moves any more
    assert streamer.prompt_context("blend") is contexts[-1]
    for sid in ("blend", "plain"):
        engine.close_stream(sid)


def test_slerp_and_linear_blends_take_different_paths(engine):
    clip = list(generated_clip(5, H, W, seed=3))
    mids = {}
    for mode in ("linear", "slerp"):
        engine.open_stream(mode, StreamParams(prompt=OLD, height=H, width=W, num_steps=1))
        engine.push_frame(mode, 0, clip[0])
        engine.set_prompt(mode, PromptMix.of(NEW, mode), blend_chunks=2)
        _push_chunk(engine, mode, clip, 1)
        mids[mode] = engine.components.dit.prompt_context(mode)
        engine.close_stream(mode)
    assert not torch.allclose(mids["linear"], mids["slerp"])


def test_a_step_by_step_stream_blends_per_chunk_too(engine):
    clip = list(generated_clip(9, H, W, seed=4))
    engine.open_stream("sbs", StreamParams(prompt=OLD, height=H, width=W, num_steps=2))
    engine.push_frame("sbs", 0, clip[0])
    engine.set_step_mode("sbs", True)
    engine.set_prompt("sbs", NEW, blend_chunks=2)
    seq = _push_chunk(engine, "sbs", clip, 1)
    assert engine.components.dit.prompt_blend_remaining("sbs") == 1
    _push_chunk(engine, "sbs", clip, seq)
    assert torch.equal(engine.components.dit.prompt_context("sbs"), engine._embed(PromptMix.of(NEW)))
    engine.close_stream("sbs")


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_weights_one_and_zero_equal_the_single_prompt(engine, mode):
    single = engine._embed(PromptMix.of(OLD))
    assert torch.equal(engine._embed(_mix((OLD, 1.0), (NEW, 0.0), mode=mode)), single)
    assert torch.equal(engine._embed(_mix((NEW, 0.0), (OLD, 2.5), mode=mode)), single)
    clip = list(generated_clip(5, H, W, seed=5))
    outs = {}
    for sid, prompt in (("one", OLD), ("mix", _mix((OLD, 1.0), (NEW, 0.0), mode=mode))):
        engine.open_stream(sid, StreamParams(prompt=prompt, height=H, width=W, num_steps=2, seed=7))
        outs[sid] = [o.frame for i, f in enumerate(clip) for o in engine.push_frame(sid, i, f)]
        outs[sid] += [o.frame for o in engine.flush(sid)]
        engine.close_stream(sid)
    assert len(outs["one"]) == 5 and all(np.array_equal(a, b) for a, b in zip(outs["one"], outs["mix"]))


def test_weights_are_normalised_and_mixed(engine):
    a, b, c = (engine._embed(PromptMix.of(t)) for t in (OLD, NEW, "a red fox"))
    assert torch.equal(engine._embed(_mix((OLD, 3.0), (NEW, 1.0))), engine._embed(_mix((OLD, 0.75), (NEW, 0.25))))
    three = engine._embed(_mix((OLD, 1.0), (NEW, 1.0), ("a red fox", 2.0)))
    assert torch.allclose(three, 0.25 * a + 0.25 * b + 0.5 * c, atol=1e-7)
    assert torch.equal(mix_embeddings([a, b], [0.5, 0.5], "slerp"), interpolate(a, b, 0.5, "slerp"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _mix(*[(f"p{i}", 1.0) for i in range(MAX_PROMPTS + 1)]),
        lambda: PromptMix(()),
        lambda: _mix(("a", -1.0)),
        lambda: _mix(("a", float("nan"))),
        lambda: _mix(("a", float("inf"))),
        lambda: _mix(("a", 0.0), ("b", 0.0)),
        lambda: _mix(("a", 1.0), ("b", 1.0), ("c", 1.0), mode="slerp"),
        lambda: _mix(("a", 1.0), mode="cubic"),
        lambda: PromptMix.of(42),
    ],
    ids=["too-many", "none", "negative", "nan", "inf", "all-zero", "slerp-three", "unknown-mode", "not-text"],
)
def test_bad_prompt_mixes_are_bad_requests(make):
    with pytest.raises(BadRequestError):
        make()


@pytest.mark.parametrize("chunks", [-1, MAX_BLEND_CHUNKS + 1, 2.5, True])
def test_bad_blend_lengths_are_bad_requests_and_change_nothing(engine, chunks):
    engine.open_stream("bad", StreamParams(prompt=OLD, height=H, width=W))
    before = engine.components.dit.prompt_context("bad")
    with pytest.raises(BadRequestError) as err:
        engine.set_prompt("bad", NEW, blend_chunks=chunks)
    assert err.value.details["field"] == "blend_chunks"
    assert engine.components.dit.prompt_context("bad") is before
    assert engine.components.dit.prompt_blend_remaining("bad") == 0
    engine.close_stream("bad")
    with pytest.raises(StreamNotFoundError):
        engine.set_prompt("bad", NEW, blend_chunks=2)


def test_a_bad_prompt_at_open_is_a_bad_request(engine):
    with pytest.raises(BadRequestError):
        engine.open_stream("x", StreamParams(prompt=["a", "b"], height=H, width=W))  # type: ignore[arg-type]
    assert not engine.has_stream("x")


# ---- the stage workers, chained in one process ----------------------------------------------------------


def test_chained_stage_workers_blend_exactly_like_the_engine():
    from cluster.graph import ChainExecutor, LocalChain
    from cluster.plan import build_plan
    from cluster.stage_actor import WorkerOptions

    clip = list(generated_clip(17, H, W, seed=6))
    changes = {5: (_mix((NEW, 1.0), ("a red fox", 1.0), mode="slerp"), 3),
               9: (_mix((OLD, 1.0), ("a red fox", 3.0)), 2)}  # the second starts mid-blend
    params = StreamParams(prompt=OLD, height=H, width=W, num_steps=2, seed=3)

    engine = StreamEngine(EngineSpec(model="tiny"))
    engine.open_stream("s", params)
    reference, contexts = [], []
    for i, frame in enumerate(clip):
        if i in changes:
            engine.set_prompt("s", changes[i][0], blend_chunks=changes[i][1])
        reference += engine.push_frame("s", i, frame)
        contexts.append(engine.components.dit.prompt_context("s"))
    reference += engine.flush("s")

    async def chain_run():
        plan = build_plan(2, model="tiny", device="cpu")
        ex = ChainExecutor(plan, LocalChain.build(plan, WorkerOptions(num_threads=1)))
        await ex.open_stream("s", params)
        out = []
        for i, frame in enumerate(clip):
            if i in changes:
                await ex.set_prompt("s", changes[i][0], blend_chunks=changes[i][1])
            await ex.add_frames("s", [(i, frame)])
            if "s" in await ex.ready_streams():
                out += (await ex.step(["s"]))["s"]
            for actor in plan.shard_actors:  # every shard conditions each chunk as the engine does
                assert torch.equal(await ex.chain.call(actor, "prompt_context", "s"), contexts[i]), (i, actor)
        out += await ex.flush("s")
        with pytest.raises(BadRequestError):
            await ex.set_prompt("s", NEW, blend_chunks=MAX_BLEND_CHUNKS + 1)
        await ex.close_stream("s")
        return out

    got = asyncio.run(chain_run())
    assert [f.seq for f in got] == [f.seq for f in reference] == list(range(17))
    for a, b in zip(reference, got):
        assert np.array_equal(a.frame, b.frame), f"frame {a.seq} differs"
