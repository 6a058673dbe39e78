"""What a stream is conditioned on: one prompt, or several weighted prompts, and their bounds.

Pure Python (no torch), so the wire edge can validate a request without loading the model code. The
tensor side (mixing the text embeddings, blending over chunks) is stages.prompt_blend.

    PromptMix.of("a watercolor city")                       one prompt, weight 1
    PromptMix((WeightedPrompt("a cat", 3), WeightedPrompt("a dog", 1)))   weights normalised to 0.75 / 0.25
    PromptMix((WeightedPrompt("a cat", 1), WeightedPrompt("a dog", 1)), mode="slerp")

`mode` says how the prompts' embeddings are mixed and how a blend moves from the old conditioning to
this one: 'linear' (a weighted sum) or 'slerp' (spherical, two prompts at most; see
stages.prompt_blend.interpolate). Bad input raises BadRequestError naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stages.errors import BadRequestError

BLEND_MODES = ("linear", "slerp")
MAX_PROMPTS = 8
"""Prompts one mix may hold."""
MAX_BLEND_CHUNKS = 64
"""Longest blend: 64 chunks are 256 frames, 16 s at 16 fps."""
MAX_WEIGHT = 1e6
"""Largest weight (weights are relative; the bound keeps their sum finite)."""


@dataclass(frozen=True)
class WeightedPrompt:
    text: str
    weight: float = 1.0
    """Relative weight, finite and >= 0; 0 keeps the prompt out of the mix."""


@dataclass(frozen=True)
class PromptMix:
    """Weighted prompts, validated on construction (BadRequestError)."""

    prompts: tuple[WeightedPrompt, ...]
    mode: str = "linear"
    """'linear' or 'slerp': how the prompts are mixed, and how a blend to this mix interpolates."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        n = len(self.prompts)
        if not 1 <= n <= MAX_PROMPTS:
            raise BadRequestError(f"{n} prompts: give 1..{MAX_PROMPTS}", field="prompts", count=n)
        if self.mode not in BLEND_MODES:
            raise BadRequestError(f"blend mode {self.mode!r} must be one of {BLEND_MODES}", field="blend")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, WeightedPrompt) or not isinstance(p.text, str):
                raise BadRequestError(f"prompt {i} must be a WeightedPrompt with a text", field="prompts")
            w = p.weight
            if not isinstance(w, (int, float)) or not math.isfinite(w) or not 0 <= w <= MAX_WEIGHT:
                raise BadRequestError(f"weight {w!r} of prompt {i} must be a number in [0, {MAX_WEIGHT:g}]",
                                      field="prompts", index=i)
        if sum(p.weight for p in self.prompts) <= 0:
            raise BadRequestError("the prompt weights are all zero: give one a positive weight", field="prompts")
        if self.mode == "slerp" and n > 2:
            raise BadRequestError(f"slerp mixes two prompts, got {n}: use linear for more", field="blend", count=n)

    @classmethod
    def of(cls, prompt: str | PromptMix, mode: str = "linear") -> PromptMix:
        """A mix as is, or one prompt of weight 1."""
        if isinstance(prompt, PromptMix):
            return prompt
        if not isinstance(prompt, str):
            raise BadRequestError(f"prompt must be a string or a PromptMix, got {type(prompt).__name__}",
                                  field="prompt")
        return cls((WeightedPrompt(prompt),), mode)

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(text, normalised weight) of the prompts with a positive weight, in order; weights sum to 1.

        Example: weights (3, 0, 1) -> (("a", 0.75), ("c", 0.25)).
        """
        total = sum(p.weight for p in self.prompts)
        return tuple((p.text, p.weight / total) for p in self.prompts if p.weight > 0)

    def describe(self) -> str:
        """Short text for logs: 'a cat' or '0.75*a cat + 0.25*a dog (slerp)'."""
        active = self.active
        if len(active) == 1:
            return active[0][0][:80]
        mix = " + ".join(f"{w:.2f}*{t[:40]}" for t, w in active)
        return f"{mix} ({self.mode})"


def check_blend_chunks(blend_chunks: int) -> int:
    """The number of chunks a prompt change blends over: 0 (at once) .. MAX_BLEND_CHUNKS."""
    if isinstance(blend_chunks, bool) or not isinstance(blend_chunks, int) or not 0 <= blend_chunks <= MAX_BLEND_CHUNKS:
        raise BadRequestError(f"blend_chunks={blend_chunks!r} must be an integer in 0..{MAX_BLEND_CHUNKS}",
                              field="blend_chunks")
    return blend_chunks
