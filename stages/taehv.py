"""TAEHV: the tiny video autoencoder for Wan2.1 latents (`taew2_1.pth`), streamed with per-stream state.

Legend:
    B batch, T frames (pixel or latent, as the name says), C channels, H/W height/width at that
    layer's resolution, N = B*T frames flattened into the batch of a 2D conv.

Both halves are nn.Sequential stacks of per-frame 2D convs; time enters only through
- MemBlock: conv(cat(x_t, x_{t-1})) -> ReLU -> conv -> ReLU -> conv, plus skip, ReLU; x_{-1} = 0;
- TPool(s): s consecutive frames concatenated on channels, 1x1 conv back to C (time / s);
- TGrow(s): 1x1 conv C -> s*C, split into s consecutive frames (time * s).

Indices are those of the published checkpoint (`encoder.N...`, `decoder.N...`; the loader, with its
one TGrow adaptation, is stages.checkpoints.load_taehv):

    encoder  0 conv 3->64, 1 ReLU, 2 TPool(2), 3 conv s2, 4-6 MemBlock, 7 TPool(2), 8 conv s2,
             9-11 MemBlock, 12 TPool(1), 13 conv s2, 14-16 MemBlock, 17 conv 64->16
    decoder  0 Clamp (3 tanh(x/3)), 1 conv 16->256, 2 ReLU, 3-5 MemBlock, 6 Up2x, 7 TGrow(1),
             8 conv 256->128, 9-11 MemBlock, 12 Up2x, 13 TGrow(2), 14 conv 128->64, 15-17 MemBlock,
             18 Up2x, 19 TGrow(2), 20 conv 64->64, 21 ReLU, 22 conv 64->3

Latents: 16 channels at 1/8 of the pixel size, one per 4 frames, in the diffusion model's own
(normalised) latent space: TAEHV applies no latent mean/std. Pixels are [0, 1] inside this module.

Timing. The decoder turns latent m into raw frames 4m..4m+3 and a one-shot decode drops the first 3
raw frames, so decoded frame i is raw frame i+3: latent 0 -> frame 0, latent m -> frames 4m-3..4m,
the Wan VAE's 1 + 4k layout. The encoder builds latent m from input positions 4m..4m+3 (a 3-frame
look-ahead relative to what it represents). Weir streams without look-ahead: a stream's first chunk
(frame 0, or 1 + 4k frames) feeds frame 0 four times, then 4 frames per latent, so latent m >= 1 is
built from frames 4m-3..4m and the encode->decode round trip lags the input by 3 frames.

Streaming. `TAEHVCache` keeps, per MemBlock, the last frame of its input (its x_{t-1} for the next
call), so chunked calls equal one long pass exactly (`stream_encode`, `stream_decode` with
context_latents=None). The reference instead re-decodes the last <= 3 latents from empty memory with
the new ones and keeps only the new frames (context_latents=3); that is an approximation of the
long pass, reproduced for parity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stages.fused import (
    channels_last_weights_,
    conv_forward,
    is_channels_last,
    nearest_upsample_2x,
    set_padded_input,
)

FRAMES_PER_LATENT = 4
"""Temporal compression (2 x 2 from the two stride-2 TPools / TGrows)."""

FRAMES_TO_TRIM = 3
"""Raw decoder frames before frame 0 (FRAMES_PER_LATENT - 1): dropped at a stream's start."""


@dataclass(frozen=True)
class TAEHVConfig:
    """Widths of a TAEHV. The defaults are the published `taew2_1.pth` (Wan2.1 latents)."""

    latent_channels: int = 16
    """Latent channels (the Wan VAE's z_dim)."""
    encoder_width: int = 64
    """Channels of every encoder stage."""
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    """Channels of the three MemBlock stages of the decoder and of its output conv."""

    def __post_init__(self) -> None:
        if self.latent_channels < 1 or self.encoder_width < 1 or min(self.decoder_widths) < 1:
            raise ValueError(f"TAEHV widths must be >= 1, got {self}")
        if len(self.decoder_widths) != 4:
            raise ValueError(f"decoder_widths={self.decoder_widths} needs 4 entries")


