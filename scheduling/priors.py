"""Seed stage-time profiles (priors) per model and GPU class, until measurements replace them. Pure data.

A pipeline replica starts its `StageProfile` from these numbers; every forward it runs feeds the
measured times back (`BatchingScheduler.update_from_output`), and after `ProfileConfig.min_samples`
measurements of a curve the robust fit replaces the seed. The router admits from the same profile,
pushed by the replica with its load. So a prior only has to be *conservative* (slower than reality):
too slow a prior refuses a few streams during the first seconds, too fast a prior over-admits.

The GPU numbers are the H100 measurements of BENCHMARKS.md (1.3B, 480x832, bf16, Wan VAE) with about
20% slack, used for every GPU class until that class's own measurements replace them:
    wan-1.3b: DiT 40.0 ms for one row and 64.7 ms for two (1 and 2 steps) -> per block 0.5 ms + 0.82 ms
              per row -> seeded 0.6 ms + 1.0 ms per row; Wan VAE encode 42 ms, decode 75 ms per 4-frame
              chunk -> seeded 5 + 45 ms and 5 + 80 ms.
      worked example: one 1-step stream: encode 0.05 + 30 * (0.0006 + 0.001) + decode 0.085 = 0.183 s per
      chunk, so one H100 keeps up with about 1.4 such streams at 16 fps (4 chunks/s each).
    wan-14b: DiT 156 ms per row measured (40 blocks) -> seeded 1.5 ms + 4.5 ms per row per block.
The tiny CPU model (tests, demo) was timed on the 2-core development box, one torch thread, 64x64 frames
(prefill ~0.15 s, a 2-step stream-batch tick ~0.2-0.3 s, encode and decode included), rounded up:

    tiny, cpu:  DiT block 5 ms + 10 ms per row (4 blocks), encode 20 ms + 20 ms/chunk,
                decode 20 ms + 30 ms/chunk; a 2-step tick of one stream: 0.04 + 4 * 0.025 + 0.05 = 0.19 s.

Profiles are keyed by (GPU class, model's nominal shape): streams of other resolutions on the same
pipeline are scheduled with the nominal profile (measurements of every stream feed it alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduling.profile import AffineTime, ShapeKey, StageProfile


@dataclass(frozen=True)
class ProfilePrior:
    """Seed curves of one model (per GPU class they are all the same guess for now)."""

    shape: ShapeKey
    """The model's nominal shape (the key of its profile)."""
    num_blocks: int
    """DiT blocks one forward runs (L)."""
    encode: AffineTime
    dit_block: AffineTime
    decode: AffineTime


_WAN_13B_BLOCK = AffineTime(0.0006, 0.001)

PRIORS: dict[str, ProfilePrior] = {
    "tiny": ProfilePrior(
        ShapeKey("tiny", 64, 64, "wan"), 4,
        encode=AffineTime(0.02, 0.02), dit_block=AffineTime(0.005, 0.01), decode=AffineTime(0.02, 0.03),
    ),
    "wan-1.3b": ProfilePrior(
        ShapeKey("wan-1.3b", 480, 832, "wan"), 30,
        encode=AffineTime(0.005, 0.045), dit_block=_WAN_13B_BLOCK, decode=AffineTime(0.005, 0.08),
    ),
    "wan-14b": ProfilePrior(
        ShapeKey("wan-14b", 480, 832, "wan"), 40,
        encode=AffineTime(0.005, 0.045), dit_block=AffineTime(0.0015, 0.0045), decode=AffineTime(0.005, 0.08),
    ),
}
"""model preset -> prior. Every model the DiT presets define has a row (a test checks)."""


def prior_of(model: str) -> ProfilePrior:
    """The prior of a model preset. Raises ValueError naming the known presets."""
    try:
        return PRIORS[model]
    except KeyError:
        raise ValueError(f"no profile prior for model {model!r}; known: {sorted(PRIORS)}") from None


def seed_profile(model: str, gpu_class: str) -> StageProfile:
    """A fresh StageProfile of `gpu_class` seeded with the model's prior.

    Example: seed_profile("tiny", "cpu").tick_s(rows=2, admitted=1, emitted=1, num_blocks=4) -> 0.19.
    """
    p = prior_of(model)
    return StageProfile(gpu_class, p.shape, encode=p.encode, dit_block=p.dit_block, decode=p.decode)
