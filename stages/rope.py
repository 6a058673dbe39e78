"""3-axis rotary position embedding (RoPE) of the Wan2.1 DiT, with a per-row temporal start.

Shape legend:
    B  rows                 L  tokens per row (num_frames * tokens_per_frame)
    N  attention heads      D  head dim (128)
    P  rotation pairs per head (D/2 = 64)      T  table positions (1024)

A head of D = 128 reals is read as P = 64 pairs of adjacent channels (x[2p], x[2p+1]). The pairs are
split over the three axes as 22 temporal, 21 height, 21 width (temporal takes what is left:
P - 2*(P//3)). Axis a with `n_a` pairs and width `d_a = 2*n_a` rotates pair j at position pos by

    angle = pos * 10000 ** (-2j / d_a),    j = 0..n_a-1

Tokens are ordered frame -> row -> column. In KV mode the temporal position is
`start_frame + local_frame` (start_frame per row), while height and width positions start at 0.

Worked example: 1 frame of a 2x3 token grid starting at frame 7 gives, for token (r, c), the temporal
position 7 for all 6 tokens, height position r and width position c.

The reference builds a complex128 table and multiplies in float64. Weir precomputes cos/sin in
float64, stores them in float32 and rotates in float32 (max deviation ~1e-7 relative on fp32 inputs);
bf16 inputs are rotated in float32 and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.fused import rotate


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs of the (temporal, height, width) axes: 128 -> (22, 21, 21)."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even")
    num_pairs = head_dim // 2
    spatial = num_pairs // 3
    return num_pairs - 2 * spatial, spatial, spatial


def axis_angles(max_positions: int, num_pairs: int, theta: float = 10000.0) -> torch.Tensor:
    """float64 angles [T, num_pairs]: position * theta ** (-2j / (2 * num_pairs))."""
    width = 2 * num_pairs
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, width, 2, dtype=torch.float64) / width)
    return torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)


@dataclass(frozen=True)
class RopeAngles:
    """cos/sin of every token's rotation for one batch: both [B, L, 1, P] float32."""

    cos_BL1P: torch.Tensor
    sin_BL1P: torch.Tensor

    def apply(self, x_BLND: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent channel pairs of every head; returns x's dtype and shape."""
        return rotate(x_BLND, self.cos_BL1P, self.sin_BL1P)


class RopeTables:
    """Precomputed cos/sin tables of the three axes on one device (not an nn.Module: never cast to bf16).

    Args:
        head_dim: per-head width (128 for every Wan2.1 size).
        max_positions: table length per axis (1024, the reference's cap on the temporal index).
        device: where the tables live.
    """

    def __init__(
        self, head_dim: int = 128, max_positions: int = 1024, *, device: torch.device | str = "cpu"
    ) -> None:
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.device = torch.device(device)
        self.pairs = axis_pairs(head_dim)
        tables = [axis_angles(max_positions, n) for n in self.pairs]
        self._cos_TP = [a.cos().float().to(self.device) for a in tables]
        self._sin_TP = [a.sin().float().to(self.device) for a in tables]

    def angles(self, start_frames_B: torch.Tensor, num_frames: int, height: int, width: int) -> RopeAngles:
        """Rotations for B rows of `num_frames` frames of a height x width token grid.

        Row b's frame f sits at temporal position start_frames_B[b] + f. The caller keeps that below
        `max_positions` (the stream loop resets positions at frame 50, spec C/I.5); no host-side check
        is made here, to keep the hot path free of device syncs.
        """
        start_B = start_frames_B.to(self.device, torch.long)
        b = start_B.shape[0]
        frame_BF = start_B[:, None] + torch.arange(num_frames, device=self.device)[None, :]
        cos_parts, sin_parts = [], []
        for table_cos, table_sin, expand in zip(
            self._cos_TP,
            self._sin_TP,
            (
                lambda t: t[frame_BF][:, :, None, None, :],  # temporal: [B, F, 1, 1, P_t]
                lambda t: t[:height][None, None, :, None, :],  # height: [1, 1, H, 1, P_h]
                lambda t: t[:width][None, None, None, :, :],  # width: [1, 1, 1, W, P_w]
            ),
        ):
            shape = (b, num_frames, height, width, -1)
            cos_parts.append(expand(table_cos).expand(shape))
            sin_parts.append(expand(table_sin).expand(shape))
        tokens = num_frames * height * width
        cos_BL1P = torch.cat(cos_parts, dim=-1).reshape(b, tokens, 1, -1)
        sin_BL1P = torch.cat(sin_parts, dim=-1).reshape(b, tokens, 1, -1)
        return RopeAngles(cos_BL1P, sin_BL1P)