TAEHV_PRESETS: dict[str, TAEHVConfig] = {
    "taew2_1": TAEHVConfig(),
    "tiny": TAEHVConfig(encoder_width=8, decoder_widths=(16, 8, 8, 8)),
}


class _Conv2d(nn.Conv2d):
    """nn.Conv2d that runs through a channel-padded weight once it has one (stages.fused
    `set_padded_input`: the RGB input conv on the GPU layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x, self.bias)


def _conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return _Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Upsample2x(nn.Module):
    """2x nearest upsampling (nn.Upsample(scale_factor=2)), layout-keeping: stages.fused.nearest_upsample_2x."""

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        return nearest_upsample_2x(x_NCHW)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over cat(this frame, the previous frame) of its own input."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(n_in * 2, n_out), nn.ReLU(), _conv3x3(n_out, n_out), nn.ReLU(), _conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x_NCHW: torch.Tensor, past_NCHW: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x_NCHW, past_NCHW], 1)) + self.skip(x_NCHW))


class TPool(nn.Module):
    """Merge `stride` consecutive frames into one (channels concatenated, 1x1 conv)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x_NCHW.shape
        s = self.stride
        if s > 1 and is_channels_last(x_NCHW):  # the same merge in NHWC memory order: stays NHWC
            x_NHWsC = x_NCHW.permute(0, 2, 3, 1).unflatten(0, (N // s, s)).permute(0, 2, 3, 1, 4)
            return self.conv(x_NHWsC.reshape(N // s, H, W, s * C).permute(0, 3, 1, 2))
        return self.conv(x_NCHW.reshape(-1, s * C, H, W))


class TGrow(nn.Module):
    """Split each frame into `stride` consecutive frames (1x1 conv to stride*C channels)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x_NCHW: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x_NCHW.shape
        s = self.stride
        y_NDHW = self.conv(x_NCHW)
        if s > 1 and is_channels_last(y_NDHW):  # the same split in NHWC memory order: stays NHWC
            y_NsHWC = y_NDHW.permute(0, 2, 3, 1).unflatten(-1, (s, C)).permute(0, 3, 1, 2, 4)
            return y_NsHWC.reshape(N * s, H, W, C).permute(0, 3, 1, 2)
        return y_NDHW.reshape(-1, C, H, W)


@dataclass
class TAEHVCache:
    """One stream's TAEHV state for the encoder or the decoder (never stored on a module).

    `memory[i]` is the last input frame [B, C, H, W] of the MemBlock at Sequential index i (None
    before the stream's first call). `context_BTCHW` holds the last latents for the reference's
    re-decode mode. `num_calls` counts completed calls.
    """

    memory: list[torch.Tensor | None]
    num_calls: int = 0
    context_BTCHW: torch.Tensor | None = field(default=None, repr=False)

    def nbytes(self) -> int:
        tensors = [m for m in self.memory if m is not None]
        if self.context_BTCHW is not None:
            tensors.append(self.context_BTCHW)
        return sum(t.numel() * t.element_size() for t in tensors)


def run_with_memory(
    layers: nn.Sequential,
    x_BTCHW: torch.Tensor,
    memory: list[torch.Tensor | None] | None,
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """Apply a TAEHV stack to a chunk, all frames at once, MemBlocks reading `memory` as frame -1.

    memory=None starts from empty memory (zeros) and keeps nothing; otherwise `memory` is updated in
    place with each MemBlock's last input frame, so the next chunk continues the same pass (an entry
    that exists is overwritten in place, never replaced: the stages' CUDA graphs rely on that). The
    chunk's frame count must be divisible by the product of the TPool strides. `channels_last` runs
    every frame in NHWC memory order (cuDNN's native layout on CUDA; same values).

    Worked example, encoder, T=4: 4 frames -> TPool(2) -> 2 -> TPool(2) -> 1 -> TPool(1) -> 1 latent.
    """
    B, T = x_BTCHW.shape[:2]
    x_NCHW = x_BTCHW.flatten(0, 1)
    if channels_last:
        x_NCHW = x_NCHW.contiguous(memory_format=torch.channels_last)
    for index, layer in enumerate(layers):
        if isinstance(layer, MemBlock):
            x_BTCHW = x_NCHW.unflatten(0, (B, T))
            prev_BCHW = memory[index] if memory is not None else None
            past_NCHW = torch.empty_like(x_NCHW)  # frame t's past is frame t-1 (in x's own layout)
            past_BTCHW = past_NCHW.unflatten(0, (B, T))
            if prev_BCHW is None:
                past_BTCHW[:, 0].zero_()
            else:
                past_BTCHW[:, 0].copy_(prev_BCHW)
            past_BTCHW[:, 1:].copy_(x_BTCHW[:, :-1])
            if memory is not None:  # in place once it exists: a captured CUDA graph keeps its address
                last_BCHW = x_BTCHW[:, -1]
                if prev_BCHW is not None and prev_BCHW.shape == last_BCHW.shape:
                    prev_BCHW.copy_(last_BCHW)
                else:
                    memory[index] = last_BCHW.clone()
            x_NCHW = layer(x_NCHW, past_NCHW)
        elif isinstance(layer, TPool):
            if T % layer.stride:
                raise ValueError(f"TPool at index {index} needs a multiple of {layer.stride} frames, got {T}")
            x_NCHW = layer(x_NCHW)
            T //= layer.stride
        elif isinstance(layer, TGrow):
            x_NCHW = layer(x_NCHW)
            T *= layer.stride
        else:
            x_NCHW = layer(x_NCHW)
    return x_NCHW.unflatten(0, (B, T))


class TAEHV(nn.Module):
    """Tiny encoder/decoder between pixels [0, 1] (NTCHW) and 16-channel latents (weights only)."""

    def __init__(self, cfg: TAEHVConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or TAEHVConfig()
        self.cfg = cfg
        e, z = cfg.encoder_width, cfg.latent_channels
        self.encoder = nn.Sequential(
            _conv3x3(3, e), nn.ReLU(),
            TPool(e, 2), _conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            TPool(e, 2), _conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            TPool(e, 1), _conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
            _conv3x3(e, z),
        )  # fmt: skip
        self.channels_last = False
        d0, d1, d2, d3 = cfg.decoder_widths
        self.decoder = nn.Sequential(
            Clamp(), _conv3x3(z, d0), nn.ReLU(),
            MemBlock(d0, d0), MemBlock(d0, d0), MemBlock(d0, d0), Upsample2x(), TGrow(d0, 1),
            _conv3x3(d0, d1, bias=False),
            MemBlock(d1, d1), MemBlock(d1, d1), MemBlock(d1, d1), Upsample2x(), TGrow(d1, 2),
            _conv3x3(d1, d2, bias=False),
            MemBlock(d2, d2), MemBlock(d2, d2), MemBlock(d2, d2), Upsample2x(), TGrow(d2, 2),
            _conv3x3(d2, d3, bias=False), nn.ReLU(), _conv3x3(d3, 3),
        )  # fmt: skip

    def use_channels_last(self) -> None:
        """Store the conv weights and run the activations in NHWC memory order (CUDA: no layout
        conversions around cuDNN's kernels). Values are unchanged."""
        channels_last_weights_(self)
        self.channels_last = True
        set_padded_input(self.encoder[0], True)  # 3 input channels: a slow cuDNN kernel otherwise

    # ---- one-shot (whole clip) ----

    def encode_video(self, frames_BTCHW: torch.Tensor) -> torch.Tensor:
        """Whole clip, pixels [0, 1], T a multiple of 4 -> latents [B, T/4, 16, H/8, W/8]."""
        return run_with_memory(self.encoder, frames_BTCHW, None, channels_last=self.channels_last)

    def decode_video(self, latents_BTCHW: torch.Tensor) -> torch.Tensor:
        """Whole clip of T latents -> 4T - 3 frames [B, 4T-3, 3, 8h, 8w] in [0, 1]."""
        return run_with_memory(self.decoder, latents_BTCHW, None, channels_last=self.channels_last)[:, FRAMES_TO_TRIM:].clamp(0, 1)

    # ---- streaming ----

    def new_encode_cache(self) -> TAEHVCache:
        return TAEHVCache(memory=[None] * len(self.encoder))

    def new_decode_cache(self) -> TAEHVCache:
        return TAEHVCache(memory=[None] * len(self.decoder))

    def stream_encode(self, frames_BTCHW: torch.Tensor, cache: TAEHVCache) -> torch.Tensor:
        """Encode a stream's next frames (pixels [0, 1]) -> latents [B, T', 16, H/8, W/8].

        First call: 1 + 4k frames -> 1 + k latents (frame 0 is fed 4 times); later calls: 4k -> k.
        """
        num_frames = frames_BTCHW.shape[1]
        if cache.num_calls == 0:
            if num_frames % FRAMES_PER_LATENT != 1:
                raise ValueError(f"a stream's first encode takes 1 + 4k frames, got {num_frames}")
            first_BTCHW = frames_BTCHW[:, :1].expand(-1, FRAMES_PER_LATENT, -1, -1, -1)
            frames_BTCHW = torch.cat([first_BTCHW, frames_BTCHW[:, 1:]], dim=1)
        elif num_frames == 0 or num_frames % FRAMES_PER_LATENT:
            raise ValueError(f"after the first chunk, encode takes a multiple of 4 frames, got {num_frames}")
        latents_BTCHW = run_with_memory(self.encoder, frames_BTCHW, cache.memory, channels_last=self.channels_last)
        cache.num_calls += 1
        return latents_BTCHW

    def stream_decode(
        self,
        latents_BTCHW: torch.Tensor,
        cache: TAEHVCache,
        *,
        context_latents: int | None = None,
        emit_first_frame: bool = True,
    ) -> torch.Tensor:
        """Decode a stream's next T latents -> frames [B, T', 3, 8h, 8w] in [0, 1].

        Later calls give T' = 4T. The first call gives 4T - 3 (emit_first_frame: the Wan VAE's count,
        latent 0 -> frame 0) or 4(T-1) (the reference, which drops latent 0's frame).

        context_latents=None continues each MemBlock from its memory (exact: equals one long decode);
        an int k re-decodes the last <= k latents of earlier calls from empty memory together with
        the new ones and keeps the last 4T frames (the reference, k = 3).
        """
        num_latents = latents_BTCHW.shape[1]
        if num_latents == 0:
            raise ValueError("decode needs at least one latent frame")
        first = cache.num_calls == 0
        if context_latents is None:
            raw_BTCHW = run_with_memory(self.decoder, latents_BTCHW, cache.memory, channels_last=self.channels_last)
        else:
            window_BTCHW = latents_BTCHW
            if not first and cache.context_BTCHW is not None:
                window_BTCHW = torch.cat([cache.context_BTCHW.to(latents_BTCHW), latents_BTCHW], dim=1)
            cache.context_BTCHW = window_BTCHW[:, -context_latents:].clone() if context_latents > 0 else None
            raw_BTCHW = run_with_memory(self.decoder, window_BTCHW, None, channels_last=self.channels_last)
        if first:
            num_out = num_latents * FRAMES_PER_LATENT - (
                FRAMES_TO_TRIM if emit_first_frame else FRAMES_PER_LATENT
            )
        else:
            num_out = num_latents * FRAMES_PER_LATENT
        cache.num_calls += 1
        return raw_BTCHW[:, raw_BTCHW.shape[1] - num_out :].clamp(0, 1)
