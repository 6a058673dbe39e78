"""Streams are isolated: interleaving them changes nothing, batching them into one forward changes
nothing beyond float reordering, and the per-stream lifecycle (drain, resize, prompt swap, close)
behaves as documented.
"""

from __future__ import annotations

import pytest
import torch

from stages.config import DIT_PRESETS, StreamConfig
from stages.dit import WanDiT
from stages.dit_stage import DiTShard
from stages.errors import BadRequestError, StreamExistsError, StreamNotFoundError
from stages.kv_cache import BlockKVCache
from stages.stream_batch import GeneratorNoise, LatentStreamer

TOL = 1e-5
NUM_STEPS = 10
PIXELS = 64  # latent 8x8, 16 tokens per frame


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(11)
    return WanDiT(DIT_PRESETS["tiny"]).state_dict()


def _streamer(weights) -> LatentStreamer:
    model = WanDiT(DIT_PRESETS["tiny"])
    model.load_checkpoint(weights)
    return LatentStreamer([DiTShard(model, device="cpu", dtype=torch.float32)])


def _inputs(seed: int, num_chunks: int = NUM_STEPS):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 512, 4096, generator=g)
    return (
        text,
        torch.randn(1, 16, 1, 8, 8, generator=g),
        [torch.randn(1, 16, 1, 8, 8, generator=g) for _ in range(num_chunks)],
    )


SPECS = {"a": dict(num_steps=2, seed=1), "b": dict(num_steps=3, seed=2)}


def _open(streamer: LatentStreamer, sid: str):
    spec = SPECS[sid]
    text, first, chunks = _inputs(spec["seed"])
    streamer.open(
        sid,
        height=PIXELS,
        width=PIXELS,
        stream_cfg=StreamConfig(num_steps=spec["num_steps"]),
        seed=spec["seed"],
    )
    streamer.set_prompt_context(sid, text)
    return streamer.prefill(sid, first), chunks


def _alone(weights, sid):
    streamer = _streamer(weights)
    x0, chunks = _open(streamer, sid)
    return [x0] + [streamer.step([(sid, c, 650 + k)])[0] for k, c in enumerate(chunks)]


def _assert_same(xs, ys, tol=None):
    assert len(xs) == len(ys)
    for k, (x, y) in enumerate(zip(xs, ys)):
        assert (x is None) == (y is None), k
        if x is not None:
            if tol is None:
                assert torch.equal(x, y), k
            else:
                assert (x - y).abs().max() <= tol, k


def test_interleaved_is_exact_and_batched_is_close(weights):
    alone = {sid: _alone(weights, sid) for sid in SPECS}

    streamer = _streamer(weights)
    interleaved = {}
    chunks = {}
    for sid in SPECS:
        x0, chunks[sid] = _open(streamer, sid)
        interleaved[sid] = [x0]
    for k in range(NUM_STEPS):
        for sid in SPECS:
            interleaved[sid] += streamer.step([(sid, chunks[sid][k], 650 + k)])
    for sid in SPECS:
        _assert_same(interleaved[sid], alone[sid])

    streamer = _streamer(weights)
    batched = {}
    for sid in SPECS:
        x0, chunks[sid] = _open(streamer, sid)
        batched[sid] = [x0]
    for k in range(NUM_STEPS):
        out_a, out_b = streamer.step([(sid, chunks[sid][k], 650 + k) for sid in SPECS])
        batched["a"].append(out_a)
        batched["b"].append(out_b)
    for sid in SPECS:
        _assert_same(batched[sid], alone[sid], tol=TOL)
    assert sum(x is not None for x in batched["b"]) == 1 + NUM_STEPS - 2  # n = 3: two warm-up ticks


def test_one_latent_prefill_state(weights):
    streamer = _streamer(weights)
    x0, _ = _open(streamer, "b")
    assert x0.shape == (1, 16, 1, 8, 8)
    state = streamer.shards[0].state("b")
    for cache in state.kv.values():
        assert cache.num_slots == 3
        assert cache.local_end_R.tolist() == [16] * 3 and cache.global_end_R.tolist() == [16] * 3
        assert cache.queue_lists() == [[], [], []]
    assert streamer.stream_state("b").next_frame == 1


