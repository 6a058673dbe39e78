"""A Triton flash-attention forward kernel that reads the DiT's BSND tensors in place.

Shape legend:
    B  rows (query batch)       M  query tokens per row     S  key tokens per row
    N  heads                    D  head dim (64 or 128)     Bk rows of k/v: B, or 1 (shared by every row)
    P  key splits (split-KV; 1 = none)

`attention_bsnd(q_BMND, k_BSND, v_BSND)` is non-causal, unmasked attention with softmax scale
1/sqrt(D) (or `scale`), the same function as torch SDPA on the BNSD transposes, but it takes the
[B, M, N, D] / [B, S, N, D] layouts the DiT produces as they are: every row, token and head offset
goes through the tensors' strides, so nothing is transposed or copied. k/v with batch 1 serve every
query row (the cross-attention's one prompt K/V for B rows).

The algorithm is the online softmax. One program owns BLOCK_M queries of one (row, head) and walks
its keys BLOCK_N at a time, keeping per query the running maximum m, the running sum l of
exponentials and the unnormalised output acc (all fp32):

    s     = q @ k_blk^T                            fp32 accumulation
    m_new = max(m, rowmax(s) * c)                  c = scale * log2(e): base-2 logits, exp() -> exp2()
    p     = exp2(s * c - m_new)                    one FMA + exp2 per logit; cast to q's dtype for PV
    l     = l * exp2(m - m_new) + rowsum(p)
    acc   = acc * exp2(m - m_new) + p @ v_blk
    out   = acc / l                                once, after the last key block

Full key blocks run unmasked; only the last, partial one (S not a multiple of BLOCK_N) masks its
keys to -inf.

Two kernels. On Hopper (compute capability 9) with 16-byte aligned strides and the heads packed
(stride along N == D), `_attention_fwd_tma` moves tiles with the tensor-memory accelerator through
host-side descriptors over the 3-D views [B, M or S, N*D] (out-of-range rows read as zero and are
not written), and may split the keys of each (row, head, query tile) over P programs; a second
kernel `_combine_splits` merges the P partial results by their log-sum-exp. Anywhere else (older
GPUs, other strides, the Triton interpreter) `_attention_fwd_ptr` does the same with plain pointer
loads and masks, without splits.

Split-KV exists for wave quantisation: a program holds one SM (its K/V pipeline fills the shared
memory), so 156 programs on 132 SMs take two full waves for 1.18 waves of work. `num_key_splits` picks
P from a cost model; see its docstring for the worked numbers.

Worked example (Wan2.1 1.3B self-attention, 480x832): q [1, 1560, 12, 128], k/v [1, 9360, 12, 128].
    c = (1 / sqrt(128)) * log2(e) = 0.0883883 * 1.4426950 = 0.1275174
    BLOCK_M = 128 -> ceil(1560 / 128) = 13 query tiles x (B * N = 12) = 156 tiles
    BLOCK_N = 128 -> 9360 = 73 full key blocks + one of 16 keys (masked): 74 blocks
    P = 5         -> ceil(74 / 5) = 15 blocks per split (the last split gets 14); 780 programs
    work = 4 * B * M * S * N * D = 4 * 1 * 1560 * 9360 * 12 * 128 = 89.7 GFLOP

Tile sizes come from `triton.autotune` over `_CONFIGS`, keyed on (M, S, D, B * N, P) and the dtype
(the row-times-head count sets how many programs there are). The first call of a new key benchmarks
every config on the GPU (seconds), so run one eager call before capturing the kernel in a CUDA
graph. `tiles=Tiles(...)` pins a config instead (no tuning); the interpreter can only run that way.

The module imports without Triton; then `available()` is False and `attention_bsnd` raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:  # optional dependency: bundled with CUDA builds of torch
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None
    TensorDescriptor = None

LOG2_E = 1.4426950408889634
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
KERNELS = ("tma", "ptr")
MAX_SPLITS = 8
_COMBINE_BLOCK_M = 64


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of the attention kernel."""

    block_m: int
    """Queries per program (16..256, a power of two)."""
    block_n: int
    """Keys per inner-loop step (16..256, a power of two)."""
    num_warps: int = 4
    """Warps per program (1..16, a power of two)."""
    num_stages: int = 2
    """Software-pipelining depth of the key/value loads (1..6)."""

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("block_m", self.block_m, 16, 256),
            ("block_n", self.block_n, 16, 256),
            ("num_warps", self.num_warps, 1, 16),
        ):
            if not (low <= value <= high and value & (value - 1) == 0):
                raise ValueError(f"Tiles.{name}={value}: use a power of two in [{low}, {high}]")
        if not 1 <= self.num_stages <= 6:
            raise ValueError(f"Tiles.num_stages={self.num_stages}: use 1..6")


