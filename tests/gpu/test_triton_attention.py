"""stages.triton_attention against torch SDPA (fp32 math) at the DiT's attention shapes.

Needs CUDA and Triton (skipped without); the argument checks are in tests/unit/test_triton_attention_args.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages import triton_attention as ta
from stages.triton_attention import Tiles, attention_bsnd

needs_triton = pytest.mark.skipif(not ta.available(), reason="needs triton")


def _reference(q_BMND, k_BSND, v_BSND):
    q, k, v = (x.float() for x in (q_BMND, k_BSND, v_BSND))
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _inputs(B, Bk, M, S, N, D, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, t, N, D, device="cuda", generator=gen).to(dtype) for b, t in ((B, M), (Bk, S), (Bk, S))]


def _rel_l2(out, ref):
    assert torch.isfinite(out).all()
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(
    "B, Bk, M, S, N",
    [
        (1, 1, 1560, 9360, 12),  # 1.3B self-attention, one row
        (2, 2, 1560, 9360, 12),  # two rows, each its own cache
        (2, 1, 1560, 512, 12),  # cross-attention, one prompt K/V for both rows
        (1, 1, 1560, 9360, 40),  # 14B self-attention
    ],
)
def test_hot_shapes_match_sdpa(B, Bk, M, S, N):
    q, k, v = _inputs(B, Bk, M, S, N, 128, torch.bfloat16, seed=B + 10 * N + S)
    out = attention_bsnd(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_l2(out, _reference(q, k, v)) < 1e-2


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("kernel, num_splits", [("ptr", None), ("tma", 1), ("tma", 3)])
def test_each_kernel_and_split_count_matches_sdpa(kernel, num_splits):
    q, k, v = _inputs(1, 1, 1560, 9360, 12, 128, torch.bfloat16, seed=3)
    out = attention_bsnd(q, k, v, kernel=kernel, num_splits=num_splits, tiles=Tiles(128, 64, 8, 3))
    assert _rel_l2(out, _reference(q, k, v)) < 1e-2


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kernel, num_splits", [("ptr", None), ("tma", 1), ("tma", 2)])
def test_tails_strides_and_dtypes(dtype, D, kernel, num_splits):
    """Partial query and key tiles, strided views (q out of a fused QKV, k/v out of a cache)."""
    gen = torch.Generator(device="cuda").manual_seed(D)
    qkv = torch.randn(3, 200, 3 * 4, D, device="cuda", generator=gen).to(dtype)
    cache = torch.randn(3, 2, 500, 4, D, device="cuda", generator=gen).to(dtype)
    q, k, v = qkv[:, :, 4:8], cache[:, 0, :333], cache[:, 1, :333]
    out = attention_bsnd(q, k, v, kernel=kernel, num_splits=num_splits, tiles=Tiles(64, 64, 4, 3))
    assert _rel_l2(out, _reference(q, k, v)) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
@needs_triton
def test_cuda_graph_replay_equals_eager():
    q, k, v = _inputs(2, 1, 1560, 512, 12, 128, torch.bfloat16, seed=7)
    eager = attention_bsnd(q, k, v)  # autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention_bsnd(q, k, v)
    q.copy_(torch.randn_like(q))  # replay must read the new inputs
    graph.replay()
    assert torch.equal(captured, attention_bsnd(q, k, v))
    assert not torch.equal(captured, eager)
