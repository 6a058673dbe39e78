"""The Wan2.1 VAE: a causal 3D-conv encoder/decoder, streamed chunk by chunk with per-stream caches.

Legend:
    B batch, C channels, T frames (pixel or latent, as the name says), H/W height/width at that
    layer's resolution, N tokens (H*W) in the per-frame attention, Z latent channels (z_dim, 16).

Attribute names are the keys of the published `Wan2.1_VAE.pth` (194 keys, 126,892,531 parameters at
dim 96), so that file loads with `load_state_dict(strict=True, assign=True)` into a model built on the
meta device (the loader is stages.checkpoints.load_wan_vae). Layout, as in the checkpoint:

    encoder.conv1                       3 -> dim, 3x3x3 causal
    encoder.downsamples.{0..10}         2 residual blocks per stage, a Resample after stages 0..2
    encoder.middle.{0,1,2}              residual, per-frame attention, residual
    encoder.head.{0,2}                  RMS norm, SiLU, causal conv -> 2Z (mean and log-variance)
    conv1                               2Z -> 2Z, 1x1x1 (then split into mu, log_var)
    conv2                               Z -> Z, 1x1x1 (decoder input)
    decoder.conv1, decoder.middle.*, decoder.upsamples.{0..14}, decoder.head.{0,2}

Streaming (spec B, "Streaming encode/decode"). Every CausalConv3d owns one slot of a per-stream
`WanVAECache` (26 in the encoder, 33 in the decoder: one per CausalConv3d module; the 1x1x1 shortcuts
never use theirs). A slot keeps the last CACHE_T = 2 frames of that conv's input; when a call brings
fewer, the previous slot's last frame is kept in front. The conv substitutes the slot for its causal
zero padding, so chunked calls give what one long causal pass gives. Two layers differ:

- a temporal downsample (encoder) keeps its last post-spatial frame and runs `time_conv` (kernel 3,
  stride 2, no padding) on `[kept, x]`; on a stream's first call it only keeps, so frame 0 alone
  yields latent 0, and each later group of 4 frames yields 1 latent;
- a temporal upsample (decoder) does not double time on a stream's first call (latent 0 -> 1 frame);
  later calls run `time_conv` (C -> 2C) and interleave the halves into 2x frames.

Windows. On the GPU path (`VAEOps.fold_bias`) a residual block's two convs, and the encoder's and
the decoder's head conv, do not concatenate their slot with the new frames. Their slot holds a
window [B, C, CACHE_T + T, H, W]: at each call its last CACHE_T frames move to its front (zeros
before the first call), the norm kernel that makes the new frames writes them behind, and the conv
reads the window whole (`_open_window`). One copy of CACHE_T frames per conv and call, where
concatenating copied CACHE_T + T frames and keeping the last ones CACHE_T more (and a window shared
by the streams, with the kept frames copied in and out, 2 * CACHE_T); a window is (CACHE_T + T) /
CACHE_T times the kept frames' memory, 3x at the full-resolution levels (T = 4). The heads' norm +
SiLU is one compiled kernel instead of five eager passes. The encoder's downsample convs read their
input unpadded, through an equivalent 4x4 kernel (stages.fused.one_sided_pad_kernel), instead of a
zero-padded copy of it.

Worked example, encoder, frames 0 | 1..4 | 5..8: frame counts per call through the three stages are
1 -> 1 -> 1 -> 1 latent, then 4 -> 4 -> 2 -> 1, then 4 -> 4 -> 2 -> 1: 9 frames -> 3 latents.
Decoder, latents 0 | 1 | 2: 1 -> 1 -> 1 -> 1 frame, then 1 -> 2 -> 4 -> 4, then 4: 3 latents -> 9 frames.

The module holds weights only; the caller owns each stream's caches (STYLE.md practice 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stages.config import VAEConfig
from stages.fused import (
    EAGER_VAE_OPS,
    VAEOps,
    compiled_vae_ops,
    conv_forward,
    fold_output_pixels,
    is_channels_last,
    nearest_upsample_2x,
    one_sided_pad_kernel,
    phase_kernels_2x,
    set_padded_input,
)

CACHE_T = 2
"""Frames of input each causal conv keeps for the next call (its temporal kernel minus one)."""

FRAMES_PER_LATENT = 4
"""Temporal compression: after latent 0 (frame 0 alone), each latent covers 4 frames."""

LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
"""Per-channel mean of the Wan2.1 latent (the published normalisation constants)."""

LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
"""Per-channel standard deviation of the Wan2.1 latent."""


class _FirstChunkSeen:
    """Slot marker of a temporal upsample after the stream's first call (which did not upsample)."""

    def __repr__(self) -> str:
        return "FIRST_CHUNK_SEEN"


