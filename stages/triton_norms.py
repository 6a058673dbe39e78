"""Triton kernels for the DiT block's LayerNorm and RMSNorm pieces: one program per token, one read, one
write.

Shape legend:
    B  rows      L  tokens per row (F * Fp)      F  latent frames per row      Fp tokens per frame
    D  model width

Three of a block's elementwise pieces (stages.fused) are a LayerNorm over D with something before or
after it:

    modulate             h = LN(x) * (1 + scale[f]) + shift[f]
    gated_residual_norm  x' = x + y * gate[f];  n = LN(x') * weight + bias
    residual_modulate    x' = x + y;            h = LN(x') * (1 + scale[f]) + shift[f]

with f = token // Fp the token's latent frame and the per-frame vectors [B, F, 1, D] (views into the
block's [B, F, 6, D] modulation). torch.compile makes each of them three or four kernels at the DiT's
sizes: with a few thousand 1536-wide rows, Inductor splits every row's reduction into a partial-sum
kernel and a combine kernel before the pointwise pass, and measured on an H200 a piece ran at well
under a third of the memory bandwidth (13-17 us for 5-10 MB; measured while the block's x was still
column-strided, see `WanDiT.embed`). Unsplit it is one looped kernel that is slower still. Here one program holds one token's whole row in registers (D <= 8192): it reads x (and
y) once, reduces, and writes x' and the output once.

The query/key path's RMSNorm, with or without RoPE, is one kernel the same way (`rms_norm_rotate`,
`rms_norm`): x / rms(x) * weight over D, then each head's adjacent channel pairs (x[2p], x[2p+1])
rotated by the token's cos/sin [B or 1, L, 1, P] (P = Dh / 2, head h's pair p at global pair h*P + p).
Compiled, it was one looped reduction kernel at about a fifth of the memory bandwidth.

Numerics follow the eager pieces: statistics and arithmetic in fp32; x' is rounded to its dtype before
the norm reads it (the unfused pieces normalise the stored residual); LN(x) is rounded to x's dtype
before the modulation (`F.layer_norm(...).type_as(x)`); the affine LayerNorm applies weight and bias
in fp32 before its one rounding, as torch's kernel does; the RMSNorm rounds x / rms(x) to x's dtype,
then its product with the weight, and rotates that in fp32 (`stages.fused.rms_norm`, `rotate`).

Worked example (modulate, one row of F = 2 frames of Fp = 3 tokens, D = 2): token 4 is in frame 1; its
x = [1, 3] has mean 2 and variance 1, so LN(x) = [-1, 1] (eps aside) and h = [-1, 1] * (1 + scale[1])
+ shift[1].

The module imports without Triton; then `available()` is False. `usable(x)` says whether a tensor can
take the kernels (CUDA, contiguous, D <= MAX_WIDTH); stages.fused falls back to the compiled pieces
elsewhere.
"""

from __future__ import annotations

import os

import torch

try:  # optional dependency: bundled with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
"""The Triton interpreter runs the kernels on CPU tensors (the CPU tests)."""

MAX_WIDTH = 8192
"""Widest row one program holds (14B: D = 5120 -> an 8192-lane block)."""


def available() -> bool:
    """True when Triton is importable (the kernels still need CUDA tensors, or the interpreter)."""
    return triton is not None


def usable(x_BLD: torch.Tensor) -> bool:
    """x can take the kernels: a contiguous CUDA tensor of rows no wider than MAX_WIDTH."""
    return (available() and x_BLD.is_cuda and x_BLD.dim() == 3 and x_BLD.is_contiguous()
            and x_BLD.shape[-1] <= MAX_WIDTH)


