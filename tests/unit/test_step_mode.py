"""Step-by-step mode (the reference's "without stream batch", spec C): each chunk's n steps back to back,
emitted in the same tick; switchable per stream mid-stream without losing a frame. CPU, tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.engine import EngineSpec, StreamEngine, StreamParams
from stages.kv_cache import BlockKVCache, KVCachePolicy

H = W = 32


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return StreamEngine(EngineSpec(model="tiny"))


def _frame(seq: int) -> np.ndarray:
    rng = np.random.default_rng(seq)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _open(engine, sid: str, steps: int = 2) -> None:
    engine.open_stream(sid, StreamParams(prompt="a watercolor street", num_steps=steps, height=H, width=W))


def _push(engine, sid: str, seqs) -> list[list[int]]:
    """Push frames one by one; the seqs each ready tick returned."""
    ticks = []
    for seq in seqs:
        if engine.add_frame(sid, seq, _frame(seq)):
            ticks.append([f.seq for f in engine.step([sid])[sid]])
    return ticks


@pytest.mark.parametrize("steps", [2, 3])
def test_step_by_step_emits_each_chunk_in_its_own_tick(engine, steps):
    sid = f"sbs-{steps}"
    _open(engine, sid, steps)
    assert engine.set_step_mode(sid, True) == []  # before the first frame: nothing in flight
    ticks = _push(engine, sid, range(13))  # 1 + 3 chunks of 4; cache fills past 6 frames below
    assert ticks == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert engine.flush(sid) == []
    ticks = _push(engine, sid, range(13, 13 + 4 * 6))  # past the cache capacity: the eviction ring turns
    assert [len(t) for t in ticks] == [4] * 6
    engine.close_stream(sid)


def test_switching_modes_mid_stream_loses_no_frame(engine):
    sid = "switch"
    _open(engine, sid, 3)
    got: list[int] = []
    for t in _push(engine, sid, range(9)):  # stream batch: chunks in flight
        got += t
    got += [f.seq for f in engine.set_step_mode(sid, True)]  # drains the stream batch
    assert got == list(range(9))
    for t in _push(engine, sid, range(9, 17)):
        assert len(t) == 4  # step by step: out in the same tick
        got += t
    assert engine.set_step_mode(sid, False) == []  # nothing in flight; slots rebuilt from slot 0
    ticks = _push(engine, sid, range(17, 29))
    assert ticks[0] == []  # the stream batch warms up again
    for t in ticks:
        got += t
    got += [f.seq for f in engine.flush(sid)]
    assert got == list(range(29))
    engine.close_stream(sid)


def test_one_step_is_the_same_in_both_modes(engine):
    """With n = 1 the two modes coincide: bit-identical frames."""
    outs = {}
    for mode in (False, True):
        sid = f"one-{mode}"
        _open(engine, sid, 1)
        engine.set_step_mode(sid, mode)
        frames = []
        for seq in range(13):
            if engine.add_frame(sid, seq, _frame(seq)):
                frames += [f.frame for f in engine.step([sid])[sid]]
        outs[mode] = np.stack(frames)
        engine.close_stream(sid)
    assert np.array_equal(outs[False], outs[True])


def test_only_the_last_step_of_a_frame_advances_the_eviction_index():
    fp = 2
    cache = BlockKVCache(num_slots=1, tokens_per_frame=fp, num_heads=1, head_dim=4,
                         policy=KVCachePolicy(num_cache_frames=4, num_sink_frames=1, sink_threshold=-1),
                         device="cpu", dtype=torch.float32)
    slot = torch.tensor([0])

    def write(frame: int, value: float, evict: bool = True) -> None:
        kv = torch.full((1, fp, 1, 4), value)
        cache.update(slot, torch.tensor([frame * fp]), kv, kv, evict=evict)

    for frame in range(4):  # fill: frames 0..3
        write(frame, float(frame))
    queue = cache.queue_lists()[0]
    write(4, 40.0, evict=False)  # full: a non-last step writes at the head without popping
    assert cache.queue_lists()[0] == queue
    target = queue[0]
    assert torch.all(cache.k_RCND[0, target - fp:target] == 40.0)
    write(4, 41.0)  # the last step: same place, now the index advances
    assert torch.all(cache.k_RCND[0, target - fp:target] == 41.0)
    assert cache.queue_lists()[0] == queue[1:] + [target]