FIRST_CHUNK_SEEN = _FirstChunkSeen()


@dataclass
class WanVAECache:
    """One stream's feature caches for the encoder or the decoder (never stored on a module).

    `slots[i]` belongs to the i-th CausalConv3d visited in a call: None before the stream's first
    call, then a [B, C, <=CACHE_T, H, W] tensor of kept frames (or FIRST_CHUNK_SEEN for a temporal
    upsample after call 0), or on the GPU path a conv's window (module docstring, "Windows").
    `num_calls` counts completed calls; call 0 takes the special first-chunk path.

    A slot whose new frames have its tensor's shape is overwritten in place (`_keep`, `_open_window`),
    so from a stream's third call on (its first two change the slots' frame counts) a call allocates
    no cache tensor and a CUDA graph of it stays valid; `new_slots` counts the slots the last call
    allocated.
    """

    slots: list[torch.Tensor | _FirstChunkSeen | None]
    num_calls: int = 0
    cursor: int = field(default=0, repr=False)
    """Next slot to hand out during a call; reset to 0 at the start of each call."""
    new_slots: int = field(default=0, repr=False)
    """Slot tensors the last call allocated rather than overwrote (0: its graph may be captured)."""

    def take(self) -> int:
        index = self.cursor
        assert index < len(self.slots), f"cache slot {index} out of {len(self.slots)}"
        self.cursor += 1
        return index

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots if isinstance(s, torch.Tensor))


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: 2*pad_t frames on the left only (cached frames first).

    The spatial zero padding is the convolution's own (no padded copy of the input); in time the
    cached frames stand in for the padding, and only a stream's first call pads with zeros.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0) -> None:
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.time_pad = 2 * pad_t

    def forward(
        self, x_BCTHW: torch.Tensor, past_BCTHW: torch.Tensor | None = None, *, bias: bool = True
    ) -> torch.Tensor:
        """`bias` False leaves the bias out (the caller adds it in a fused kernel: stages.fused.VAEOps)."""
        time_pad = self.time_pad
        if past_BCTHW is not None and time_pad > 0:
            x_BCTHW = torch.cat([past_BCTHW.to(x_BCTHW.device), x_BCTHW], dim=2)
            time_pad -= past_BCTHW.shape[2]
        if time_pad > 0:
            x_BCTHW = F.pad(x_BCTHW, (0, 0, 0, 0, time_pad, 0))
        return self.over_time_padded(x_BCTHW, bias=bias)

    def over_time_padded(self, x_BCTHW: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        """The conv of frames whose causal past is already in front (a window, or `forward`'s input),
        without its bias unless `bias`; through the channel-padded weight where the conv has one
        (stages.fused.set_padded_input)."""
        return conv_forward(self, x_BCTHW, self.bias if bias else None)


def _keep(cache: WanVAECache, index: int, frames_BCTHW: torch.Tensor) -> None:
    """Store `frames_BCTHW` as slot `index`'s kept frames: into its tensor when the shapes match, else
    as a new tensor (counted in `new_slots`)."""
    kept = cache.slots[index]
    if isinstance(kept, torch.Tensor) and kept.shape == frames_BCTHW.shape:
        kept.copy_(frames_BCTHW)
    else:
        cache.slots[index] = frames_BCTHW.clone()
        cache.new_slots += 1


def _cached_conv(conv: CausalConv3d, x_BCTHW: torch.Tensor, cache: WanVAECache, *, bias: bool = True) -> torch.Tensor:
    """Run `conv` with its cache slot as the causal past, then store the last CACHE_T input frames."""
    index = cache.take()
    past = cache.slots[index]
    past_BCTHW = past if isinstance(past, torch.Tensor) else None
    keep_BCTHW = x_BCTHW[:, :, -CACHE_T:]
    if keep_BCTHW.shape[2] < CACHE_T and past_BCTHW is not None:
        keep_BCTHW = torch.cat([past_BCTHW[:, :, -1:], keep_BCTHW], dim=2)
    elif keep_BCTHW.shape[2] < CACHE_T and past is FIRST_CHUNK_SEEN:
        keep_BCTHW = torch.cat([torch.zeros_like(keep_BCTHW), keep_BCTHW], dim=2)
    out_BCTHW = conv(x_BCTHW, past_BCTHW, bias=bias)
    _keep(cache, index, keep_BCTHW)  # after the conv, which read the old frames
    return out_BCTHW


def _open_window(cache: WanVAECache, index: int, like_BCTHW: torch.Tensor) -> torch.Tensor:
    """Slot `index`'s window for a call of frames shaped like `like_BCTHW` (module docstring,
    "Windows"): [B, C, CACHE_T + T, H, W] with the kept frames in front; the caller writes the new
    frames behind them. A steady call gets the previous call's window with its last CACHE_T frames
    moved to the front (one copy of CACHE_T frames); a call of a new frame count (a stream's first
    calls) a new window, counted in `new_slots`, with the slot's last frames in front (zeros before
    the stream's first call, as the causal padding)."""
    B, C, T, H, W = like_BCTHW.shape
    slot = cache.slots[index]
    if isinstance(slot, torch.Tensor) and slot.shape == (B, C, CACHE_T + T, H, W):
        if T >= CACHE_T:
            slot[:, :, :CACHE_T].copy_(slot[:, :, T:])
        else:  # the kept frames overlap their new place: frame by frame, front first
            for t in range(CACHE_T):
                slot[:, :, t].copy_(slot[:, :, T + t])
        return slot
    layout = torch.channels_last_3d if is_channels_last(like_BCTHW) else torch.contiguous_format
    window = torch.empty((B, C, CACHE_T + T, H, W), dtype=like_BCTHW.dtype, device=like_BCTHW.device,
                         memory_format=layout)
    if isinstance(slot, torch.Tensor):
        window[:, :, :CACHE_T].copy_(slot[:, :, -CACHE_T:])
    else:
        window[:, :, :CACHE_T].zero_()
    cache.slots[index] = window
    cache.new_slots += 1
    return window


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned per-channel gain `gamma`."""

    def __init__(self, dim: int, *, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class _NearestUpsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling (stages.fused.nearest_upsample_2x: layout-keeping)."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return nearest_upsample_2x(x_BCHW)


class Resample(nn.Module):
    """Spatial 2x down/upsampling per frame, optionally with a temporal 2x (`time_conv`)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    ops: VAEOps = EAGER_VAE_OPS
    """`subpixel_upsample` set: the upsample conv runs as four phase convs (`use_ops` prepares their
    kernels, `phase_weight`). `fold_bias` set: the downsample conv runs on its unpadded input with
    the 4x4 kernel of stages.fused.one_sided_pad_kernel (`pad_free_weight`)."""

    def use_ops(self, ops: VAEOps) -> None:
        """Take `ops`; with `subpixel_upsample`, fold the upsample conv's weights into the phase
        kernels, and on the GPU path (`fold_bias`) the downsample conv's into its pad-free 4x4 kernel
        (buffers outside the state dict: call this after the weights are loaded)."""
        self.ops = ops
        weight = self.resample[1].weight.detach()
        if ops.subpixel_upsample and self.mode in ("upsample2d", "upsample3d"):
            self.register_buffer("phase_weight", phase_kernels_2x(weight), persistent=False)
        self._buffers.pop("pad_free_weight", None)
        if ops.fold_bias and self.mode in ("downsample2d", "downsample3d"):
            self.register_buffer("pad_free_weight", one_sided_pad_kernel(weight), persistent=False)

    def forward(self, x_BCTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x_BCTHW = self._upsample_time(x_BCTHW, cache)
        B, _, T, _, _ = x_BCTHW.shape
        x_BTCHW = x_BCTHW.transpose(1, 2).flatten(0, 1)
        pad_free = self._buffers.get("pad_free_weight")
        if self.ops.subpixel_upsample and self.mode in ("upsample2d", "upsample3d"):
            phases_BKHW = F.conv2d(x_BTCHW, self.phase_weight, None, padding=1)
            y_BTCHW = self.ops.interleave_phases(phases_BKHW, self.resample[1].bias)
        elif pad_free is not None:
            y_BTCHW = F.conv2d(x_BTCHW, pad_free, self.resample[1].bias, stride=2, padding=1)
        else:
            y_BTCHW = self.resample(x_BTCHW)
        y_BCTHW = y_BTCHW.unflatten(0, (B, T)).transpose(1, 2)
        if self.mode == "downsample3d":
            y_BCTHW = self._downsample_time(y_BCTHW, cache)
        return y_BCTHW

    def _upsample_time(self, x_BCTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
        index = cache.cursor
        if cache.slots[index] is None:  # the stream's first call: no temporal doubling
            cache.take()
            cache.slots[index] = FIRST_CHUNK_SEEN
            return x_BCTHW
        return interleave_time_halves(_cached_conv(self.time_conv, x_BCTHW, cache))

    def _downsample_time(self, x_BCTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
        index = cache.take()
        past = cache.slots[index]
        if past is None:  # the stream's first call: frame 0 passes through alone
            _keep(cache, index, x_BCTHW[:, :, -1:])
            return x_BCTHW
        assert isinstance(past, torch.Tensor)
        y_BCTHW = self.time_conv(torch.cat([past, x_BCTHW], dim=2))
        _keep(cache, index, x_BCTHW[:, :, -1:])  # after the cat, which read the old frame
        return y_BCTHW


def interleave_time_halves(y_BDTHW: torch.Tensor) -> torch.Tensor:
    """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: frame 2t+j, channel c <- frame t, channel j*C + c (the
    temporal upsample's (even, odd) halves). A channels-last-3d input is interleaved in its own
    memory order [B, T, H, W, 2C], so that the result stays channels-last (no layout change for the
    next conv); any other input in the standard order. Same values either way.

    Example: C = 1, T = 1, channels (a, b) -> frames (a, b).
    """
    B, D, T, H, W = y_BDTHW.shape
    C = D // 2
    if is_channels_last(y_BDTHW):
        y_BTHW2C = y_BDTHW.permute(0, 2, 3, 4, 1).unflatten(-1, (2, C))
        y_B2THWC = y_BTHW2C.permute(0, 1, 4, 2, 3, 5).reshape(B, 2 * T, H, W, C)
        return y_B2THWC.permute(0, 4, 1, 2, 3)
    y_B2CTHW = y_BDTHW.reshape(B, 2, C, T, H, W)
    return torch.stack((y_B2CTHW[:, 0], y_B2CTHW[:, 1]), dim=3).reshape(B, C, T * 2, H, W)


class ResidualBlock(nn.Module):
    """RMS-SiLU-conv3 twice, plus a 1x1x1 shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),  # dropout in training; keeps the checkpoint's indices (conv at 6)
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    ops: VAEOps = EAGER_VAE_OPS
    """RMSNorm + SiLU and the residual add as single calls (stages.fused; `WanVAE.use_compiled_ops`
    swaps in the compiled ones, which also take over the convs' bias adds)."""

    def forward(self, x_BCTHW: torch.Tensor, cache: WanVAECache, x_bias_C: torch.Tensor | None = None) -> torch.Tensor:
        """`x_bias_C` (GPU path, a block without a shortcut conv): a bias the input still lacks, its
        conv's (the encoder's RGB conv), added here by the first norm and the residual instead of a
        pass of its own."""
        ops = self.ops
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        if not ops.fold_bias:
            skip_BCTHW = self.shortcut(x_BCTHW)
            x_BCTHW = _cached_conv(conv1, ops.norm_silu(x_BCTHW, norm1.gamma, norm1.scale), cache)
            x_BCTHW = _cached_conv(conv2, ops.norm_silu(x_BCTHW, norm2.gamma, norm2.scale), cache)
            return x_BCTHW + skip_BCTHW
        if isinstance(self.shortcut, CausalConv3d):
            if x_bias_C is not None:
                raise ValueError("an input bias is folded only into a block without a shortcut conv")
            skip_BCTHW, skip_bias_C = self.shortcut(x_BCTHW, bias=False), self.shortcut.bias
        else:
            skip_BCTHW, skip_bias_C = x_BCTHW, x_bias_C
        index = cache.take()
        window_BCTHW = _open_window(cache, index, x_BCTHW)
        if x_bias_C is None:
            ops.norm_silu_into(window_BCTHW[:, :, CACHE_T:], x_BCTHW, norm1.gamma, norm1.scale)
        else:
            ops.bias_norm_silu_into(window_BCTHW[:, :, CACHE_T:], x_BCTHW, x_bias_C, norm1.gamma, norm1.scale)
        y_BCTHW = conv1.over_time_padded(window_BCTHW, bias=False)  # the window stays in its slot
        index = cache.take()
        window_BCTHW = _open_window(cache, index, y_BCTHW)
        ops.bias_norm_silu_into(window_BCTHW[:, :, CACHE_T:], y_BCTHW, conv1.bias, norm2.gamma, norm2.scale)
        y_BCTHW = conv2.over_time_padded(window_BCTHW, bias=False)
        return ops.bias_residual(y_BCTHW, conv2.bias, skip_BCTHW, skip_bias_C)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x_BCTHW: torch.Tensor, cache: WanVAECache | None = None) -> torch.Tensor:
        B, C, T, H, W = x_BCTHW.shape
        x_BTCHW = x_BCTHW.transpose(1, 2).flatten(0, 1)
        qkv_BT3CN = self.to_qkv(self.norm(x_BTCHW)).flatten(2)
        q_BT1NC, k_BT1NC, v_BT1NC = qkv_BT3CN.transpose(1, 2).unsqueeze(1).contiguous().chunk(3, dim=-1)
        y_BT1NC = F.scaled_dot_product_attention(q_BT1NC, k_BT1NC, v_BT1NC)
        y_BTCHW = y_BT1NC.squeeze(1).transpose(1, 2).reshape(B * T, C, H, W)
        y_BCTHW = self.proj(y_BTCHW).unflatten(0, (B, T)).transpose(1, 2)
        return y_BCTHW + x_BCTHW


def _run_cached(layers: nn.Sequential, x_BCTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x_BCTHW = _cached_conv(layer, x_BCTHW, cache)
        elif isinstance(layer, (ResidualBlock, AttentionBlock, Resample)):
            x_BCTHW = layer(x_BCTHW, cache)
        else:
            x_BCTHW = layer(x_BCTHW)
    return x_BCTHW


def _run_head(head: nn.Sequential, x_BCTHW: torch.Tensor, cache: WanVAECache, ops: VAEOps) -> torch.Tensor:
    """The encoder's or the decoder's head: RMSNorm, SiLU, causal conv. On the GPU path
    (`ops.fold_bias`) the norm writes into the conv's window, as in a residual block, and the conv
    adds its own bias (its output is narrow: 3 or 2Z channels); a conv with a `folded_weight` (the
    decoder's, `set_folded_head`) computes f x f pixels per position and the unfold adds the bias."""
    if not ops.fold_bias:
        return _run_cached(head, x_BCTHW, cache)
    norm, _, conv = head
    index = cache.take()
    window_BCTHW = _open_window(cache, index, x_BCTHW)
    ops.norm_silu_into(window_BCTHW[:, :, CACHE_T:], x_BCTHW, norm.gamma, norm.scale)
    folded = conv._buffers.get("folded_weight")
    if folded is None:
        return conv.over_time_padded(window_BCTHW)
    factor = folded.shape[-1] - 2  # a (f + 2)-wide kernel (stages.fused.fold_output_pixels)
    y_BKThw = F.conv3d(window_BCTHW, folded, None, (1, factor, factor), (0, 1, 1))
    return ops.unfold_pixels(y_BKThw, conv.bias, factor)


def set_folded_head(conv: CausalConv3d, factor: int) -> None:
    """Give the decoder's head conv a weight folded to `factor` x `factor` output pixels per position
    (`folded_weight`, a buffer outside the state dict: set it after loading; stages.fused
    .fold_output_pixels), or take it away (`factor` 1). The decoder's output is 8x its latent size,
    so `factor` is one of 1, 2, 4, 8."""
    if factor not in (1, 2, 4, 8):
        raise ValueError(f"head pixel fold {factor}: choose 1, 2, 4 or 8 (a divisor of the VAE's 8x upscale)")
    conv._buffers.pop("folded_weight", None)
    if factor > 1:
        conv.register_buffer("folded_weight", fold_output_pixels(conv.weight.detach(), factor), persistent=False)


def _num_causal_convs(module: nn.Module) -> int:
    return sum(isinstance(m, CausalConv3d) for m in module.modules())


class Encoder3d(nn.Module):
    """Pixels [B, 3, T, H, W] -> [B, 2Z, T', H/8, W/8] (T' = 1 for frame 0 alone, T/4 afterwards)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                downsamples.append(
                    Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d")
                )
        self.downsamples = nn.Sequential(*downsamples)
        out_dim = dims[-1]
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim)
        )
        self.head = nn.Sequential(
            RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, cfg.z_dim * 2, 3, padding=1)
        )

    ops: VAEOps = EAGER_VAE_OPS
    """The head's norm (`_run_head`); `WanVAE.use_ops` sets it with the residual blocks'."""

    def forward(self, x_BCTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
        first = self.downsamples[0]
        if self.ops.fold_bias and isinstance(first, ResidualBlock) and not isinstance(first.shortcut, CausalConv3d):
            # the RGB conv's bias rides in the first residual block's kernels
            x_BCTHW = _cached_conv(self.conv1, x_BCTHW, cache, bias=False)
            x_BCTHW = first(x_BCTHW, cache, x_bias_C=self.conv1.bias)
            x_BCTHW = _run_cached(self.downsamples[1:], x_BCTHW, cache)
        else:
            x_BCTHW = _cached_conv(self.conv1, x_BCTHW, cache)
            x_BCTHW = _run_cached(self.downsamples, x_BCTHW, cache)
        x_BCTHW = _run_cached(self.middle, x_BCTHW, cache)
        return _run_head(self.head, x_BCTHW, cache, self.ops)


class Decoder3d(nn.Module):
    """Latents [B, Z, T, h, w] -> pixels [B, 3, T', 8h, 8w] (T' = 1 for latent 0 alone, 4T afterwards)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * u for u in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        upsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsample halves the width
            for _ in range(cfg.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )

    ops: VAEOps = EAGER_VAE_OPS
    """The head's norm (`_run_head`); `WanVAE.use_ops` sets it with the residual blocks'."""

    def forward(self, x_BZTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
        x_BCTHW = _cached_conv(self.conv1, x_BZTHW, cache)
        x_BCTHW = _run_cached(self.middle, x_BCTHW, cache)
        x_BCTHW = _run_cached(self.upsamples, x_BCTHW, cache)
        return _run_head(self.head, x_BCTHW, cache, self.ops)


class WanVAE(nn.Module):
    """The Wan2.1 video VAE (weights only). Streams through `stream_encode` / `stream_decode`.

    Latents here are the raw encoder mean mu; normalisation with LATENT_MEAN/LATENT_STD is the
    caller's choice (see stages.vae_stage and StreamConfig.latent_scaling).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def use_ops(self, ops: VAEOps) -> None:
        """Run every residual block's and both heads' elementwise pieces through `ops` (stages.fused), the
        decoder's upsample convs as phase convs where `ops.subpixel_upsample`, and on the GPU path
        (`ops.fold_bias`) the encoder's RGB input conv on channel-padded input and the decoder's RGB
        output conv folded over `ops.head_pixel_fold` squared pixels. Call after loading."""
        for module in self.modules():
            if isinstance(module, (ResidualBlock, Encoder3d, Decoder3d)):
                module.ops = ops
            elif isinstance(module, Resample):
                module.use_ops(ops)
        # the 3-channel input conv on a tensor-core kernel (stages.fused.INPUT_CHANNEL_MULTIPLE)
        set_padded_input(self.encoder.conv1, ops.fold_bias)
        # the 3-channel output conv on a wide tile (stages.fused.fold_output_pixels)
        set_folded_head(self.decoder.head[2], ops.head_pixel_fold if ops.fold_bias else 1)

    def use_compiled_ops(self) -> None:
        """Compiled residual-block pieces with the convs' biases folded in (CUDA)."""
        self.use_ops(compiled_vae_ops())

    def new_encode_cache(self) -> WanVAECache:
        """A fresh per-stream encoder cache (one slot per encoder CausalConv3d: 26 for the Wan layout)."""
        return WanVAECache(slots=[None] * _num_causal_convs(self.encoder))

    def new_decode_cache(self) -> WanVAECache:
        """A fresh per-stream decoder cache (one slot per decoder CausalConv3d: 33 for the Wan layout)."""
        return WanVAECache(slots=[None] * _num_causal_convs(self.decoder))

    def stream_encode(self, frames_BCTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
        """Encode the next chunk of a stream's frames (pixels in [-1, 1]) to raw mu [B, Z, T', H/8, W/8].

        The stream's first call takes 1 + 4k frames (k >= 0; Weir starts with 1, the reference with 5)
        and returns 1 + k latents; every later call takes 4k frames (k >= 1) and returns k latents.
        """
        num_frames = frames_BCTHW.shape[2]
        chunks: list[torch.Tensor] = []
        if cache.num_calls == 0:
            if num_frames % FRAMES_PER_LATENT != 1:
                raise ValueError(f"a stream's first encode takes 1 + 4k frames, got {num_frames}")
            chunks.append(frames_BCTHW[:, :, :1])
            if num_frames > 1:
                chunks.append(frames_BCTHW[:, :, 1:])
        else:
            if num_frames == 0 or num_frames % FRAMES_PER_LATENT:
                raise ValueError(
                    f"after the first chunk, encode takes a multiple of 4 frames, got {num_frames}"
                )
            chunks.append(frames_BCTHW)
        outs: list[torch.Tensor] = []
        cache.new_slots = 0
        for chunk_BCTHW in chunks:
            cache.cursor = 0
            outs.append(self.encoder(chunk_BCTHW, cache))
        cache.num_calls += 1
        moments_BCTHW = self.conv1(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
        mu_BZTHW, _log_var_BZTHW = moments_BCTHW.chunk(2, dim=1)
        return mu_BZTHW

    def stream_decode(self, z_BZTHW: torch.Tensor, cache: WanVAECache) -> torch.Tensor:
        """Decode the next raw (de-normalised) latents of a stream to pixels [B, 3, T', 8h, 8w], unclamped.

        The stream's first call of T latents returns 1 + 4(T-1) frames (latent 0 -> frame 0 alone);
        every later call returns 4T frames.
        """
        num_latents = z_BZTHW.shape[2]
        if num_latents == 0:
            raise ValueError("decode needs at least one latent frame")
        x_BZTHW = self.conv2(z_BZTHW)
        chunks = [x_BZTHW[:, :, :1], x_BZTHW[:, :, 1:]] if cache.num_calls == 0 else [x_BZTHW]
        outs: list[torch.Tensor] = []
        cache.new_slots = 0
        for chunk_BZTHW in chunks:
            if chunk_BZTHW.shape[2] == 0:
                continue
            cache.cursor = 0
            outs.append(self.decoder(chunk_BZTHW, cache))
        cache.num_calls += 1
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
