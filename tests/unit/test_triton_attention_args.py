"""stages.triton_attention refuses bad arguments with ValueError before it needs Triton or a GPU."""

from __future__ import annotations

import pytest
import torch

from stages.triton_attention import Tiles, attention_bsnd, num_key_splits


@pytest.mark.parametrize(
    "q_shape, k_shape, dtype, match",
    [
        ((1, 8, 2, 64), (1, 8, 3, 64), torch.float16, "do not fit"),  # heads differ
        ((2, 8, 2, 64), (3, 8, 2, 64), torch.float16, "do not fit"),  # k/v batch neither 1 nor B
        ((1, 8, 2, 64), (1, 0, 2, 64), torch.float16, "do not fit"),  # no keys
        ((1, 8, 2, 96), (1, 8, 2, 96), torch.float16, "head dim 96"),
        ((1, 8, 2, 64), (1, 8, 2, 64), torch.float32, "float16 or all bfloat16"),
    ],
)
def test_bad_arguments_raise_value_error(q_shape, k_shape, dtype, match):
    q, k = torch.zeros(q_shape, dtype=dtype), torch.zeros(k_shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        attention_bsnd(q, k, k)


def test_non_unit_head_stride_is_refused():
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    k = torch.zeros(1, 8, 2, 128, dtype=torch.float16)[..., ::2]
    with pytest.raises(ValueError, match="unit stride"):
        attention_bsnd(q, k, k)


def test_tiles_reject_bad_values():
    with pytest.raises(ValueError, match="block_m=48"):
        Tiles(48, 64)
    with pytest.raises(ValueError, match="num_stages=0"):
        Tiles(64, 64, 4, 0)


@pytest.mark.parametrize("kw, match", [(dict(kernel="cudnn"), "kernel='cudnn'"), (dict(num_splits=0), "num_splits=0")])
def test_bad_kernel_or_split_count_raise_value_error(kw, match):
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=match):
        attention_bsnd(q, q, q, **kw)


@pytest.mark.parametrize(
    "num_tiles, num_keys, expected",
    [
        (156, 9360, 5),  # 1.3B, B=1: 156 tiles on 132 SMs, two waves for 1.18 of work
        (312, 9360, 2),  # B=2: three waves for 2.36
        (624, 9360, 1),  # B=4: five waves for 4.73, nothing to win
        (520, 9360, 1),  # 14B, B=1
        (156, 512, 1),  # cross-attention: the partials' round trip costs more than the waves
        (12, 9360, 8),  # a tiny batch leaves most SMs idle: split to the maximum
    ],
)
def test_split_count_follows_the_wave_cost_model(num_tiles, num_keys, expected):
    assert num_key_splits(num_tiles, num_keys, num_sms=132) == expected
