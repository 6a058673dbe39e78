"""The DiT's state-dict contract: published key names and shapes, and each shard's slice."""

from __future__ import annotations

import re

import pytest
import torch

from stages.config import DIT_PRESETS
from stages.dit import WanDiT
from stages.dit_stage import split_blocks
from stages.errors import CheckpointError

BLOCK_SUFFIXES = [
    "modulation",
    *[f"self_attn.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")],
    "self_attn.norm_q.weight",
    "self_attn.norm_k.weight",
    "norm3.weight",
    "norm3.bias",
    *[f"cross_attn.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")],
    "cross_attn.norm_q.weight",
    "cross_attn.norm_k.weight",
    "ffn.0.weight",
    "ffn.0.bias",
    "ffn.2.weight",
    "ffn.2.bias",
]
TOP_LEVEL = [
    "patch_embedding.weight",
    "patch_embedding.bias",
    "text_embedding.0.weight",
    "text_embedding.0.bias",
    "text_embedding.2.weight",
    "text_embedding.2.bias",
    "time_embedding.0.weight",
    "time_embedding.0.bias",
    "time_embedding.2.weight",
    "time_embedding.2.bias",
    "time_projection.1.weight",
    "time_projection.1.bias",
    "head.modulation",
    "head.head.weight",
    "head.head.bias",
]


def _meta_model(name: str, block_range=None) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(DIT_PRESETS[name], block_range)


@pytest.mark.parametrize(
    ("name", "num_keys", "num_params"),
    [("wan-1.3b", 825, 1_418_996_800), ("wan-14b", 1095, 14_288_491_584)],
)
def test_published_key_names_and_counts(name, num_keys, num_params):
    cfg = DIT_PRESETS[name]
    state = _meta_model(name).state_dict()
    assert len(state) == num_keys
    assert sum(v.numel() for v in state.values()) == num_params
    expected = set(TOP_LEVEL) | {f"blocks.{i}.{s}" for i in range(cfg.num_layers) for s in BLOCK_SUFFIXES}
    assert set(state) == expected
    assert len(BLOCK_SUFFIXES) == 27 and len(TOP_LEVEL) == 15
    pattern = re.compile(
        r"^(patch_embedding|text_embedding\.[02]|time_embedding\.[02]|time_projection\.1)\.(weight|bias)$"
        r"|^blocks\.\d+\..+$|^head\.(modulation|head\.(weight|bias))$"
    )
    assert all(pattern.match(k) for k in state)


def test_pinned_shapes_1_3b():
    d, f = 1536, 8960
    state = _meta_model("wan-1.3b").state_dict()
    pinned = {
        "patch_embedding.weight": (d, 16, 1, 2, 2),
        "text_embedding.0.weight": (d, 4096),
        "time_embedding.0.weight": (d, 256),
        "time_projection.1.weight": (6 * d, d),
        "blocks.0.modulation": (1, 6, d),
        "blocks.29.self_attn.norm_q.weight": (d,),
        "blocks.12.cross_attn.k.bias": (d,),
        "blocks.29.ffn.0.weight": (f, d),
        "blocks.29.ffn.2.weight": (d, f),
        "blocks.3.norm3.weight": (d,),
        "head.modulation": (1, 2, d),
        "head.head.weight": (64, d),
        "head.head.bias": (64,),
    }
    for key, shape in pinned.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name", ["wan-1.3b", "wan-14b"])
def test_same_keys_shapes_and_order_as_reference(name):
    oracle = pytest.importorskip("tests.reference_oracle")
    ours = {k: tuple(v.shape) for k, v in _meta_model(name).state_dict().items()}
    theirs = oracle.reference_key_shapes(DIT_PRESETS[name])
    assert list(ours.items()) == list(theirs.items())


def test_shard_keys_partition_the_checkpoint():
    cfg = DIT_PRESETS["wan-1.3b"]
    full = WanDiT.checkpoint_keys(cfg)
    ranges = split_blocks(cfg.num_layers, 3)
    assert ranges == [(0, 10), (10, 20), (20, 30)]
    shards = [WanDiT.checkpoint_keys(cfg, r) for r in ranges]
    embeddings = {
        k for k in full if k.split(".")[0] in ("text_embedding", "time_embedding", "time_projection")
    }
    assert len(embeddings) == 10
    for keys in shards:
        assert embeddings <= set(keys)  # every shard recomputes the time/text embeddings
    assert any(k.startswith("patch_embedding.") for k in shards[0])
    assert not any(k.startswith(("patch_embedding.", "head.")) for k in shards[1])
    assert {k for k in shards[1] if k.startswith("blocks.")} == {
        f"blocks.{i}.{s}" for i in range(10, 20) for s in BLOCK_SUFFIXES
    }
    assert any(k.startswith("head.") for k in shards[2])
    # every non-embedding key is owned by exactly one shard
    owned = [k for keys in shards for k in keys if k not in embeddings]
    assert sorted(owned) == sorted(k for k in full if k not in embeddings)
    assert split_blocks(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_shard_loads_its_slice_of_the_full_checkpoint_and_fails_loudly():
    cfg = DIT_PRESETS["tiny"]
    full = WanDiT(cfg).state_dict()
    middle = WanDiT(cfg, (1, 3))
    middle.load_checkpoint(full)
    assert torch.equal(middle.blocks["2"].ffn[0].weight, full["blocks.2.ffn.0.weight"])
    assert "blocks.0.modulation" not in middle.state_dict()

    broken = dict(full)
    del broken["blocks.1.self_attn.q.weight"]
    broken["model.blocks.1.self_attn.q.weight"] = full["blocks.1.self_attn.q.weight"]
    with pytest.raises(CheckpointError) as err:
        middle.load_checkpoint(broken)
    assert err.value.missing == ["blocks.1.self_attn.q.weight"]
    assert err.value.unexpected == ["model.blocks.1.self_attn.q.weight"]

    with pytest.raises(ValueError, match="block_range"):
        WanDiT(cfg, (2, 2))