def test_drain_tick_finishes_in_flight_frames(weights):
    _, _, extra = _inputs(99, num_chunks=1)

    def run(tail):
        streamer = _streamer(weights)
        _, chunks = _open(streamer, "b")
        outs = [streamer.step([("b", c, 660)])[0] for c in chunks]
        return outs + [streamer.step([("b", c, 660)])[0] for c in tail], streamer

    fed, _ = run([extra[0]])
    drained, streamer = run([None, None, None])
    # the first drain tick emits what a normal tick would have (its slot-0 input never matters)
    assert (drained[NUM_STEPS] - fed[NUM_STEPS]).abs().max() <= TOL
    assert drained[NUM_STEPS + 1] is not None and drained[NUM_STEPS + 2] is None
    assert streamer.stream_state("b").status[0].name == "EMPTY"
    # input resumes on a partly empty buffer: only the occupied slots are forwarded
    _, _, more = _inputs(5, num_chunks=3)
    outs = [streamer.step([("b", c, 660)])[0] for c in more]
    assert outs[0] is None and outs[1] is None and outs[2].shape == (1, 16, 1, 8, 8)


def test_set_num_steps_replicates_slot0_and_restarts_warmup(weights):
    streamer = _streamer(weights)
    _, chunks = _open(streamer, "a")
    for c in chunks[:6]:
        streamer.step([("a", c, 650)])
    shard = streamer.shards[0]
    slot0 = {i: (cache.k_RCND[0].clone(), cache.queue_lists()[0]) for i, cache in shard.state("a").kv.items()}
    streamer.set_num_steps("a", 4)
    for i, cache in shard.state("a").kv.items():
        assert cache.num_slots == 4
        assert all(torch.equal(cache.k_RCND[s], slot0[i][0]) for s in range(4))
        assert cache.queue_lists() == [slot0[i][1]] * 4
    outs = [streamer.step([("a", c, 650)])[0] for c in chunks[6:]]
    assert [o is None for o in outs] == [True, True, True, False]


def test_prompt_swap_keeps_self_attention_caches(weights):
    streamer = _streamer(weights)
    _, chunks = _open(streamer, "a")
    for c in chunks[:5]:
        streamer.step([("a", c, 650)])
    state = streamer.shards[0].state("a")
    before = {i: (c.k_RCND.clone(), c.local_end_R.clone(), c.queue_lists()) for i, c in state.kv.items()}
    old_cross = state.cross_kv[0][0].clone()
    streamer.set_prompt_context("a", torch.randn(1, 512, 4096))
    assert not torch.equal(state.cross_kv[0][0], old_cross)
    for i, cache in state.kv.items():
        assert torch.equal(cache.k_RCND, before[i][0]) and torch.equal(cache.local_end_R, before[i][1])
        assert cache.queue_lists() == before[i][2]
    assert streamer.step([("a", chunks[5], 650)])[0] is not None


def test_close_frees_state_and_ids_are_checked(weights):
    streamer = _streamer(weights)
    _open(streamer, "a")
    with pytest.raises(StreamExistsError):
        streamer.open("a", height=PIXELS, width=PIXELS)
    streamer.close("a")
    assert streamer.shards[0].stream_ids == []
    with pytest.raises(StreamNotFoundError):
        streamer.shards[0].state("a")
    with pytest.raises(StreamNotFoundError):
        streamer.step([("a", None, None)])


def test_host_mirror_of_cache_ends_matches_the_device():
    """The shard's host mirror of local_end (which drops the attention mask once a cache is full)
    follows the device bookkeeping exactly, through the fill phase, the full phase and a RoPE reset."""
    cfg = DIT_PRESETS["tiny"]
    shard = DiTShard(WanDiT(cfg), device="cpu", dtype=torch.float32)
    streamer = LatentStreamer([shard])
    stream_cfg = StreamConfig(num_steps=2)
    streamer.open("m", height=64, width=96, stream_cfg=stream_cfg,
                  noise=GeneratorNoise(3, device="cpu", dtype=torch.float32))
    streamer.set_prompt_context("m", torch.randn(1, 16, cfg.text_dim))
    streamer.prefill("m", torch.randn(1, 16, 1, 8, 12))
    state = shard.state("m")
    seen_full = []
    for k in range(stream_cfg.rope_reset_frame + 4):
        streamer.step([("m", torch.randn(1, 16, 1, 8, 12), None)])
        for cache in state.kv.values():
            assert state.host_local_end == cache.local_end_R.tolist(), f"step {k}"
            assert state.host_global_end == cache.global_end_R.tolist(), f"step {k}"
        seen_full.append(all(e == cache.capacity for e in state.host_local_end))
    assert not seen_full[0] and all(seen_full[-10:])


