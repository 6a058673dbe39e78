"""The Wan VAE and TAEHV are checkpoint-compatible by construction: key lists and shapes pinned here."""

from __future__ import annotations

import pytest
import torch

from stages.config import VAE_PRESETS
from stages.taehv import TAEHV, TAEHV_PRESETS
from stages.wan_vae import WanVAE

WAN_VAE_SHAPES = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.0.residual.2.weight": (96, 96, 3, 3, 3),
    "encoder.downsamples.0.residual.6.weight": (96, 96, 3, 3, 3),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.5.resample.1.weight": (192, 192, 3, 3),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
    "encoder.downsamples.8.time_conv.weight": (384, 384, 3, 1, 1),
    "encoder.downsamples.10.residual.6.weight": (384, 384, 3, 3, 3),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.proj.weight": (384, 384, 1, 1),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.middle.2.residual.6.weight": (384, 384, 3, 3, 3),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
    "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}

TAEHV_SHAPES = {
    "encoder.0.weight": (64, 3, 3, 3),
    "encoder.2.conv.weight": (64, 128, 1, 1),
    "encoder.3.weight": (64, 64, 3, 3),
    "encoder.4.conv.0.weight": (64, 128, 3, 3),
    "encoder.12.conv.weight": (64, 64, 1, 1),
    "encoder.17.weight": (16, 64, 3, 3),
    "decoder.1.weight": (256, 16, 3, 3),
    "decoder.3.conv.0.weight": (256, 512, 3, 3),
    "decoder.5.conv.4.bias": (256,),
    "decoder.7.conv.weight": (256, 256, 1, 1),
    "decoder.8.weight": (128, 256, 3, 3),
    "decoder.13.conv.weight": (256, 128, 1, 1),
    "decoder.19.conv.weight": (128, 64, 1, 1),
    "decoder.22.weight": (3, 64, 3, 3),
}


@pytest.fixture(scope="module")
def wan_vae_meta():
    with torch.device("meta"):
        return WanVAE(VAE_PRESETS["wan"])


def test_wan_vae_key_count_and_params(wan_vae_meta):
    state = wan_vae_meta.state_dict()
    assert len(state) == 194
    assert sum(t.numel() for t in state.values()) == 126_892_531


def test_wan_vae_pinned_shapes(wan_vae_meta):
    state = wan_vae_meta.state_dict()
    for key, shape in WAN_VAE_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    # 2D-only resample (no time_conv) at the first downsample and the last upsample
    assert "encoder.downsamples.2.time_conv.weight" not in state
    assert "decoder.upsamples.11.time_conv.weight" not in state


def test_wan_vae_keys_equal_reference(wan_vae_meta):
    ref_vae = pytest.importorskip("models.wan.wan_base.modules.vae")
    with torch.device("meta"):
        ref = ref_vae.WanVAE_(
            dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True],
        )  # fmt: skip
    ours, theirs = wan_vae_meta.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_wan_vae_cache_slots(wan_vae_meta):
    assert len(wan_vae_meta.new_encode_cache().slots) == 26
    assert len(wan_vae_meta.new_decode_cache().slots) == 33


def test_taehv_keys_follow_published_layout():
    with torch.device("meta"):
        model = TAEHV(TAEHV_PRESETS["taew2_1"])
    state = model.state_dict()
    assert len(state) == 128
    for key, shape in TAEHV_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