if triton is not None:

    @triton.jit(do_not_specialize=["tokens_per_row", "tokens_per_frame", "stride_pb", "stride_pf"])
    def _residual_norm_kernel(
        x_ptr, y_ptr, gate_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr, x_out_ptr, out_ptr,
        tokens_per_row, tokens_per_frame, stride_pb, stride_pf, width, eps,
        HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)  # global token index in [0, B * L)
        row = token // tokens_per_row
        frame = (token % tokens_per_row) // tokens_per_frame
        per_frame = row * stride_pb + frame * stride_pf  # the token's [B, F, 1, D] vectors
        cols = tl.arange(0, BLOCK_D)
        mask = cols < width
        base = token.to(tl.int64) * width
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                y = y * tl.load(gate_ptr + per_frame + cols, mask=mask, other=0.0).to(tl.float32)
            x_new = (x + y).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + base + cols, x_new, mask=mask)
            x = x_new.to(tl.float32)
        mean = tl.sum(x, axis=0) / width
        centred = tl.where(mask, x - mean, 0.0)
        normed = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / width + eps)
        if AFFINE:
            weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            normed = normed * weight + bias
        if MODULATE:
            normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)  # LN(x).type_as(x)
            scale = tl.load(scale_ptr + per_frame + cols, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + per_frame + cols, mask=mask, other=0.0).to(tl.float32)
            normed = normed * (1.0 + scale) + shift
        tl.store(out_ptr + base + cols, normed.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit(do_not_specialize=["tokens_per_row", "stride_cb", "stride_ct"])
    def _rms_norm_rotate_kernel(
        x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr, tokens_per_row, stride_cb, stride_ct, pairs_per_head,
        width, eps, ROTATE: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        token = tl.program_id(0)
        pair = tl.arange(0, BLOCK_P)  # global pair j: channels 2j (real) and 2j + 1 (imaginary)
        mask = pair < width // 2
        base = token.to(tl.int64) * width
        even = tl.load(x_ptr + base + 2 * pair, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(x_ptr + base + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / width + eps)
        w_even = tl.load(weight_ptr + 2 * pair, mask=mask, other=0.0).to(tl.float32)
        w_odd = tl.load(weight_ptr + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
        # x / rms(x) rounded to x's dtype, then times the weight, rounded again (stages.fused.rms_norm)
        even = (even * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * w_even
        odd = (odd * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * w_odd
        even = even.to(out_ptr.dtype.element_ty).to(tl.float32)
        odd = odd.to(out_ptr.dtype.element_ty).to(tl.float32)
        if ROTATE:
            angle = (token // tokens_per_row) * stride_cb + (token % tokens_per_row) * stride_ct + pair % pairs_per_head
            cos = tl.load(cos_ptr + angle, mask=mask, other=1.0).to(tl.float32)
            sin = tl.load(sin_ptr + angle, mask=mask, other=0.0).to(tl.float32)
            rotated_even = even * cos - odd * sin
            odd = even * sin + odd * cos
            even = rotated_even
        tl.store(out_ptr + base + 2 * pair, even.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + 2 * pair + 1, odd.to(out_ptr.dtype.element_ty), mask=mask)


def _per_frame_strides(v_BF1D: torch.Tensor, x_BLD: torch.Tensor) -> tuple[int, int]:
    """(row, frame) element strides of a [B or 1, F, 1, D] vector with unit channel stride."""
    b, f, one, d = v_BF1D.shape
    if one != 1 or d != x_BLD.shape[-1] or v_BF1D.stride(-1) != 1 or b not in (1, x_BLD.shape[0]):
        raise ValueError(f"per-frame vector {tuple(v_BF1D.shape)} (strides {v_BF1D.stride()}) does not fit "
                         f"x {tuple(x_BLD.shape)}: need [B or 1, F, 1, D] with unit channel stride")
    if x_BLD.shape[1] % f:
        raise ValueError(f"{x_BLD.shape[1]} tokens per row do not split into {f} frames")
    return (v_BF1D.stride(0) if b > 1 else 0), v_BF1D.stride(1)


def _check_usable(x_BLD: torch.Tensor) -> None:
    if not (usable(x_BLD) or _INTERPRETING and x_BLD.is_contiguous()):
        raise ValueError(f"x {tuple(x_BLD.shape)} on {x_BLD.device} cannot take the Triton norm kernels")


def _launch(x_BLD, *, y_BLD=None, gate=None, weight=None, bias=None, shift=None, scale=None, eps: float,
            write_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the kernel: the per-frame vectors (gate or shift/scale) set the frame size."""
    _check_usable(x_BLD)
    if y_BLD is not None and (y_BLD.shape != x_BLD.shape or not y_BLD.is_contiguous()):
        raise ValueError(f"y {tuple(y_BLD.shape)} must be contiguous and shaped like x {tuple(x_BLD.shape)}")
    b, num_tokens, d = x_BLD.shape
    frames = gate if gate is not None else shift
    stride_pb, stride_pf = _per_frame_strides(frames, x_BLD)
    tokens_per_frame = num_tokens // frames.shape[1]
    out = torch.empty_like(x_BLD)
    x_out = torch.empty_like(x_BLD) if write_x else out
    dummy = x_BLD  # a pointer for the inputs a variant does not read
    block = triton.next_power_of_2(d)
    _residual_norm_kernel[(b * num_tokens,)](
        x_BLD, y_BLD if y_BLD is not None else dummy, gate if gate is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy, x_out, out,
        num_tokens, tokens_per_frame, stride_pb, stride_pf, d, eps,
        HAS_Y=y_BLD is not None, HAS_GATE=gate is not None, AFFINE=weight is not None,
        MODULATE=shift is not None, BLOCK_D=block, num_warps=4 if block <= 2048 else 8 if block <= 4096 else 16,
    )
    return x_out, out


def modulate(x_BLD: torch.Tensor, shift_BF1D: torch.Tensor, scale_BF1D: torch.Tensor, eps: float) -> torch.Tensor:
    """stages.fused.modulate in one kernel."""
    return _launch(x_BLD, shift=shift_BF1D, scale=scale_BF1D, eps=eps, write_x=False)[1]


def gated_residual_norm(
    x_BLD: torch.Tensor, y_BLD: torch.Tensor, gate_BF1D: torch.Tensor, weight_D: torch.Tensor,
    bias_D: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """stages.fused.gated_residual_norm in one kernel: (x + y * gate, its affine LayerNorm)."""
    return _launch(x_BLD, y_BLD=y_BLD, gate=gate_BF1D, weight=weight_D, bias=bias_D, eps=eps, write_x=True)


def residual_modulate(
    x_BLD: torch.Tensor, y_BLD: torch.Tensor, shift_BF1D: torch.Tensor, scale_BF1D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """stages.fused.residual_modulate in one kernel: (x + y, the adaLN of it)."""
    return _launch(x_BLD, y_BLD=y_BLD, shift=shift_BF1D, scale=scale_BF1D, eps=eps, write_x=True)


def _launch_rms(x_BLD, weight, eps, cos_BL1P=None, sin_BL1P=None, num_heads: int = 1) -> torch.Tensor:
    """One launch of the RMSNorm kernel; rotates when cos/sin are given."""
    b, num_tokens, d = x_BLD.shape
    if d % (2 * num_heads):
        raise ValueError(f"width {d} does not split into {num_heads} heads of channel pairs")
    pairs_per_head, stride_cb, stride_ct = d // (2 * num_heads), 0, 0
    if cos_BL1P is not None:
        if (cos_BL1P.shape != sin_BL1P.shape or cos_BL1P.shape[1:] != (num_tokens, 1, pairs_per_head)
                or cos_BL1P.shape[0] not in (1, b) or cos_BL1P.stride() != sin_BL1P.stride()
                or cos_BL1P.stride(-1) != 1):
            raise ValueError(f"cos/sin {tuple(cos_BL1P.shape)} (strides {cos_BL1P.stride()}) do not fit x "
                             f"{tuple(x_BLD.shape)} with {num_heads} heads: need [B or 1, L, 1, {pairs_per_head}]")
        stride_cb = cos_BL1P.stride(0) if cos_BL1P.shape[0] > 1 else 0
        stride_ct = cos_BL1P.stride(1)
    _check_usable(x_BLD)
    out = torch.empty_like(x_BLD)
    block = triton.next_power_of_2(d // 2)
    rotate = cos_BL1P is not None
    _rms_norm_rotate_kernel[(b * num_tokens,)](
        x_BLD, weight, cos_BL1P if rotate else x_BLD, sin_BL1P if rotate else x_BLD, out,
        num_tokens, stride_cb, stride_ct, pairs_per_head, d, eps,
        ROTATE=rotate, BLOCK_P=block, num_warps=4 if block <= 1024 else 8 if block <= 2048 else 16,
    )
    return out


def rms_norm(x_BLD: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """stages.fused.rms_norm over the last dim of a [B, L, D] tensor, in one kernel."""
    return _launch_rms(x_BLD, weight, eps)


def rms_norm_rotate(
    x_BLD: torch.Tensor, weight: torch.Tensor, eps: float, num_heads: int, cos_BL1P: torch.Tensor,
    sin_BL1P: torch.Tensor,
) -> torch.Tensor:
    """stages.fused.rms_norm_rotate in one kernel: RMSNorm over D, heads, RoPE. Returns [B, L, N, Dh]."""
    b, num_tokens, d = x_BLD.shape
    out = _launch_rms(x_BLD, weight, eps, cos_BL1P, sin_BL1P, num_heads)
    return out.view(b, num_tokens, num_heads, d // num_heads)
