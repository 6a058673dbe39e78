"""The DiT block's elementwise pieces, as plain functions that torch.compile can fuse on CUDA.

Shape legend:
    B  rows      L  tokens per row (F * Fp)      F  latent frames per row      D  model width
    N  heads     Dh head dim                     P  rotation pairs per head (Dh / 2)

Eager, each piece is a handful of kernels over a [B, L, D] tensor (a LayerNorm, then a multiply and
an add for the adaLN modulation; float32 casts, a mean, an rsqrt and three multiplies for the
RMSNorm; a split, four multiplies, two adds and a stack for RoPE). A 1.3B step runs 30 blocks of
them, thousands of memory-bound launches that cost more than the block's matmuls. Compiled, each
piece is one kernel that reads its input once.

The KV cache's bookkeeping (`stages.kv_cache.plan_cache_update`: the new frames' mean K and V, sink
check, eviction ring, write positions, a few dozen ops on small tensors) is compiled the same way.

`BlockOps` bundles the pieces; a block calls them through `block.ops`. `EAGER_OPS` is the default
everywhere (CPU tests compare it bit for bit with the reference); `compiled_ops()` returns the same
functions through `torch.compile`, built once per process and shared by every block (a CUDA-graph
capture after the first eager call replays the compiled kernels). The math is the same; in bf16 the fused kernels round at fewer places.

Worked example (modulate, one row of F = 2 frames of Fp = 3 tokens): the LayerNorm of each of the
6 tokens is scaled by (1 + scale[f]) and shifted by shift[f] of its frame f = token // 3.

The VAEs' pieces live here too (`VAEOps`, `nearest_upsample_2x`), with the two channels-last helpers
both VAEs use on CUDA: `channels_last_weights_` and `is_channels_last`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stages import triton_norms
from stages.kv_cache import plan_cache_update

LOG = logging.getLogger(__name__)


def modulate(
    x_BLD: torch.Tensor,
    shift_BF1D: torch.Tensor,
    scale_BF1D: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """adaLN: LayerNorm(x) (no affine) * (1 + scale) + shift, per latent frame. Returns [B, L, D]."""
    num_frames = shift_BF1D.shape[1]
    per_frame = (num_frames, x_BLD.shape[1] // num_frames)
    h_BLD = F.layer_norm(x_BLD, (x_BLD.shape[-1],), eps=eps).type_as(x_BLD)
    return (h_BLD.unflatten(1, per_frame) * (1 + scale_BF1D) + shift_BF1D).flatten(1, 2)


def gated_residual(x_BLD: torch.Tensor, y_BLD: torch.Tensor, gate_BF1D: torch.Tensor) -> torch.Tensor:
    """x + y * gate, the gate per latent frame. Returns [B, L, D]."""
    num_frames = gate_BF1D.shape[1]
    per_frame = (num_frames, y_BLD.shape[1] // num_frames)
    return x_BLD + (y_BLD.unflatten(1, per_frame) * gate_BF1D).flatten(1, 2)


def gated_residual_norm(
    x_BLD: torch.Tensor,
    y_BLD: torch.Tensor,
    gate_BF1D: torch.Tensor,
    weight_D: torch.Tensor,
    bias_D: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x + y * gate (the self-attention residual), and its affine LayerNorm (the cross-attention's
    input) from the same read. Returns (x_BLD, normed_BLD)."""
    x_BLD = gated_residual(x_BLD, y_BLD, gate_BF1D)
    return x_BLD, F.layer_norm(x_BLD, (x_BLD.shape[-1],), weight_D, bias_D, eps).type_as(x_BLD)


