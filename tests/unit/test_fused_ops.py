"""The DiT block's fused pieces (stages.fused) compute what their unfused compositions compute."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.fused import (
    ffn,
    ffn_gelu_epilogue,
    gated_residual,
    gated_residual_norm,
    modulate,
    residual_modulate,
)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(2, 6, 16, generator=gen) for _ in range(2))
    shift, scale, gate = (torch.randn(2, 2, 1, 16, generator=gen) for _ in range(3))
    return x, y, shift, scale, gate


def test_ffn_is_linear_tanh_gelu_linear():
    """On CPU the epilogue variant is plain `ffn` (tests/gpu checks the CUDA epilogue's GELU)."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)
    h = torch.randn(2, 6, 16)
    want = lin2(F.gelu(lin1(h), approximate="tanh"))
    torch.testing.assert_close(ffn(h, lin1, lin2), want, rtol=0, atol=0)
    torch.testing.assert_close(ffn_gelu_epilogue(h, lin1, lin2), want, rtol=1e-5, atol=1e-5)


def test_residual_pieces_equal_their_compositions():
    x, y, shift, scale, gate = _inputs()
    weight, bias = torch.randn(16), torch.randn(16)
    x1, n1 = gated_residual_norm(x, y, gate, weight, bias, 1e-6)
    torch.testing.assert_close(x1, gated_residual(x, y, gate), rtol=0, atol=0)
    torch.testing.assert_close(n1, F.layer_norm(x1, (16,), weight, bias, 1e-6), rtol=0, atol=0)
    x2, h2 = residual_modulate(x, y, shift, scale, 1e-6)
    torch.testing.assert_close(x2, x + y, rtol=0, atol=0)
    # frame f of each row covers tokens 3f..3f+2
    torch.testing.assert_close(h2[:, 3:], modulate(x2, shift, scale, 1e-6)[:, 3:], rtol=0, atol=0)
    expected = F.layer_norm(x2[0, 3], (16,), eps=1e-6) * (1 + scale[0, 1, 0]) + shift[0, 1, 0]
    torch.testing.assert_close(h2[0, 3], expected, rtol=1e-6, atol=1e-6)


def test_nearest_upsample_2x_equals_interpolate_in_both_layouts():
    from stages.fused import nearest_upsample_2x

    x = torch.randn(2, 5, 3, 4)
    want = F.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(want, F.interpolate(x, scale_factor=2.0, mode="nearest-exact"), rtol=0, atol=0)
    fast = nearest_upsample_2x(x.contiguous(memory_format=torch.channels_last))
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, want, rtol=0, atol=0)
    torch.testing.assert_close(nearest_upsample_2x(x), want, rtol=0, atol=0)
    torch.testing.assert_close(nearest_upsample_2x(x.bfloat16()), want.bfloat16(), rtol=0, atol=0)


def test_triton_attention_is_chosen_only_where_it_measured_faster():
    from stages.attention import triton_pays

    assert triton_pays(1, 1560, 12, 9360, 132)  # 1.3B self-attention, one row: 1.26x on an H200
    assert not triton_pays(2, 1560, 12, 9360, 132)  # two rows: even, cuDNN stays
    assert not triton_pays(1, 1560, 40, 9360, 132)  # 14B: 0.87x
    assert not triton_pays(1, 1560, 12, 512, 132)  # cross-attention: too few keys to split
    assert not triton_pays(1, 1024, 12, 6144, 132)  # 512x512: under one wave
