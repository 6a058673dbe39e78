"""Attention kernels of the DiT: dense (cross-attention) and KV-cache attention with per-row lengths.

Shape legend:
    B  rows (query batch)        M  query tokens per row
    S  key tokens per row        N  heads        D  head dim (128)
    C  cache capacity in tokens (num_kv_cache_frames * tokens_per_frame)
    R  rows of the cache tensor (the cache may hold more slots than the query batch uses)

Both functions are non-causal with softmax scale 1/sqrt(D). On CUDA with flash-attn installed and a
half dtype they call `flash_attn_func` / `flash_attn_with_kvcache`; otherwise they use torch SDPA,
except where Weir's Triton kernel (stages.triton_attention) is faster: unmasked attention whose
(row, head, 128-query tile) programs leave cuDNN a mostly empty last wave, and whose keys the kernel
splits so that its waves come out fuller (`triton_pays`). That is the 1.3B model's self-attention at
480x832 with one row (12 heads x 13 tiles = 156 programs on 132 SMs: cuDNN runs two waves for 1.18 of
work; 9360 keys in 5 splits: 1.37x, H200) or two rows (312 programs, three waves for 2.36; 2 splits:
1.08x), and two rows at 512x512 (1.06x). Unsplit, the Triton kernel is slower than cuDNN per SM
(`TRITON_PER_SM`), so with fuller waves (three or four rows, the 14B model's 40 heads), too few keys
to split (the cross-attention), or one wave (512x512, one row: 96 programs), SDPA stays;
BENCHMARKS.md has the figures.
The kernel runs with pinned tiles (`SPLIT_TILES`, the autotuner's choice for the split shapes on
an H200), never autotuned at run time: a first stream at a new resolution would otherwise stall the
GPU, and every stream on it, for seconds of benchmarking. `WEIR_ATTENTION=sdpa` turns the Triton
path off.
The KV-cache SDPA path masks keys at positions >= length over the full capacity instead of slicing to
the longest length, so it needs no host sync.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from stages import triton_attention

try:  # optional dependency
    from flash_attn import flash_attn_func, flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None
    flash_attn_with_kvcache = None

_HALF = (torch.float16, torch.bfloat16)


SPLIT_TILES = triton_attention.Tiles(block_m=64, block_n=64, num_warps=4, num_stages=3)
"""Launch config of the split kernel (stages.triton_attention `_CONFIGS`: its winner on the split shapes)."""


def _use_flash(x: torch.Tensor) -> bool:
    return flash_attn_func is not None and x.is_cuda and x.dtype in _HALF


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _use_triton(q_BMND: torch.Tensor, k_BSND: torch.Tensor) -> bool:
    """Module docstring: CUDA, half precision, a supported head dim, under two waves of programs, and
    keys the kernel splits."""
    if not (q_BMND.is_cuda and q_BMND.dtype in _HALF and k_BSND.dtype == q_BMND.dtype):
        return False
    if os.environ.get("WEIR_ATTENTION", "") == "sdpa" or not triton_attention.available():
        return False
    b, m, n, d = q_BMND.shape
    if d not in triton_attention.HEAD_DIMS:
        return False
    return triton_pays(b, m, n, k_BSND.shape[1], _num_sms(q_BMND.device))


TRITON_PER_SM = 1.1
"""How much slower per SM than cuDNN Weir's split kernel runs (1.07-1.09 measured on an H200)."""


