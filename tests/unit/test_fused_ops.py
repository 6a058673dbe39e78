"""The DiT block's fused pieces (stages.fused) compute what their unfused compositions compute."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_phase_convs_equal_nearest_upsample_then_conv(layout):
    """The sub-pixel form of the Wan decoder's upsample conv: four 2x2 phase convs of the input,
    interleaved, equal a 2x nearest upsample then the 3x3 conv (padding 1), borders included."""
    from stages.fused import interleave_phases_2x, phase_kernels_2x

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64, generator=gen).contiguous(memory_format=layout)
    weight = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=gen).contiguous(memory_format=layout)
    bias = torch.randn(6, dtype=torch.float64, generator=gen)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)
    phases = F.conv2d(x, phase_kernels_2x(weight), None, padding=1)
    got = interleave_phases_2x(phases, bias)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ones = phase_kernels_2x(torch.ones(1, 1, 3, 3))[:, 0]
    assert ones.tolist() == [[[1, 2], [2, 4]], [[2, 1], [4, 2]], [[2, 4], [1, 2]], [[4, 2], [2, 1]]]


def test_triton_attention_is_chosen_only_where_it_measured_faster():
    from stages.attention import triton_pays

    # figures: SDPA's time over the split kernel's, H200, 2026-12-02 (BENCHMARKS.md)
    assert triton_pays(1, 1560, 12, 9360, 132)  # 1.3B self-attention, one row: 1.37x
    assert triton_pays(2, 1560, 12, 9360, 132)  # two rows (2 denoising steps), 2 splits: 1.08x
    assert not triton_pays(3, 1560, 12, 9360, 132)  # three rows: 0.92x
    assert not triton_pays(4, 1560, 12, 9360, 132)  # four rows: 0.90x
    assert not triton_pays(1, 1560, 40, 9360, 132)  # 14B: 0.93x
    assert not triton_pays(1, 1560, 12, 512, 132)  # cross-attention: too few keys to split
    assert not triton_pays(1, 1024, 12, 6144, 132)  # 512x512, one row (one wave): 0.95x
    assert triton_pays(2, 1024, 12, 6144, 132)  # 512x512, two rows: 1.06x


def test_a_compiled_piece_past_the_recompile_limit_runs_eagerly(caplog):
    """A static-shape piece that meets more shapes than dynamo allows would raise under fullgraph (a
    server that has seen many resolutions); it runs those shapes eagerly instead, warning once."""
    import logging

    import torch._dynamo

    from stages.fused import _compile, _recompile_limit_errors

    assert _recompile_limit_errors()  # this torch names the error

    def scale_shift(x):
        return x * 3 + 1

    piece = _compile(scale_shift, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, logger="stages.fused"):
        for n in range(1, 6):
            x = torch.randn(n, 4)
            torch.testing.assert_close(piece(x), scale_shift(x))
    assert sum("recompile limit" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dims", [2, 3])
def test_an_rgb_input_conv_on_padded_channels_gives_the_same_values(dims):
    """The VAEs' 3-channel input convs run on 16 zero-padded channels on the GPU layout (cuDNN's
    tensor-core kernels); a conv whose channels are already a multiple of 16 keeps its weight."""
    from stages.fused import conv_forward, set_padded_input

    conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, *([4] * dims), dtype=torch.float64)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert "padded_weight" not in conv._buffers
    set_padded_input(conv, True)
    assert conv.padded_weight.shape[1] == 16 and "padded_weight" not in conv.state_dict()
    for xin in (x, x.contiguous(memory_format=layout)):
        torch.testing.assert_close(conv_forward(conv, xin, conv.bias), conv._conv_forward(xin, conv.weight, conv.bias))
    set_padded_input(conv, False)
    assert "padded_weight" not in conv._buffers
    wide = torch.nn.Conv2d(16, 4, 3)
    set_padded_input(wide, True)
    assert "padded_weight" not in wide._buffers


def test_cudnn_autotuning_tries_every_algorithm_unless_told(monkeypatch):
    """stages.loading.use_cudnn_autotuning: benchmark on with every algorithm (limit 0), or the
    environment's count; a count that is not one is a ValueError naming it; off leaves the limit."""
    import torch

    from stages.loading import use_cudnn_autotuning

    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit
    try:
        monkeypatch.delenv("WEIR_CUDNN_BENCHMARK_LIMIT", raising=False)
        use_cudnn_autotuning()
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.benchmark_limit == 0
        monkeypatch.setenv("WEIR_CUDNN_BENCHMARK_LIMIT", "10")
        use_cudnn_autotuning()
        assert torch.backends.cudnn.benchmark_limit == 10
        use_cudnn_autotuning(False)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.benchmark_limit == 10
        monkeypatch.setenv("WEIR_CUDNN_BENCHMARK_LIMIT", "all")
        with pytest.raises(ValueError, match="WEIR_CUDNN_BENCHMARK_LIMIT='all'"):
            use_cudnn_autotuning()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = before