# A config that does not fit the chip's shared memory is skipped by the autotuner (timed as infinitely
# slow). On an H200 (128, 128, 8, 3) wins the unsplit long self-attention shapes, (64, 64, 4, 3) the
# split ones and the 512-key cross-attention.
_CONFIGS = (
    Tiles(128, 128, 8, 2),
    Tiles(128, 128, 8, 3),
    Tiles(128, 64, 8, 3),
    Tiles(128, 64, 8, 4),
    Tiles(128, 64, 4, 3),
    Tiles(64, 128, 4, 2),
    Tiles(64, 128, 4, 3),
    Tiles(64, 128, 8, 3),
    Tiles(64, 64, 4, 3),
    Tiles(64, 64, 4, 4),
)


def available() -> bool:
    """True when Triton is importable (the kernels still need CUDA tensors, or the interpreter)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _softmax_update(
        acc, l_i, m_i, q, k, v, qk_scale_log2, start_n, S, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr
    ):
        """Fold the key block k, v [BLOCK_N, D] (keys start_n...) into the running (acc, l, m)."""
        s = tl.dot(q, tl.trans(k))
        if MASK_KEYS:
            valid_n = (start_n + tl.arange(0, BLOCK_N)) < S
            s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
        p = tl.exp2(s * qk_scale_log2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, l_i, m_new

    @triton.jit
    def _attention_fwd_ptr(
        Q, K, V, Out,
        qk_scale_log2,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_om, stride_oh,
        num_heads, num_bh, M, S,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EVEN_M: tl.constexpr,
        EVEN_S: tl.constexpr,
    ):  # fmt: skip
        """Grid (ceil(M / BLOCK_M), B * N): program (i, b * N + h) writes Out[b, i*BLOCK_M:, h, :]."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        row = (pid_bh // num_heads).to(tl.int64)
        head = (pid_bh % num_heads).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + row * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        k_ptrs = K + row * stride_kb + head * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + row * stride_vb + head * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
        if EVEN_M:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < M, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        num_full = S // BLOCK_N
        for block in range(0, num_full):
            start_n = block * BLOCK_N
            k = tl.load(k_ptrs + start_n * stride_ks)
            v = tl.load(v_ptrs + start_n * stride_vs)
            acc, l_i, m_i = _softmax_update(
                acc, l_i, m_i, q, k, v, qk_scale_log2, start_n, S, BLOCK_N, MASK_KEYS=False
            )
        if not EVEN_S:
            start_n = num_full * BLOCK_N
            valid_n = (start_n + offs_n)[:, None] < S
            k = tl.load(k_ptrs + start_n * stride_ks, mask=valid_n, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vs, mask=valid_n, other=0.0)
            acc, l_i, m_i = _softmax_update(
                acc, l_i, m_i, q, k, v, qk_scale_log2, start_n, S, BLOCK_N, MASK_KEYS=True
            )

        out = (acc / l_i[:, None]).to(Out.dtype.element_ty)
        o_ptrs = Out + row * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        if EVEN_M:
            tl.store(o_ptrs, out)
        else:
            tl.store(o_ptrs, out, mask=offs_m[:, None] < M)

    @triton.jit
    def _attention_fwd_tma(
        desc_q, desc_k, desc_v, desc_o, Part_O, Part_LSE,
        qk_scale_log2,
        num_heads, num_bh, kv_rows, M, S, num_splits,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
    ):  # fmt: skip
        """Grid (ceil(M / BLOCK_M), B * N, P): program (i, b * N + h, p) attends its query tile to the
        p-th of P equal runs of key blocks. P == 1: writes Out through desc_o. P > 1: writes the
        normalised partial output to Part_O [P, B*N, M, D] (the input's dtype) and its base-2
        log-sum-exp to Part_LSE [P, B*N, M] (fp32) for `_combine_splits`."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        split = tl.program_id(2)
        row = pid_bh // num_heads
        row_kv = row % kv_rows  # kv_rows == 1: every row reads k/v row 0
        col = (pid_bh % num_heads) * HEAD_DIM
        q = desc_q.load([row, pid_m * BLOCK_M, col]).reshape([BLOCK_M, HEAD_DIM])

        num_blocks = tl.cdiv(S, BLOCK_N)
        per_split = tl.cdiv(num_blocks, num_splits)
        lo = tl.minimum(split * per_split, num_blocks)
        hi = tl.minimum(lo + per_split, num_blocks)
        hi_full = tl.maximum(lo, tl.minimum(hi, S // BLOCK_N))  # full blocks: [lo, hi_full)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for block in range(lo, hi_full):
            start_n = block * BLOCK_N
            k = desc_k.load([row_kv, start_n, col]).reshape([BLOCK_N, HEAD_DIM])
            v = desc_v.load([row_kv, start_n, col]).reshape([BLOCK_N, HEAD_DIM])
            acc, l_i, m_i = _softmax_update(
                acc, l_i, m_i, q, k, v, qk_scale_log2, start_n, S, BLOCK_N, MASK_KEYS=False
            )
        if hi_full < hi:  # this split owns the partial last key block
            start_n = hi_full * BLOCK_N
            k = desc_k.load([row_kv, start_n, col]).reshape([BLOCK_N, HEAD_DIM])
            v = desc_v.load([row_kv, start_n, col]).reshape([BLOCK_N, HEAD_DIM])
            acc, l_i, m_i = _softmax_update(
                acc, l_i, m_i, q, k, v, qk_scale_log2, start_n, S, BLOCK_N, MASK_KEYS=True
            )

        if SPLIT:
            has_keys = l_i > 0  # a split past the last key block (never with num_key_splits) has none
            l_safe = tl.where(has_keys, l_i, 1.0)
            lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            base = (split * num_bh + pid_bh).to(tl.int64) * M
            tl.store(Part_LSE + base + offs_m, lse, mask=offs_m < M)
            offs_d = tl.arange(0, HEAD_DIM)
            o_ptrs = Part_O + (base + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
            tl.store(o_ptrs, (acc / l_safe[:, None]).to(Part_O.dtype.element_ty), mask=offs_m[:, None] < M)
        else:
            out = (acc / l_i[:, None]).to(desc_o.dtype)
            desc_o.store([row, pid_m * BLOCK_M, col], out.reshape([1, BLOCK_M, HEAD_DIM]))

    @triton.jit
    def _combine_splits(
        Part_O, Part_LSE, Out,
        stride_ob, stride_om, stride_oh,
        num_heads, num_bh, M, num_splits,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """out = sum_p 2^(lse_p - lse_max) o_p / sum_p 2^(lse_p - lse_max), per query; grid
        (ceil(M / BLOCK_M), B * N)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        valid_m = offs_m < M
        lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for split in range(0, num_splits):
            rows = (split * num_bh + pid_bh).to(tl.int64) * M + offs_m
            lse_max = tl.maximum(lse_max, tl.load(Part_LSE + rows, mask=valid_m, other=float("-inf")))
        lse_max = tl.where(valid_m, lse_max, 0.0)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for split in range(0, num_splits):
            rows = (split * num_bh + pid_bh).to(tl.int64) * M + offs_m
            weight = tl.exp2(tl.load(Part_LSE + rows, mask=valid_m, other=float("-inf")) - lse_max)
            part_ptrs = Part_O + rows[:, None] * HEAD_DIM + offs_d[None, :]
            part = tl.load(part_ptrs, mask=valid_m[:, None], other=0.0).to(tl.float32)
            acc += weight[:, None] * part
            total += weight
        total = tl.where(valid_m, total, 1.0)
        row = (pid_bh // num_heads).to(tl.int64)
        head = (pid_bh % num_heads).to(tl.int64)
        o_ptrs = Out + row * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, (acc / total[:, None]).to(Out.dtype.element_ty), mask=valid_m[:, None])

    def _set_block_shapes(nargs: dict) -> None:
        """Autotune pre-hook: the descriptors' boxes follow the config's tile sizes."""
        for name in ("desc_q", "desc_o"):
            nargs[name].block_shape = [1, nargs["BLOCK_M"], nargs["HEAD_DIM"]]
        for name in ("desc_k", "desc_v"):
            nargs[name].block_shape = [1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]

    def _triton_configs(pre_hook=None) -> list:
        return [
            triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n}, num_warps=t.num_warps,
                          num_stages=t.num_stages, pre_hook=pre_hook)
            for t in _CONFIGS
        ]

    _attention_fwd_ptr_even = triton.heuristics(
        {
            "EVEN_M": lambda args: args["M"] % args["BLOCK_M"] == 0,
            "EVEN_S": lambda args: args["S"] % args["BLOCK_N"] == 0,
        }
    )(_attention_fwd_ptr)
    _attention_fwd_ptr_tuned = triton.autotune(_triton_configs(), key=["M", "S", "HEAD_DIM", "num_bh"])(
        _attention_fwd_ptr_even
    )
    _attention_fwd_tma_tuned = triton.autotune(
        _triton_configs(_set_block_shapes), key=["M", "S", "HEAD_DIM", "num_bh", "num_splits"]
    )(_attention_fwd_tma)


