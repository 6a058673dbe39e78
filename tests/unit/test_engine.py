"""The one-process stream API on the tiny model: ordering, first frame, live controls, isolation, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cluster.video import generated_clip
from stages.engine import EngineSpec, StreamEngine, StreamParams
from stages.errors import BadFrameError, BadRequestError, StreamExistsError, StreamNotFoundError

H, W = 32, 48


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return StreamEngine(EngineSpec(model="tiny"))


def _clip(n, seed=0):
    return list(generated_clip(n, H, W, seed=seed))


def _run(engine, sid, frames, **kw):
    engine.open_stream(sid, StreamParams(prompt=kw.pop("prompt", "a cat"), height=H, width=W, **kw))
    out = []
    for seq, f in enumerate(frames):
        out += engine.push_frame(sid, seq, f)
    out += engine.flush(sid)
    engine.close_stream(sid)
    return out


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_every_frame_comes_back_in_order(engine, steps):
    out = _run(engine, f"s{steps}", _clip(14), num_steps=steps)
    assert [o.seq for o in out] == list(range(14))
    assert all(o.frame.shape == (H, W, 3) and o.frame.dtype == np.uint8 for o in out)


def test_first_output_from_frame_zero_alone(engine):
    engine.open_stream("first", StreamParams(prompt="x", height=H, width=W, num_steps=2))
    out = engine.push_frame("first", 0, _clip(1)[0])
    assert [o.seq for o in out] == [0]
    engine.close_stream("first")


def test_reference_start_buffers_five_frames(engine):
    engine.open_stream("ref", StreamParams(prompt="x", height=H, width=W, first_chunk_frames=5))
    clip = _clip(5)
    for seq in range(4):
        assert engine.push_frame("ref", seq, clip[seq]) == []
    assert [o.seq for o in engine.push_frame("ref", 4, clip[4])] == [0, 1, 2, 3, 4]
    engine.close_stream("ref")


def test_two_streams_interleaved_equal_each_alone(engine):
    a, b = _clip(13, seed=1), _clip(13, seed=2)
    alone_a = _run(engine, "a", a, seed=3, num_steps=2)
    alone_b = _run(engine, "b", b, seed=4, num_steps=3, prompt="a dog")
    engine.open_stream("a", StreamParams(prompt="a cat", height=H, width=W, seed=3, num_steps=2))
    engine.open_stream("b", StreamParams(prompt="a dog", height=H, width=W, seed=4, num_steps=3))
    got = {"a": [], "b": []}
    for seq in range(13):
        got["a"] += engine.push_frame("a", seq, a[seq])
        got["b"] += engine.push_frame("b", seq, b[seq])
    got["a"] += engine.flush("a")
    got["b"] += engine.flush("b")
    engine.close_stream("a")
    engine.close_stream("b")
    for mine, ref in ((got["a"], alone_a), (got["b"], alone_b)):
        assert [o.seq for o in mine] == [o.seq for o in ref]
        for x, y in zip(mine, ref):
            np.testing.assert_array_equal(x.frame, y.frame)


def test_streams_batched_in_one_tick_match_alone(engine):
    a, b = _clip(9, seed=5), _clip(9, seed=6)
    alone_a = _run(engine, "a", a, seed=1)
    alone_b = _run(engine, "b", b, seed=2)
    engine.open_stream("a", StreamParams(prompt="a cat", height=H, width=W, seed=1))
    engine.open_stream("b", StreamParams(prompt="a cat", height=H, width=W, seed=2))
    got = {"a": [], "b": []}
    for seq in range(9):
        engine.add_frame("a", seq, a[seq])
        engine.add_frame("b", seq, b[seq])
        ready = engine.ready_streams()
        for sid, frames in engine.step(ready).items():
            got[sid] += frames
    for sid in "ab":
        got[sid] += engine.flush(sid)
        engine.close_stream(sid)
    for mine, ref in ((got["a"], alone_a), (got["b"], alone_b)):
        assert [o.seq for o in mine] == [o.seq for o in ref]
        diff = max(np.abs(x.frame.astype(int) - y.frame.astype(int)).max() for x, y in zip(mine, ref))
        assert diff <= 1  # batched GEMMs may round differently in the last bit; pixels agree to 1 level


def test_prompt_and_steps_change_mid_stream_lose_no_frame(engine):
    clip = _clip(22)
    engine.open_stream("live", StreamParams(prompt="a cat", height=H, width=W, num_steps=2))
    out = []
    for seq, f in enumerate(clip):
        if seq == 7:
            engine.set_prompt("live", "a dog in the snow")
        if seq == 11:
            out += engine.set_steps("live", 3)
        if seq == 16:
            out += engine.set_steps("live", 1)
        out += engine.push_frame("live", seq, f)
    out += engine.flush("live")
    engine.close_stream("live")
    assert [o.seq for o in out] == list(range(22))


def test_bad_frames_are_typed_and_harmless(engine):
    engine.open_stream("bad", StreamParams(prompt="x", height=H, width=W, num_steps=1))
    good = _clip(5)
    with pytest.raises(BadFrameError, match=r"\[32, 48, 3\]"):
        engine.add_frame("bad", 0, np.zeros((H + 16, W, 3), np.uint8))
    with pytest.raises(BadFrameError):
        engine.add_frame("bad", 0, np.zeros((H, W, 3), np.float32))
    with pytest.raises(BadFrameError):
        engine.add_frame("bad", 0, b"not a frame")
    out = []
    for seq, f in enumerate(good):
        out += engine.push_frame("bad", seq, f)
    out += engine.flush("bad")
    assert [o.seq for o in out] == list(range(5))
    engine.close_stream("bad")


def test_stream_lifecycle_errors(engine):
    with pytest.raises(StreamNotFoundError):
        engine.add_frame("nope", 0, np.zeros((H, W, 3), np.uint8))
    with pytest.raises(BadRequestError, match="num_steps"):
        engine.open_stream("x", StreamParams(prompt="x", num_steps=5, height=H, width=W))
    with pytest.raises(BadRequestError, match="height"):
        engine.open_stream("x", StreamParams(prompt="x", height=33, width=W))
    engine.open_stream("dup", StreamParams(prompt="x", height=H, width=W))
    with pytest.raises(StreamExistsError):
        engine.open_stream("dup", StreamParams(prompt="x", height=H, width=W))
    engine.close_stream("dup")
    engine.close_stream("dup")  # a vanished client may be closed twice
    assert not engine.has_stream("dup")


def test_closing_frees_stage_state(engine):
    engine.open_stream("tmp", StreamParams(prompt="x", height=H, width=W))
    engine.push_frame("tmp", 0, _clip(1)[0])
    engine.close_stream("tmp")
    c = engine.components
    assert "tmp" not in c.dit.shards[0].stream_ids
    assert not any(e.has_stream("tmp") for e in c.encoders.values())
    assert not any(d.has_stream("tmp") for d in c.decoders.values())


def test_taehv_stream(engine):
    out = _run(engine, "tae", _clip(9), vae="taehv", num_steps=2)
    assert [o.seq for o in out] == list(range(9))


def test_weir_run_writes_a_playable_video(tmp_path):
    from cluster.offline import main
    from cluster.video import VideoWriter, read_video

    src = tmp_path / "in.mp4"
    with VideoWriter(str(src), 16, 64, 64) as w:
        for f in generated_clip(9, 64, 64):
            w.write(f)
    dst = tmp_path / "out.mp4"
    assert main(["--input", str(src), "--prompt", "ink", "--output", str(dst), "--model", "tiny",
                 "--height", "32", "--width", "48", "--device", "cpu"]) == 0
    frames, fps = read_video(str(dst), 32, 48)
    assert len(frames) == 9 and fps == pytest.approx(16)


def test_plain_ticks_time_their_stages_and_others_do_not(engine):
    a, b = _clip(9, seed=5), _clip(9, seed=6)
    for sid in "ab":
        engine.open_stream(sid, StreamParams(prompt="a cat", height=H, width=W, num_steps=2, seed=1))
    seen = []
    for seq in range(9):
        engine.add_frame("a", seq, a[seq])
        engine.add_frame("b", seq, b[seq])
        ready = engine.ready_streams()
        if not ready:
            continue
        t0 = time.perf_counter()
        out = engine.step(ready)
        wall = time.perf_counter() - t0
        seen.append((len(ready), sum(map(bool, out.values())), engine.tick_times, wall))
    for sid in "ab":
        engine.flush(sid)
        engine.close_stream(sid)
    first, *plain = seen
    assert first[2] is None  # the prefills: encode, DiT and decode interleave per stream
    # 2-step stream batch: chunk 1 warms the slots (nothing decoded), chunk 2 emits chunk 1
    assert [(t.encode_chunks, t.rows, t.decode_chunks) for _, _, t, _ in plain] == [(2, 4, 0), (2, 4, 2)]
    for _, _, t, wall in plain:
        assert 0 < t.encode_s and 0 < t.dit_s and (t.decode_s > 0) == (t.decode_chunks > 0)
        assert t.encode_s + t.dit_s + t.decode_s <= wall


def test_the_warm_up_freezes_the_heap_so_a_collection_skips_it(engine):
    """After the warm-up, a full garbage collection skips the objects that were alive then (gc.freeze),
    even once they are garbage; garbage made later is still collected."""
    import gc
    import weakref

    class Node:
        pass

    def cycle() -> tuple[Node, weakref.ref]:
        a, b = Node(), Node()
        a.other, b.other = b, a  # only the cyclic collector can free these
        return a, weakref.ref(a)

    try:
        held, frozen_ref = cycle()
        engine.warm_up(32, 32, steps=(1,), chunks=1)
        assert gc.get_freeze_count() > 0
        del held
        gc.collect()
        assert frozen_ref() is not None  # alive at the freeze: the collector no longer walks it
        held, later_ref = cycle()
        del held
        gc.collect()
        assert later_ref() is None  # made after the freeze: collected as usual
    finally:
        gc.unfreeze()