def residual_modulate(
    x_BLD: torch.Tensor, y_BLD: torch.Tensor, shift_BF1D: torch.Tensor, scale_BF1D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x + y (the cross-attention residual), and the FFN's adaLN input from it. Returns (x_BLD, h_BLD)."""
    x_BLD = x_BLD + y_BLD
    return x_BLD, modulate(x_BLD, shift_BF1D, scale_BF1D, eps)


def ffn(h_BLD: torch.Tensor, linear1: torch.nn.Linear, linear2: torch.nn.Linear) -> torch.Tensor:
    """The block's FFN: Linear, GELU (tanh approximation), Linear."""
    return linear2(F.gelu(linear1(h_BLD), approximate="tanh"))


def ffn_gelu_epilogue(h_BLD: torch.Tensor, linear1: torch.nn.Linear, linear2: torch.nn.Linear) -> torch.Tensor:
    """`ffn` with the bias and the GELU done by the first matmul's epilogue (cuBLASLt on CUDA: the
    tanh GELU on the fp32 accumulator, no separate pass over the [B, L, ffn_dim] activation).
    Elsewhere plain `ffn` (the CPU kernel of the fused op applies the exact, erf GELU)."""
    if not h_BLD.is_cuda:
        return ffn(h_BLD, linear1, linear2)
    b, num_tokens, d = h_BLD.shape
    hidden = torch._addmm_activation(linear1.bias, h_BLD.reshape(b * num_tokens, d), linear1.weight.t(),
                                     use_gelu=True)
    return linear2(hidden.view(b, num_tokens, -1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, normalised in float32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def rotate(x_BLND: torch.Tensor, cos_BL1P: torch.Tensor, sin_BL1P: torch.Tensor) -> torch.Tensor:
    """RoPE: rotate adjacent channel pairs (x[2p], x[2p+1]) of every head in float32; x's dtype out."""
    b, num_tokens, n, d = x_BLND.shape
    real_BLNP, imag_BLNP = x_BLND.float().reshape(b, num_tokens, n, d // 2, 2).unbind(-1)
    out_BLNP2 = torch.stack(
        (real_BLNP * cos_BL1P - imag_BLNP * sin_BL1P, real_BLNP * sin_BL1P + imag_BLNP * cos_BL1P), dim=-1
    )
    return out_BLNP2.reshape(b, num_tokens, n, d).to(x_BLND.dtype)


def rms_norm_rotate(
    x_BLD: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    num_heads: int,
    cos_BL1P: torch.Tensor,
    sin_BL1P: torch.Tensor,
) -> torch.Tensor:
    """RMSNorm over D, split into heads, RoPE: the self-attention query/key path. Returns [B, L, N, Dh]."""
    b, num_tokens, d = x_BLD.shape
    heads = (b, num_tokens, num_heads, d // num_heads)
    return rotate(rms_norm(x_BLD, weight, eps).view(heads), cos_BL1P, sin_BL1P)


def norm_silu(x_BCTHW: torch.Tensor, gamma_C111: torch.Tensor, scale: float) -> torch.Tensor:
    """The Wan VAE's RMSNorm (L2 over channels, times sqrt(C) and gamma) followed by SiLU."""
    return F.silu(F.normalize(x_BCTHW, dim=1) * scale * gamma_C111)


def channels_last_weights_(module: torch.nn.Module) -> torch.nn.Module:
    """Store every Conv3d weight channels-last-3d and every Conv2d weight channels-last (cuDNN's fast
    NHWC kernels on CUDA). Values are unchanged; only the memory layout of the weights moves."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def is_channels_last(x: torch.Tensor) -> bool:
    """x (4-D NCHW or 5-D NCTHW) is stored channels-last and not also in the standard order: a tensor
    whose strides fit both (one frame of one pixel, say) counts as standard."""
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.is_contiguous(memory_format=layout) and not x.is_contiguous()


def nearest_upsample_2x(x_NCHW: torch.Tensor) -> torch.Tensor:
    """2x nearest upsampling of every (H, W) plane (each pixel becomes a 2x2 block; 'nearest' and
    'nearest-exact' agree at scale 2). A channels-last input is expanded in its NHWC memory order, one
    coalesced copy that keeps the layout (the NHWC interpolate kernel is several times slower on GPUs);
    any other input goes through F.interpolate in its dtype on CUDA, in fp32 elsewhere (half-precision
    nearest is not implemented on every CPU build). Same values every way.

    Example: [[1, 2]] -> [[1, 1, 2, 2], [1, 1, 2, 2]].
    """
    n, c, h, w = x_NCHW.shape
    if is_channels_last(x_NCHW):
        x_NHWC = x_NCHW.permute(0, 2, 3, 1)
        y_NHWC = x_NHWC[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)
        return y_NHWC.permute(0, 3, 1, 2)
    if x_NCHW.is_cuda:
        return F.interpolate(x_NCHW, scale_factor=(2.0, 2.0), mode="nearest")
    return F.interpolate(x_NCHW.float(), scale_factor=(2.0, 2.0), mode="nearest").type_as(x_NCHW)


def bias_norm_silu(
    x_BCTHW: torch.Tensor, bias_C: torch.Tensor, gamma_C111: torch.Tensor, scale: float
) -> torch.Tensor:
    """`norm_silu` of a conv output whose bias was left out of the conv: the bias add rides along."""
    return norm_silu(x_BCTHW + bias_C[:, None, None, None], gamma_C111, scale)


def bias_residual(
    y_BCTHW: torch.Tensor, bias_C: torch.Tensor, skip_BCTHW: torch.Tensor, skip_bias_C: torch.Tensor | None
) -> torch.Tensor:
    """A residual block's output: its last conv's output plus that conv's bias, plus the shortcut
    (and the shortcut conv's bias when it has one); each bias was left out of its conv."""
    out_BCTHW = y_BCTHW + bias_C[:, None, None, None] + skip_BCTHW
    return out_BCTHW if skip_bias_C is None else out_BCTHW + skip_bias_C[:, None, None, None]


def norm_silu_into(
    out_BCTHW: torch.Tensor, x_BCTHW: torch.Tensor, gamma_C111: torch.Tensor, scale: float
) -> torch.Tensor:
    """`norm_silu` written into `out_BCTHW` (a view of a conv's input window, stages.wan_vae)."""
    return out_BCTHW.copy_(norm_silu(x_BCTHW, gamma_C111, scale))


def bias_norm_silu_into(
    out_BCTHW: torch.Tensor, x_BCTHW: torch.Tensor, bias_C: torch.Tensor, gamma_C111: torch.Tensor, scale: float
) -> torch.Tensor:
    """`bias_norm_silu` written into `out_BCTHW`."""
    return out_BCTHW.copy_(bias_norm_silu(x_BCTHW, bias_C, gamma_C111, scale))


INPUT_CHANNEL_MULTIPLE = 16
"""cuDNN's tensor-core conv kernels want input channels in multiples of 8 (16 bytes in half precision),
and run a 16-channel input faster still: the Wan encoder's first conv at 480x832 on an H200, with
autotuning, takes 0.93 ms on 3 channels (an Ampere kernel), 1.12 on 8 and 0.63 on 16 (BENCHMARKS.md)."""


def pad_channels(x_NC: torch.Tensor, channels: int) -> torch.Tensor:
    """x [N, C, ...] with zero channels appended up to `channels`, in x's memory layout (a channels-last
    x gives a channels-last result)."""
    layout = torch.contiguous_format
    if is_channels_last(x_NC):
        layout = torch.channels_last if x_NC.dim() == 4 else torch.channels_last_3d
    out = torch.empty((x_NC.shape[0], channels, *x_NC.shape[2:]), dtype=x_NC.dtype, device=x_NC.device,
                      memory_format=layout)
    out[:, x_NC.shape[1]:].zero_()
    out[:, : x_NC.shape[1]].copy_(x_NC)
    return out


def set_padded_input(conv: torch.nn.Module, enabled: bool) -> None:
    """Give a conv (Conv2d or Conv3d) a copy of its weight with zero input channels appended up to a
    multiple of INPUT_CHANNEL_MULTIPLE (`padded_weight`, a buffer outside the state dict: set it after
    loading), or take it away; `conv_forward` uses it. A conv whose channels already are a multiple
    gets none."""
    conv._buffers.pop("padded_weight", None)
    channels = conv.weight.shape[1]
    target = -(-channels // INPUT_CHANNEL_MULTIPLE) * INPUT_CHANNEL_MULTIPLE
    if enabled and target != channels:
        conv.register_buffer("padded_weight", pad_channels(conv.weight.detach(), target), persistent=False)


def conv_forward(conv: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv's convolution of x (no padding_mode other than zeros) with `bias` (None: none); through
    its `padded_weight`, x's channels zero-padded alike, when it has one. Same values either way."""
    weight = conv._buffers.get("padded_weight")
    if weight is not None:
        x = pad_channels(x, weight.shape[1])
    else:
        weight = conv.weight
    conv_fn = F.conv2d if x.dim() == 4 else F.conv3d
    return conv_fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def phase_kernels_2x(weight_OI33: torch.Tensor) -> torch.Tensor:
    """2x nearest upsampling then a 3x3 conv (padding 1) as four 2x2 convs of the input, one per
    output pixel phase (p, q) in {0, 1}^2: [O, I, 3, 3] -> [4 * O, I, 2, 2], phases major (p, q, o).

    Output row 2i + p reads upsampled rows 2i + p - 1 .. 2i + p + 1, which are input rows i - 1, i, i
    (p = 0) or i, i, i + 1 (p = 1): the 3 kernel rows fold into 2, (r0, r1 + r2) or (r0 + r1, r2);
    columns alike. Summed in at least fp32, returned in the weight's dtype and memory layout.

    Example: a 1-channel kernel of ones gives four kernels [[1, 2], [2, 4]], [[2, 1], [4, 2]], ...
    """
    w = weight_OI33.to(torch.promote_types(weight_OI33.dtype, torch.float32))

    def fold(w_OIab: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
        t0, t1, t2 = w_OIab.unbind(dim)
        return torch.stack((t0, t1 + t2) if phase == 0 else (t0 + t1, t2), dim)

    phases = [fold(fold(w, -2, p), -1, q) for p in (0, 1) for q in (0, 1)]
    out = torch.cat(phases, 0).to(weight_OI33.dtype)
    return out.contiguous(memory_format=torch.channels_last) if is_channels_last(weight_OI33) else out.contiguous()


def one_sided_pad_kernel(weight_OI33: torch.Tensor) -> torch.Tensor:
    """A 3x3 stride-2 conv of an input zero-padded by one row and column on the bottom and right only
    (the Wan encoder's downsample) as a conv with the symmetric padding 1 that cuDNN takes: a 4x4
    kernel whose first row and column are zero, [O, I, 3, 3] -> [O, I, 4, 4], in the weight's layout.
    No padded copy of the input is made then.

    Output (i, j) of the padded conv reads input rows 2i .. 2i + 2 (row H is the pad); with padding 1
    and the 4-row kernel it reads padded rows 2i .. 2i + 3, i.e. input rows 2i - 1 .. 2i + 2, and the
    zero first row drops row 2i - 1. Columns alike, and both give (H - 2) // 2 + 1 rows.
    """
    out = F.pad(weight_OI33, (1, 0, 1, 0))
    return out.contiguous(memory_format=torch.channels_last) if is_channels_last(weight_OI33) else out.contiguous()


def interleave_phases_2x(y_NKHW: torch.Tensor, bias_C: torch.Tensor) -> torch.Tensor:
    """The four phase convs' output [N, 4C, H + 1, W + 1] (conv of the input with `phase_kernels_2x`,
    padding 1) -> the upsampled conv's output [N, C, 2H, 2W], plus the conv's bias: pixel (2i + p,
    2j + q) is phase (p, q)'s output at (i + p, j + q). Built in NHWC order: the output is
    channels-last whatever the input's layout; one kernel when compiled."""
    N, K, H1, W1 = y_NKHW.shape
    C, H, W = K // 4, H1 - 1, W1 - 1
    y_NHWpqC = y_NKHW.permute(0, 2, 3, 1).unflatten(-1, (2, 2, C))
    rows = [torch.stack([y_NHWpqC[:, p:p + H, q:q + W, p, q] for q in (0, 1)], dim=3) for p in (0, 1)]
    out_NHpWqC = torch.stack(rows, dim=2)  # [N, H, 2, W, 2, C]
    out_NHWC = out_NHpWqC.reshape(N, 2 * H, 2 * W, C) + bias_C
    return out_NHWC.permute(0, 3, 1, 2)


def fold_output_pixels(weight_OIk33: torch.Tensor, factor: int) -> torch.Tensor:
    """A conv (3x3 spatial kernel, padding 1, any temporal kernel k) as a conv that computes factor x
    factor output pixels per position: [O, I, k, 3, 3] -> [f*f*O, I, k, f+2, f+2], output channels
    (a, b, o) major to minor, to run with spatial stride f and padding 1. Output pixel (f*i + a,
    f*j + b) reads input rows f*i + a - 1 .. f*i + a + 1, which are rows a .. a + 2 of the folded
    kernel at position i; the rest of its kernel is zero. Same sums, in f*f as many output channels:
    a narrow conv (the Wan decoder's 96 -> 3 head) then runs on a wide tile instead of padding 3
    outputs to cuDNN's narrowest (BENCHMARKS.md: 1.07 -> 0.64 ms at 480x832, f = 2). Built in at
    least fp32, returned in the weight's dtype and memory layout; `unfold_output_pixels` undoes it.

    Example: f = 2, a 1x1-channel kernel K: four 4x4 kernels with K at rows/cols (0, 0), (0, 1),
    (1, 0) and (1, 1).
    """
    outs, ins, k, kh, kw = weight_OIk33.shape
    assert (kh, kw) == (3, 3), f"fold_output_pixels takes a 3x3 spatial kernel, got {kh}x{kw}"
    size = factor + 2
    w = weight_OIk33.to(torch.promote_types(weight_OIk33.dtype, torch.float32))
    out = w.new_zeros(factor, factor, outs, ins, k, size, size)
    for a in range(factor):
        for b in range(factor):
            out[a, b, :, :, :, a:a + 3, b:b + 3] = w
    out = out.reshape(factor * factor * outs, ins, k, size, size).to(weight_OIk33.dtype)
    if is_channels_last(weight_OIk33):
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out


def unfold_output_pixels(y_BKThw: torch.Tensor, bias_O: torch.Tensor, factor: int) -> torch.Tensor:
    """The folded conv's output [B, f*f*O, T, h, w] (`fold_output_pixels`) -> the conv's output [B, O,
    T, f*h, f*w], plus its bias: pixel (f*i + a, f*j + b), channel o <- position (i, j), channel
    (a, b, o). Built in NTHWC order: the output is channels-last-3d; one kernel when compiled."""
    B, K, T, h, w = y_BKThw.shape
    outs = K // (factor * factor)
    y_BThwabO = y_BKThw.permute(0, 2, 3, 4, 1).unflatten(-1, (factor, factor, outs))
    out_BTHWO = y_BThwabO.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, T, factor * h, factor * w, outs) + bias_O
    return out_BTHWO.permute(0, 4, 1, 2, 3)


@dataclass(frozen=True)
class VAEOps:
    """The Wan VAE residual block's elementwise pieces (eager or compiled).

    `fold_bias` True: the block's convs run without their bias and `bias_norm_silu` / `bias_residual`
    add it, so that a conv's output is read once instead of once for cuDNN's separate bias add (a
    full-resolution pass per conv) and once more for the next norm or residual add. The block then
    also keeps each conv's input in a window (stages.wan_vae, "Windows"), written by the `_into`
    pieces, instead of concatenating the cached frames with the new ones on every call.
    """

    norm_silu: Callable[..., torch.Tensor]
    bias_norm_silu: Callable[..., torch.Tensor]
    bias_residual: Callable[..., torch.Tensor]
    norm_silu_into: Callable[..., torch.Tensor]
    bias_norm_silu_into: Callable[..., torch.Tensor]
    interleave_phases: Callable[..., torch.Tensor] = interleave_phases_2x
    unfold_pixels: Callable[..., torch.Tensor] = unfold_output_pixels
    fold_bias: bool = False
    subpixel_upsample: bool = False
    """The decoder's upsample convs as four 2x2 phase convs of the input (`phase_kernels_2x`): 4/9
    of the flops, no upsampled copy, and 4x the output channels per conv (stages.wan_vae Resample)."""
    head_pixel_fold: int = 1
    """> 1: the decoder's head conv (96 -> 3) computes that many output pixels squared per position
    (`fold_output_pixels`); 1: as it is."""


EAGER_VAE_OPS = VAEOps(norm_silu, bias_norm_silu, bias_residual, norm_silu_into, bias_norm_silu_into)


@functools.cache
def compiled_vae_ops() -> VAEOps:
    """The VAE pieces through torch.compile, biases folded: one kernel per piece instead of five
    passes (and a bias pass) over a full-resolution activation, the VAE's biggest tensors. The
    kernels keep their input's memory layout (channels-last-3d on CUDA). The phase interleave is
    compiled for static shapes (a few per resolution): with symbolic ones Inductor fails on its
    slices' bounds."""
    _raise_recompile_limit()

    c = _compile
    return VAEOps(c(norm_silu), c(bias_norm_silu), c(bias_residual), c(norm_silu_into), c(bias_norm_silu_into),
                  c(interleave_phases_2x, dynamic=False), c(unfold_output_pixels, dynamic=False), fold_bias=True,
                  subpixel_upsample=os.environ.get("WEIR_VAE_SUBPIXEL", "1") != "0",
                  head_pixel_fold=int(os.environ.get("WEIR_VAE_HEAD_FOLD", "2")))


def _compile(fn: Callable[..., object], *, dynamic: bool | None = None) -> Callable[..., object]:
    """torch.compile(fn) whole (fullgraph), for static shapes with `dynamic=False`.

    A piece that meets one shape more than dynamo's recompile limit allows (a server that has seen
    many resolutions) would raise. Instead it runs that call eagerly, with a warning the first time:
    same values, slower. Already-compiled shapes stay compiled.
    """
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    warned: list[bool] = []

    @functools.wraps(fn)
    def piece(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except _recompile_limit_errors():
            if not warned:
                warned.append(True)
                LOG.warning("%s met more shapes than the recompile limit: new shapes run eagerly",
                            getattr(fn, "__name__", fn))
            return fn(*args, **kwargs)

    return piece


@functools.cache
def _recompile_limit_errors() -> tuple[type[BaseException], ...]:
    """What dynamo raises at the recompile limit under fullgraph (named differently across releases)."""
    import torch._dynamo.exc as dynamo_exc

    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
    return tuple(getattr(dynamo_exc, n) for n in names if hasattr(dynamo_exc, n))


def _raise_recompile_limit() -> None:
    """Process-wide: several dtypes, resolutions and layer shapes must never exhaust the limit (a
    fullgraph piece that hit it would raise instead of running)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


@dataclass(frozen=True)
class BlockOps:
    """The elementwise pieces a WanBlock calls (eager or compiled)."""

    modulate: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    rms_norm_rotate: Callable[..., torch.Tensor]
    plan_cache_update: Callable[..., tuple[torch.Tensor, ...]]
    gated_residual_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = gated_residual_norm
    residual_modulate: Callable[..., tuple[torch.Tensor, torch.Tensor]] = residual_modulate
    ffn: Callable[..., torch.Tensor] = ffn
    compiled: bool = False


EAGER_OPS = BlockOps(modulate, gated_residual, rms_norm, rms_norm_rotate, plan_cache_update)


@functools.cache
def compiled_ops() -> BlockOps:
    """The pieces through torch.compile, built once per process.

    Each piece is compiled whole (fullgraph: a graph break would be a bug) and for static shapes
    (`dynamic=False`): one compilation per (rows, resolution, dtype), a handful per piece on a
    server, done during the warm-up. With symbolic shapes (torch.compile's default once a second
    shape arrives) Inductor cannot size a LayerNorm's reduction and splits it into three or four
    kernels; static, each piece is one kernel over its [B, L, D] input.

    The three LayerNorm pieces (modulate, gated_residual_norm, residual_modulate) and the two RMSNorms
    (rms_norm, rms_norm_rotate) run as Weir's own Triton kernels where Triton and the input allow
    (stages.triton_norms): compiled, Inductor splits each LayerNorm into three or four kernels at the
    DiT's row counts, and makes the RMSNorm + RoPE a slow looped reduction.
    """
    _raise_recompile_limit()

    def c(fn):
        return _compile(fn, dynamic=False)

    return BlockOps(
        _norm_kernel_or(triton_norms.modulate, c(modulate)), c(gated_residual),
        _norm_kernel_or(triton_norms.rms_norm, c(rms_norm)),
        _norm_kernel_or(triton_norms.rms_norm_rotate, c(rms_norm_rotate)), c(plan_cache_update),
        gated_residual_norm=_norm_kernel_or(triton_norms.gated_residual_norm, c(gated_residual_norm)),
        residual_modulate=_norm_kernel_or(triton_norms.residual_modulate, c(residual_modulate)),
        ffn=ffn_gelu_epilogue, compiled=True,
    )


def _norm_kernel_or(kernel: Callable[..., object], fallback: Callable[..., object]) -> Callable[..., object]:
    """`kernel` (stages.triton_norms: one Triton kernel per norm piece) where its input can take it,
    else `fallback` (the compiled piece). `WEIR_NORM_KERNELS=0` keeps the compiled pieces.

    A kernel that raises outside a CUDA-graph capture (it fails to build on this GPU, say) is logged
    once and replaced by the fallback for the rest of the process: a served engine keeps running, a
    little slower. Inside a capture the error goes up to the capture, which runs that call eagerly
    (stages.cuda_graphs); a kernel's first build can fail there and succeed in the eager call.
    """
    if not triton_norms.available() or os.environ.get("WEIR_NORM_KERNELS", "1") == "0":
        return fallback
    broken: list[BaseException] = []

    @functools.wraps(fallback)
    def piece(x_BLD: torch.Tensor, *args):
        if not broken and triton_norms.usable(x_BLD):
            try:
                return kernel(x_BLD, *args)
            except Exception as exc:
                if x_BLD.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise
                broken.append(exc)
                LOG.warning("the Triton kernel %s failed; its compiled piece runs from now on",
                            getattr(kernel, "__name__", kernel), exc_info=True)
        return fallback(x_BLD, *args)

    return piece
