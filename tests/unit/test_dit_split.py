"""A DiT split into 2 or 3 block-range shards, chained in one process, equals the unsplit model
bit for bit (fp32 CPU), including across a pickle round trip of the micro-batch between shards.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from stages.config import DIT_PRESETS, StreamConfig
from stages.dit import WanDiT
from stages.dit_stage import DiTMicroBatch, DiTShard, split_blocks
from stages.stream_batch import LatentStreamer

NUM_STREAM_STEPS = 12  # enough for every slot's cache to fill and start evicting


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _PickledChain:
    """Chains shards the way separate processes would: every message is pickled in between."""

    def __init__(self, shards):
        self.shards = shards

    def __call__(self, batch: DiTMicroBatch) -> DiTMicroBatch:
        for shard in self.shards:
            batch = pickle.loads(pickle.dumps(shard.forward(batch)))
        return batch


def _run(ranges, full_state, text, inputs, *, pickled: bool):
    cfg = DIT_PRESETS["tiny"]
    shards = []
    for block_range in ranges:
        model = WanDiT(cfg, block_range)
        model.load_checkpoint(full_state)
        shards.append(DiTShard(model, device="cpu", dtype=torch.float32))
    streamer = LatentStreamer(shards)
    if pickled:
        streamer.run_chain = _PickledChain(shards)
    prefill_latents, chunks = inputs
    streamer.open("s", height=64, width=64, stream_cfg=StreamConfig(num_steps=2), seed=3)
    streamer.set_prompt_context("s", text)
    outputs = [streamer.prefill("s", prefill_latents)]
    for chunk in chunks:
        outputs.extend(streamer.step([("s", chunk, 650)]))
    return outputs, shards


@pytest.mark.parametrize("num_shards", [2, 3])
def test_chained_shards_equal_the_full_model_exactly(num_shards):
    cfg = DIT_PRESETS["tiny"]
    full_state = WanDiT(cfg).state_dict()
    text = torch.randn(1, 512, 4096)
    inputs = (torch.randn(1, 16, 1, 8, 8), [torch.randn(1, 16, 1, 8, 8) for _ in range(NUM_STREAM_STEPS)])
    ranges = split_blocks(cfg.num_layers, num_shards)
    assert ranges == ([(0, 2), (2, 4)] if num_shards == 2 else [(0, 2), (2, 3), (3, 4)])

    whole, (whole_shard,) = _run([(0, cfg.num_layers)], full_state, text, inputs, pickled=False)
    split, shards = _run(ranges, full_state, text, inputs, pickled=True)
    assert len(whole) == len(split) == NUM_STREAM_STEPS + 1
    for k, (a, b) in enumerate(zip(whole, split)):
        assert (a is None) == (b is None), k
        if a is not None:
            assert torch.equal(a, b), f"output {k} differs"
    for shard in shards:  # each shard holds exactly its blocks' caches, equal to the full model's
        state = shard.state("s")
        assert sorted(state.kv) == list(range(*shard.block_range))
        for i, cache in state.kv.items():
            assert torch.equal(cache.k_RCND, whole_shard.state("s").kv[i].k_RCND)
            assert cache.queue_lists() == whole_shard.state("s").kv[i].queue_lists()


def test_message_between_shards_is_plain_and_well_formed():
    cfg = DIT_PRESETS["tiny"]
    first = DiTShard(WanDiT(cfg, (0, 2)), device="cpu", dtype=torch.float32)
    first.open_stream("s", num_slots=1, height=64, width=64, stream_cfg=StreamConfig(num_steps=1))
    first.set_text_context("s", torch.randn(1, 7, 4096))  # shorter prompts are zero-padded to 512
    batch = DiTMicroBatch(
        segments=[("s", (0,))],
        noisy_latents_BCFHW=torch.randn(1, 16, 1, 8, 8),
        timesteps_B=torch.tensor([700]),
        start_frames_B=torch.tensor([0]),
    )
    out = first.forward(batch)
    assert out.hidden_BLD.shape == (1, 16, cfg.dim) and out.x0_BCFHW is None
    assert out.grid_fhw == (1, 4, 4) and out.segments == [("s", (0,))]
    assert batch.hidden_BLD is None  # forward returns a new message
