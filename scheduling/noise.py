"""Motion-aware noise controller (StreamDiffusionV2 §C), one per stream. Pure Python floats.

Each new chunk of frames is scored by how much it moves (`motion` in [0, 1], measured by
stages.motion.motion_score); fast motion lowers the noise strength so the output follows the input,
a still scene raises it toward the initial strength so the style takes over:

    s_new = 0.9 * (s_init - 0.1 * motion) + 0.1 * s_prev
    current_step = int(1000 * s_new) - 100

Worked example (s_init = 0.8): a still chunk after a still chunk gives
s_new = 0.9 * 0.8 + 0.1 * 0.8 = 0.8 and current_step = int(800.0) - 100 = 700; full motion after a still
chunk gives 0.9 * 0.7 + 0.1 * 0.8 = 0.71, current_step = 610. The label timestep sits 0.1 below the
actual noise fraction, as in the published checkpoints (kept for parity). The arithmetic is float64 in
exactly this order: a saturated stream settles 2e-13 above 0.7, which truncates to 600, not 599.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class NoiseController:
    """Per-stream noise strength state. `enabled=False` keeps the initial strength and its step."""

    init_noise_scale: float = 0.8
    enabled: bool = True
    noise_scale: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.init_noise_scale <= 1.0:
            raise ValueError(f"init_noise_scale={self.init_noise_scale} must be in (0, 1]")
        if self.noise_scale is None:
            self.noise_scale = self.init_noise_scale

    def update(self, motion: float) -> tuple[float, int]:
        """Advance by one chunk with the given motion score; returns (noise_scale, current_step)."""
        if not 0.0 <= motion <= 1.0:
            raise ValueError(f"motion={motion} must be in [0, 1] (clamped distance / 0.2)")
        if self.enabled:
            self.noise_scale = (self.init_noise_scale - 0.1 * motion) * 0.9 + self.noise_scale * 0.1
        return self.noise_scale, int(1000 * self.noise_scale) - 100
