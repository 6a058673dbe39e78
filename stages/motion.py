"""Motion score of a chunk of frames, the input of scheduling.noise.NoiseController.

Legend: B batch, C channels (3), T frames, H height, W width; pixels in [-1, 1].

    r_t = sqrt(mean_{B,C,H,W} (x_t - x_{t-1})^2)   for each new frame t (x_{-1}: the previous chunk's last)
    motion = clamp(max_t r_t / 0.2, 0, 1)

computed in float64 in that order (the controller's int() truncation is sensitive to the last ulp).
The score is the one value a chunk reads back to the host (stages.vae_stage `HostCopy`, after the
chunk's encode is queued).
"""

from __future__ import annotations

import torch

MOTION_NORMALISER = 0.2
"""A per-frame RMS pixel change of 0.2 (10% of the [-1, 1] range) counts as full motion."""


def motion_score(prev_last_BC1HW: torch.Tensor, chunk_BCTHW: torch.Tensor) -> torch.Tensor:
    """Motion score in [0, 1] of `chunk_BCTHW` following the frame `prev_last_BC1HW`, as a float64
    scalar on the frames' device (not read back)."""
    if prev_last_BC1HW.shape[2] != 1:
        raise ValueError(f"prev_last_BC1HW must hold one frame, got shape {tuple(prev_last_BC1HW.shape)}")
    frames_BCTHW = torch.cat([prev_last_BC1HW, chunk_BCTHW], dim=2).to(torch.float64)
    diff_sq_BCTHW = (frames_BCTHW[:, :, 1:] - frames_BCTHW[:, :, :-1]) ** 2
    rms_T = torch.sqrt(diff_sq_BCTHW.mean(dim=(0, 1, 3, 4)))
    return (rms_T.max() / MOTION_NORMALISER).clamp(0, 1)