def triton_pays(rows: int, queries: int, heads: int, keys: int, num_sms: int) -> bool:
    """Whether the split Triton kernel beats cuDNN for this shape (module docstring): over one wave of
    T (row, head, 128-query) programs, cuDNN's ceil(T / SMs) waves against the split kernel's cost
    (stages.triton_attention `split_cost`, at its best split count > 1) times TRITON_PER_SM.

    Example (132 SMs, 1.3B at 480x832, 9360 keys): one row, T = 156: 1.35 x 1.1 = 1.48 < 2 waves ->
    True (1.37x measured); two rows, T = 312: 2.62 x 1.1 = 2.89 < 3 -> True (1.08x); three and four
    rows (0.92x, 0.90x), 14B (T = 520, 0.93x) and the cross-attention (512 keys, no split) -> False;
    512x512: one row (T = 96, one wave) -> False (0.95x), two rows -> True (1.06x).
    """
    programs = rows * heads * -(-queries // 128)
    if programs <= num_sms:  # one wave: 0.95x measured at 512x512 where the model gives 1.05x
        return False
    splits = triton_attention.num_key_splits(programs, keys, num_sms)
    if splits == 1:
        return False
    cost = triton_attention.split_cost(programs, splits, keys, num_sms)
    return cost * TRITON_PER_SM < -(-programs // num_sms)


def attend(q_BMND: torch.Tensor, k_BSND: torch.Tensor, v_BSND: torch.Tensor) -> torch.Tensor:
    """Dense non-causal attention; k/v may have batch 1 (broadcast to B). Returns [B, M, N, D]."""
    if k_BSND.shape[0] != q_BMND.shape[0]:
        k_BSND = k_BSND.expand(q_BMND.shape[0], -1, -1, -1)
        v_BSND = v_BSND.expand(q_BMND.shape[0], -1, -1, -1)
    if _use_flash(q_BMND):
        return flash_attn_func(q_BMND, k_BSND.contiguous(), v_BSND.contiguous())
    if _use_triton(q_BMND, k_BSND):
        return triton_attention.attention_bsnd(q_BMND, k_BSND, v_BSND, tiles=SPLIT_TILES)
    out_BNMD = F.scaled_dot_product_attention(
        q_BMND.transpose(1, 2), k_BSND.transpose(1, 2), v_BSND.transpose(1, 2)
    )
    return out_BNMD.transpose(1, 2)


def attend_kv_cache(
    q_BMND: torch.Tensor,
    k_cache_RCND: torch.Tensor,
    v_cache_RCND: torch.Tensor,
    lengths_B: torch.Tensor | None,
    cache_rows_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend each query row to the first lengths_B[b] cached keys of its cache row (None: the
    whole cache, every row full; then no mask is built and SDPA can take its flash kernels).

    Args:
        q_BMND: queries (already rotated).
        k_cache_RCND, v_cache_RCND: caches (keys stored rotated); row b reads cache row
            cache_rows_B[b], or row b itself when cache_rows_B is None (then R == B).
        lengths_B: valid cache tokens per query row, each in [1, C].
        cache_rows_B: optional int64 map from query row to cache row.

    Returns:
        [B, M, N, D] in q's dtype.

    Example: lengths_B = [96, 64] with C = 96 -> row 0 sees the whole cache, row 1 its first 64 tokens.
    """
    if _use_flash(q_BMND):
        return flash_attn_with_kvcache(
            q_BMND,
            k_cache_RCND,
            v_cache_RCND,
            cache_seqlens=None if lengths_B is None else lengths_B.to(torch.int32),
            cache_batch_idx=None if cache_rows_B is None else cache_rows_B.to(torch.int32),
        )
    if lengths_B is None and cache_rows_B is None and _use_triton(q_BMND, k_cache_RCND):
        return triton_attention.attention_bsnd(q_BMND, k_cache_RCND, v_cache_RCND, tiles=SPLIT_TILES)
    if cache_rows_B is not None:
        k_cache_RCND = k_cache_RCND.index_select(0, cache_rows_B)
        v_cache_RCND = v_cache_RCND.index_select(0, cache_rows_B)
    valid_B11C = None
    if lengths_B is not None:
        capacity = k_cache_RCND.shape[1]
        valid_B11C = (torch.arange(capacity, device=q_BMND.device)[None, :] < lengths_B[:, None])[
            :, None, None, :
        ]
    q, k, v = q_BMND.transpose(1, 2), k_cache_RCND.transpose(1, 2), v_cache_RCND.transpose(1, 2)
    if q.device.type == "cpu" and q.dtype in _HALF:  # CPU SDPA is slow and lossy in half precision
        out_BNMD = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=valid_B11C)
        return out_BNMD.transpose(1, 2).to(q_BMND.dtype)
    out_BNMD = F.scaled_dot_product_attention(q, k, v, attn_mask=valid_B11C)
    return out_BNMD.transpose(1, 2)