def _check(q_BMND: torch.Tensor, k_BSND: torch.Tensor, v_BSND: torch.Tensor) -> None:
    if q_BMND.dim() != 4 or k_BSND.dim() != 4 or v_BSND.shape != k_BSND.shape:
        raise ValueError(
            f"want q [B, M, N, D] and k, v [B or 1, S, N, D] of one shape; got q {tuple(q_BMND.shape)}, "
            f"k {tuple(k_BSND.shape)}, v {tuple(v_BSND.shape)}"
        )
    B, _, N, D = q_BMND.shape
    Bk, S, Nk, Dk = k_BSND.shape
    if Bk not in (1, B) or (Nk, Dk) != (N, D) or S == 0:
        raise ValueError(
            f"k/v {tuple(k_BSND.shape)} do not fit q {tuple(q_BMND.shape)}: want batch 1 or {B}, "
            f"at least one key, {N} heads of dim {D}"
        )
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported; use one of {HEAD_DIMS}")
    if q_BMND.dtype not in DTYPES or k_BSND.dtype != q_BMND.dtype or v_BSND.dtype != q_BMND.dtype:
        raise ValueError(
            f"want q, k, v all float16 or all bfloat16; got {q_BMND.dtype}, {k_BSND.dtype}, {v_BSND.dtype}"
        )
    if not (q_BMND.device == k_BSND.device == v_BSND.device):
        raise ValueError(f"q, k, v on different devices: {q_BMND.device}, {k_BSND.device}, {v_BSND.device}")
    for name, x in (("q", q_BMND), ("k", k_BSND), ("v", v_BSND)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the head dim; got strides {x.stride()}")


def _packed_view_strides(x: torch.Tensor) -> tuple[int, int] | None:
    """(row, token) strides of x [R, T, N, D] seen as [R, T, N*D], 16-byte aligned; None if it can't be."""
    R, T, N, D = x.shape
    if x.stride(2) != D or x.data_ptr() % 16:
        return None
    stride_t = x.stride(1) if T > 1 else N * D
    stride_r = x.stride(0) if R > 1 else T * stride_t
    if (stride_t * x.element_size()) % 16 or (stride_r * x.element_size()) % 16:
        return None
    return stride_r, stride_t


def _tma_usable(*tensors: torch.Tensor) -> bool:
    x = tensors[0]
    if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(_packed_view_strides(t) is not None for t in tensors)


SPLIT_ROUND_TRIP = 1.35e-4
"""`split_cost`'s price of one tile's partial output round trip, in tile key walks at S = 9360."""


def split_cost(num_tiles: int, num_splits: int, num_keys: int, num_sms: int) -> float:
    """Time of `num_tiles` (row, head, 128-query) tiles over `num_keys` keys in `num_splits` splits, in
    units of one tile's full key walk on one SM (`num_key_splits` has the model and its numbers)."""
    waves = math.ceil(num_tiles * num_splits / num_sms) / num_splits
    if num_splits == 1:
        return waves
    return waves + SPLIT_ROUND_TRIP * num_splits * num_tiles * (9360 / num_keys) + 0.04


def num_key_splits(num_tiles: int, num_keys: int, num_sms: int) -> int:
    """Key splits P for `num_tiles` (row, head, 128-query) tiles over `num_keys` keys on `num_sms` SMs.

    Cost in units of one tile's full key walk: ceil(T * P / SMs) / P waves (one program per SM), plus
    for P > 1 the partial outputs' round trip, P * T * (2 * 128 * D * 2 bytes, in the input's half
    dtype) at ~3.5 TB/s, against a tile's 4 * 128 * S * D flops at ~4.4 TFLOP/s per SM (D cancels):
    1.35e-4 * P * T * (9360 / S), and a fixed 0.04 for the second launch (`split_cost`). Take the
    cheapest P <= MAX_SPLITS.

    Example (H200, 132 SMs, S = 9360): T = 156 (1.3B, B = 1): P = 1 costs 2.00 (two waves for 1.18
    of work), P = 4 costs 5/4 + 0.08 + 0.04 = 1.37, P = 5 costs 6/5 + 0.11 + 0.04 = 1.35 -> 5.
    T = 312 (B = 2): P = 1 costs 3 waves for 2.36 of work, P = 2 costs 5/2 + 0.08 + 0.04 = 2.62 -> 2.
    T = 624 (B = 4): P = 1 costs 5 waves for 4.73 of work -> 1. S = 512 (cross-attention): the
    round trip outweighs any gain -> 1.
    """
    return min(range(1, MAX_SPLITS + 1), key=lambda p: split_cost(num_tiles, p, num_keys, num_sms))


def attention_bsnd(
    q_BMND: torch.Tensor,
    k_BSND: torch.Tensor,
    v_BSND: torch.Tensor,
    *,
    scale: float | None = None,
    tiles: Tiles | None = None,
    num_splits: int | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """Non-causal attention of every query to every key, per row and head. Returns [B, M, N, D].

    Args:
        q_BMND: queries, float16 or bfloat16, unit stride along D (any other strides).
        k_BSND, v_BSND: keys and values of q's dtype; batch B, or 1 to share one K/V over all rows.
        scale: softmax scale; default 1/sqrt(D).
        tiles: pin a launch config instead of autotuning (required under the Triton interpreter).
        num_splits: key splits P (TMA kernel only); default from `num_key_splits`.
        kernel: "tma" or "ptr" to force one kernel (tests, benchmarks); default: "tma" where usable.

    Example: q [2, 1560, 12, 128] bf16 with k, v [1, 512, 12, 128] -> [2, 1560, 12, 128] bf16, both
    rows attending to the same 512 prompt keys.
    """
    _check(q_BMND, k_BSND, v_BSND)
    if kernel not in (None, *KERNELS):
        raise ValueError(f"kernel={kernel!r}: use one of {KERNELS} or None")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits}: use 1..{MAX_SPLITS}")
    if triton is None:
        raise RuntimeError("stages.triton_attention needs Triton; check available() first")
    B, M, N, D = q_BMND.shape
    if k_BSND.shape[0] > 1 and k_BSND.stride(0) == 0 and v_BSND.stride(0) == 0:  # expanded: read row 0
        k_BSND, v_BSND = k_BSND[:1], v_BSND[:1]
    out_BMND = torch.empty((B, M, N, D), dtype=q_BMND.dtype, device=q_BMND.device)
    qk_scale_log2 = (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2_E
    if kernel is None:
        kernel = "tma" if _tma_usable(q_BMND, k_BSND, v_BSND, out_BMND) else "ptr"
    if kernel == "tma":
        if num_splits is None and not q_BMND.is_cuda:  # the interpreter
            num_splits = 1
        elif num_splits is None:
            num_sms = torch.cuda.get_device_properties(q_BMND.device).multi_processor_count
            num_splits = num_key_splits(triton.cdiv(M, 128) * B * N, k_BSND.shape[1], num_sms)
        _launch_tma(q_BMND, k_BSND, v_BSND, out_BMND, qk_scale_log2, tiles, num_splits)
    else:
        _launch_ptr(q_BMND, k_BSND, v_BSND, out_BMND, qk_scale_log2, tiles)
    return out_BMND


def _meta(tiles: Tiles | None) -> dict:
    if tiles is None:
        return {}
    return dict(
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps, num_stages=tiles.num_stages
    )


def _launch_ptr(q_BMND, k_BSND, v_BSND, out_BMND, qk_scale_log2, tiles) -> None:
    B, M, N, D = q_BMND.shape
    broadcast = k_BSND.shape[0] == 1

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), B * N)

    fn = _attention_fwd_ptr_tuned if tiles is None else _attention_fwd_ptr_even
    fn[grid](
        q_BMND, k_BSND, v_BSND, out_BMND,
        qk_scale_log2,
        q_BMND.stride(0), q_BMND.stride(1), q_BMND.stride(2),
        0 if broadcast else k_BSND.stride(0), k_BSND.stride(1), k_BSND.stride(2),
        0 if broadcast else v_BSND.stride(0), v_BSND.stride(1), v_BSND.stride(2),
        out_BMND.stride(0), out_BMND.stride(1), out_BMND.stride(2),
        N, B * N, M, k_BSND.shape[1],
        HEAD_DIM=D, **_meta(tiles),
    )  # fmt: skip


