"""stages.triton_norms against the pieces they replace (stages.fused, eager), on the DiT's sizes.
bf16 is held to a rel-L2 of 5e-3 (about one rounding of the output; the kernels round fewer times).

Needs CUDA and Triton (skipped without); the CPU checks run the same kernels in Triton's interpreter
(tests/unit/test_norm_kernels.py).
"""

from __future__ import annotations

import pytest
import torch

from stages import fused
from stages import triton_norms as tn

needs_triton = pytest.mark.skipif(not tn.available(), reason="needs triton")


def _inputs(rows, frames, tokens_per_frame, width, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x, y = (torch.randn(rows, frames * tokens_per_frame, width, device="cuda", generator=gen).to(dtype)
            for _ in range(2))
    mod = (0.5 * torch.randn(rows, frames, 6, width, device="cuda", generator=gen)).to(dtype)
    weight, bias = (torch.randn(width, device="cuda", generator=gen).to(dtype) for _ in range(2))
    return x, y, mod[:, :, 0:1], mod[:, :, 1:2], mod[:, :, 2:3], weight, bias


def _rel(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("rows, frames, tokens_per_frame, width", [
    (1, 1, 1560, 1536),   # 1.3B, 480x832, one latent frame
    (2, 1, 1560, 1536),   # two rows
    (1, 2, 1560, 1536),   # a 2-frame prefill: the per-frame vectors switch at token 1560
    (1, 1, 1560, 5120),   # 14B
    (1, 2, 7, 40),        # ragged: width and tokens not multiples of anything
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_kernels_match_the_eager_pieces(rows, frames, tokens_per_frame, width, dtype):
    x, y, shift, scale, gate, weight, bias = _inputs(rows, frames, tokens_per_frame, width, dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert _rel(tn.modulate(x, shift, scale, 1e-6), fused.modulate(x, shift, scale, 1e-6)) <= tol
    for ours, ref in (
        (tn.gated_residual_norm(x, y, gate, weight, bias, 1e-6), fused.gated_residual_norm(x, y, gate, weight, bias, 1e-6)),
        (tn.residual_modulate(x, y, shift, scale, 1e-6), fused.residual_modulate(x, y, shift, scale, 1e-6)),
    ):
        assert _rel(ours[0], ref[0]) <= tol and _rel(ours[1], ref[1]) <= tol


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("rows, cos_rows, tokens, heads", [
    (1, 1, 1560, 12),     # 1.3B self-attention, one row
    (2, 2, 3120, 12),     # two rows of a 2-frame prefill, a table per row
    (2, 1, 1560, 12),     # one table for both rows
    (1, 1, 1560, 40),     # 14B
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_kernels_match_the_eager_pieces(rows, cos_rows, tokens, heads, dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows, tokens, heads * 128, device="cuda", generator=gen).to(dtype)
    weight = torch.randn(heads * 128, device="cuda", generator=gen).to(dtype)
    angle = torch.rand(cos_rows, tokens, 1, 64, device="cuda", generator=gen) * 6.3
    cos, sin = angle.cos(), angle.sin()
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    ours = tn.rms_norm_rotate(x, weight, 1e-6, heads, cos, sin)
    assert ours.shape == (rows, tokens, heads, 128)
    assert _rel(ours, fused.rms_norm_rotate(x, weight, 1e-6, heads, cos, sin)) <= tol
    assert _rel(tn.rms_norm(x, weight, 1e-6), fused.rms_norm(x, weight, 1e-6)) <= tol


@pytest.mark.gpu
@needs_triton
def test_norm_kernels_replay_in_a_cuda_graph():
    x, y, shift, scale, gate, weight, bias = _inputs(1, 1, 1560, 1536, torch.bfloat16)
    eager = tn.residual_modulate(x, y, shift, scale, 1e-6)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = tn.residual_modulate(x, y, shift, scale, 1e-6)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static[0], eager[0]) and torch.equal(static[1], eager[1])


@pytest.mark.gpu
@needs_triton
def test_the_compiled_ops_dispatch_contiguous_cuda_inputs_to_the_kernels():
    x, y, shift, scale, gate, weight, bias = _inputs(1, 1, 1560, 1536, torch.bfloat16)
    ops = fused.compiled_ops()
    assert torch.equal(ops.modulate(x, shift, scale, 1e-6), tn.modulate(x, shift, scale, 1e-6))
    for ours, kernel in zip(ops.residual_modulate(x, y, shift, scale, 1e-6), tn.residual_modulate(x, y, shift, scale, 1e-6)):
        assert torch.equal(ours, kernel)
    strided = x[:, ::2]  # not contiguous: the compiled piece takes it
    assert not tn.usable(strided)
    assert torch.equal(ops.modulate(strided, shift, scale, 1e-6),
                       fused.compiled_ops().modulate.__wrapped__(strided, shift, scale, 1e-6))
