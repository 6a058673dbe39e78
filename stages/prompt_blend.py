"""Prompt mixing and blending on the text embeddings (the umT5 output), per stream.

Legend: S text tokens (512), T text width (4096); embeddings are [1, S, T], rows past a prompt's
token count zero.

The interpolation happens on the T5 output, where a convex combination is still a sensible text
conditioning; the DiT shard then recomputes its cross-attention K/V from the result
(`DiTShard.set_text_context`: text_embed MLP, then each block's K/V projections and norm), which are
not linear in the embedding, so interpolating K/V directly would be a different, unprincipled thing.

Two modes (`interpolate(a, b, t, mode)`, t in [0, 1], t = 0 -> a and t = 1 -> b exactly):

    linear   (1 - t) * a + t * b
    slerp    per token row: the direction moves along the great circle from a's to b's at constant
             angular speed, the length moves linearly from |a| to |b|. Rows where either side is zero
             (padding past a prompt's end) or the two directions are (anti)parallel (sin(angle) < 1e-3)
             fall back to linear.

Worked example, one row, a = (1, 0), b = (0, 2), t = 0.5: the angle is 90 deg, the direction
(cos 45, sin 45), the length 1.5 -> slerp (1.06, 1.06); linear gives (0.5, 1.0), shorter (the
reason slerp exists: mixing two unrelated embeddings linearly shrinks them).

Several weighted prompts (`mix_embeddings`): linear is the weighted sum with the normalised weights;
slerp takes two prompts (stages.prompts refuses more), mixed as interpolate(a, b, w_b).

A blend (`PromptBlend`) moves a stream's conditioning from what it is now to a new mix over the next
N chunks: chunk k = 1..N gets interpolate(old, new, k / N) in the new mix's mode, so chunk N gets the
new embedding itself, bit for bit what an immediate change would have set. A change during a blend
starts from the conditioning reached so far. Chunks in flight (stream batching) see each update as
soon as it is made, like an immediate change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stages.prompts import PromptMix

MIN_SIN = 1e-3
"""Below this sin(angle) between two rows, slerp falls back to linear (the direction is ill-defined)."""
_EPS = 1e-12


@torch.no_grad()
def interpolate(a_1ST: torch.Tensor, b_1ST: torch.Tensor, t: float, mode: str) -> torch.Tensor:
    """The embedding a fraction t of the way from a to b (module docstring), in a's dtype.

    Computed in float32; t <= 0 returns a and t >= 1 returns b themselves.
    """
    if t <= 0:
        return a_1ST
    if t >= 1:
        return b_1ST
    a, b = a_1ST.float(), b_1ST.float()
    linear = (1 - t) * a + t * b
    if mode == "linear":
        return linear.to(a_1ST.dtype)
    if mode != "slerp":
        raise ValueError(f"mode={mode!r}: choose 'linear' or 'slerp'")
    norm_a = a.norm(dim=-1, keepdim=True)
    norm_b = b.norm(dim=-1, keepdim=True)
    unit_a = a / norm_a.clamp_min(_EPS)
    unit_b = b / norm_b.clamp_min(_EPS)
    angle = torch.acos((unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0))
    sin_angle = torch.sin(angle)
    spherical = (norm_a > _EPS) & (norm_b > _EPS) & (sin_angle > MIN_SIN)
    safe_sin = torch.where(spherical, sin_angle, torch.ones_like(sin_angle))
    direction = (torch.sin((1 - t) * angle) * unit_a + torch.sin(t * angle) * unit_b) / safe_sin
    length = (1 - t) * norm_a + t * norm_b
    return torch.where(spherical, direction * length, linear).to(a_1ST.dtype)


@torch.no_grad()
def mix_embeddings(embeds: Sequence[torch.Tensor], weights: Sequence[float], mode: str) -> torch.Tensor:
    """One embedding from several: weights already normalised (sum 1, all > 0). One input is returned
    as is (so a prompt of weight 1 next to prompts of weight 0 is exactly that prompt alone)."""
    if len(embeds) != len(weights) or not embeds:
        raise ValueError(f"{len(embeds)} embeddings for {len(weights)} weights")
    if len(embeds) == 1:
        return embeds[0]
    if mode == "slerp":
        if len(embeds) != 2:
            raise ValueError(f"slerp mixes two embeddings, got {len(embeds)}")
        return interpolate(embeds[0], embeds[1], weights[1], "slerp")
    total = embeds[0].float() * weights[0]
    for e, w in zip(embeds[1:], weights[1:]):
        total = total + e.float() * w
    return total.to(embeds[0].dtype)


def encode_mix(text_encoder, mix: PromptMix, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The mix's embedding [1, S, T] on `device` in `dtype`: each prompt through the (cached) text
    encoder, then mix_embeddings. The one place this is done, for the engine and the stage actors."""
    active = mix.active
    embeds = [text_encoder.encode(text).to(device, dtype) for text, _ in active]
    return mix_embeddings(embeds, [w for _, w in active], mix.mode)


class PromptBlend:
    """One stream's conditioning and, during a blend, where it goes (module docstring).

    Per-stream state, held next to the DiT state it drives (the LatentStreamer in one process, each
    stage worker with a DiT shard in the compiled graph); every holder sees the same calls in the same
    order, so every shard conditions each chunk on the same embedding.

    Example, blend_chunks 4 from A to B: retarget(B, 4) -> None (A stays); advance() x4 -> A + 1/4,
    A + 2/4, A + 3/4 of the way, then B itself; advance() after that -> None.
    """

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None
        """The embedding the stream is conditioned on now."""
        self.mode = "linear"
        self._source: torch.Tensor | None = None
        self._target: torch.Tensor | None = None
        self._total = 0
        self._done = 0

    @property
    def remaining(self) -> int:
        """Chunks until the blend reaches its target (0: not blending)."""
        return self._total - self._done if self._target is not None else 0

    def retarget(self, target_1ST: torch.Tensor, blend_chunks: int, mode: str) -> torch.Tensor | None:
        """Aim at `target`. Returns the embedding to apply now (blend_chunks 0, or nothing set yet),
        or None: the blend starts with the next chunk (`advance`)."""
        if blend_chunks <= 0 or self.current is None:
            self.current, self._source, self._target = target_1ST, None, None
            self._total = self._done = 0
            return target_1ST
        self._source, self._target, self.mode = self.current, target_1ST, mode
        self._total, self._done = int(blend_chunks), 0
        return None

    def advance(self) -> torch.Tensor | None:
        """A new chunk enters the DiT: during a blend, the embedding for it (to apply now), else None."""
        if self._target is None:
            return None
        self._done += 1
        if self._done >= self._total:
            self.current, self._source, self._target = self._target, None, None
        else:
            self.current = interpolate(self._source, self._target, self._done / self._total, self.mode)
        return self.current