def _descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    R, T, N, D = x.shape
    stride_r, stride_t = _packed_view_strides(x)
    return TensorDescriptor(x, [R, T, N * D], [stride_r, stride_t, 1], [1, block_rows, D])


def _launch_tma(q_BMND, k_BSND, v_BSND, out_BMND, qk_scale_log2, tiles, num_splits) -> None:
    B, M, N, D = q_BMND.shape
    block_m, block_n = (64, 64) if tiles is None else (tiles.block_m, tiles.block_n)  # boxes: pre-hook
    split = num_splits > 1
    if split:
        # half-precision partials: half the round trip, and 0.94x the call (H200, 1560 x 9360, P = 5)
        part_o = torch.empty((num_splits, B * N, M, D), dtype=q_BMND.dtype, device=q_BMND.device)
        part_lse = torch.empty((num_splits, B * N, M), dtype=torch.float32, device=q_BMND.device)
    else:
        part_o = part_lse = out_BMND  # not read

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), B * N, num_splits)

    fn = _attention_fwd_tma_tuned if tiles is None else _attention_fwd_tma
    fn[grid](
        _descriptor(q_BMND, block_m), _descriptor(k_BSND, block_n), _descriptor(v_BSND, block_n),
        _descriptor(out_BMND, block_m), part_o, part_lse,
        qk_scale_log2,
        N, B * N, k_BSND.shape[0], M, k_BSND.shape[1], num_splits,
        HEAD_DIM=D, SPLIT=split, **_meta(tiles),
    )  # fmt: skip
    if split:
        _combine_splits[(triton.cdiv(M, _COMBINE_BLOCK_M), B * N)](
            part_o, part_lse, out_BMND,
            out_BMND.stride(0), out_BMND.stride(1), out_BMND.stride(2),
            N, B * N, M, num_splits,
            HEAD_DIM=D, BLOCK_M=_COMBINE_BLOCK_M, num_warps=4,
        )  # fmt: skip


def tuned_tiles(kernel: str = "tma") -> Tiles | None:
    """The config the autotuner chose for `kernel`'s most recent tuned launch (None before one)."""
    if triton is None:
        return None
    tuned = _attention_fwd_tma_tuned if kernel == "tma" else _attention_fwd_ptr_tuned
    best = getattr(tuned, "best_config", None)
    if best is None:
        return None
    return Tiles(best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)