def test_a_stream_on_a_spare_state_gives_a_fresh_streams_output(weights):
    """A closed stream's state is reused by the next stream of its geometry: the caches are zeroed in
    place and the prompt K/V refilled in place (the tensors keep their addresses, which keeps their
    CUDA graphs valid), and the new stream's output is exactly a fresh shard's."""
    streamer = _streamer(weights)
    shard = streamer.shards[0]
    _open(streamer, "a")
    for k, c in enumerate(_inputs(SPECS["a"]["seed"])[2][:7]):  # past the fill phase: every cache full
        streamer.step([("a", c, 650 + k)])
    state = shard.state("a")
    addresses = {i: cache.k_RCND.data_ptr() for i, cache in state.kv.items()}
    cross_address = state.cross_kv[0][0].data_ptr()
    streamer.close("a")
    assert shard.stream_ids == [] and len(shard.spares) == 1

    SPECS["c"] = dict(num_steps=2, seed=5)  # a's geometry, other inputs
    try:
        x0, chunks = _open(streamer, "c")
        recycled = [x0] + [streamer.step([("c", c, 650 + k)])[0] for k, c in enumerate(chunks)]
        fresh = _alone(weights, "c")
    finally:
        del SPECS["c"]
    assert shard.spares.num_recycled == 1 and len(shard.spares) == 0
    new_state = shard.state("c")
    assert new_state is state and new_state.stream_id == "c"
    assert {i: cache.k_RCND.data_ptr() for i, cache in new_state.kv.items()} == addresses
    assert new_state.cross_kv[0][0].data_ptr() == cross_address
    _assert_same(recycled, fresh, tol=0.0)


def test_spare_states_match_geometry_and_are_bounded(weights):
    """Only a stream of the same slots, grid and cache policy takes a spare; at most spare_streams are
    kept (the oldest freed first); spare_streams=0 frees at close; spare ids cannot be opened."""
    model = WanDiT(DIT_PRESETS["tiny"])
    model.load_checkpoint(weights)
    shard = DiTShard(model, device="cpu", dtype=torch.float32, spare_streams=2)
    cfg = StreamConfig(num_steps=2)
    for sid in ("a", "b", "c"):
        shard.open_stream(sid, num_slots=2, height=64, width=64, stream_cfg=cfg)
    first = shard.state("a")
    for sid in ("a", "b", "c"):
        shard.close_stream(sid)
    assert len(shard.spares) == 2 and all(s is not first for s in shard.spares)
    shard.open_stream("d", num_slots=3, height=64, width=64, stream_cfg=cfg)  # other slot count
    shard.open_stream("e", num_slots=2, height=64, width=96, stream_cfg=cfg)  # other grid
    assert shard.spares.num_recycled == 0 and len(shard.spares) == 2
    shard.open_stream("f", num_slots=2, height=64, width=64, stream_cfg=cfg)
    assert shard.spares.num_recycled == 1 and len(shard.spares) == 1
    assert shard.state("f").cross_kv is None  # no prompt until one is set: steps refuse, as for a fresh one
    shard.spares.clear()
    assert len(shard.spares) == 0
    with pytest.raises(BadRequestError):
        shard.open_stream("\x00spare-0", num_slots=2, height=64, width=64, stream_cfg=cfg)

    none_kept = DiTShard(model, device="cpu", dtype=torch.float32, spare_streams=0)
    none_kept.open_stream("a", num_slots=2, height=64, width=64, stream_cfg=cfg)
    none_kept.close_stream("a")
    assert len(none_kept.spares) == 0


def test_an_unchanged_slot_count_copies_slot0_in_place(weights):
    """The prefill's set_num_slots(n) on an n-slot stream keeps the tensors (and so the stream's graphs)
    and gives every slot slot 0's caches, as a resize does."""
    model = WanDiT(DIT_PRESETS["tiny"])
    model.load_checkpoint(weights)
    shard = DiTShard(model, device="cpu", dtype=torch.float32)
    shard.open_stream("a", num_slots=3, height=64, width=64, stream_cfg=StreamConfig(num_steps=3))
    cache = shard.state("a").kv[0]
    for name in cache.TENSOR_FIELDS:
        t = getattr(cache, name)
        t.copy_(torch.arange(t.numel()).reshape(t.shape).to(t.dtype))
    before = {name: getattr(cache, name).clone() for name in cache.TENSOR_FIELDS}
    pointer = cache.k_RCND.data_ptr()
    shard.set_num_slots("a", 3)
    assert shard.state("a").kv[0] is cache and cache.k_RCND.data_ptr() == pointer
    resized = BlockKVCache.replicated_from_slot0(_with(cache, before), 3)
    for name in cache.TENSOR_FIELDS:
        assert torch.equal(getattr(cache, name), getattr(resized, name)), name


def _with(cache, tensors):
    """A copy of `cache` holding `tensors`."""
    out = BlockKVCache.__new__(BlockKVCache)
    out.tokens_per_frame, out.policy = cache.tokens_per_frame, cache.policy
    for name, t in tensors.items():
        setattr(out, name, t)
    return out
