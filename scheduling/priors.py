"""Seed stage-time profiles (priors) per model, VAE kind and GPU class, until measurements replace them.
Pure data.

A pipeline replica starts its `StageProfile` from these numbers, then calibrates it from its own start-up
warm-up ticks (deployments.pipeline), and every forward it runs feeds the measured times back
(`BatchingScheduler.update_from_output`): after `ProfileConfig.min_samples` measurements of a curve the
robust fit replaces the seed. The router admits from the same profile, pushed by the replica with its
load. A prior that is too slow refuses streams until the measurements arrive; one that is too fast
over-admits. So the priors are measurements with about 10% slack.

The GPU numbers are H200 measurements (bf16, 480x832, 1 step; BENCHMARKS.md, "Serving"), rounded up:
    wan-1.3b: a tick over k one-step streams took 22.9 / 43.6 / 85.1 / 168.3 ms of DiT for k = 1 / 2 /
              4 / 8: the GPU is already full at one row, so rows of different streams cost the same
              batched or not -> per block 0.05 ms + 0.7 ms per row (one stream's n stream-batch rows
              are cheaper, 32.9 ms for 2: the prior is conservative there);
              Wan VAE encode 26.5 ms, decode 53 ms per stream and chunk -> seeded 1 + 27 and 1 + 54 ms;
              TAEHV encode 5.6-6.5 ms, decode 8-9 ms (host work included) -> 1 + 6.5 and 1 + 9 ms.
      worked example: one 1-step TAEHV stream: encode 0.0075 + 30 * (0.00005 + 0.0007) + decode 0.010 =
      0.040 s per chunk (about 100 FPS); at 16 fps (4 chunks/s) that is 0.16 of the GPU, so the 0.85
      row-load cap admits 5 such streams.
              start-up of a 1-step TAEHV stream: its eager prefill (about 110 ms), one eager DiT call
              and one capture for each of its two graph keys (partial, then full KV caches: about 100
              ms and 145 ms / 110-130 ms, against 26 ms steady) and the TAEHV calls' warm-up -> 0.55 s.
    wan-14b: DiT 134 / 229 ms for 1 / 2 rows of one stream (40 blocks) -> per block 1.1 ms + 2.6 ms per
              row; the VAEs as for 1.3B; start-up not measured, taken as 1.3B's scaled by the DiT's one-row
              time (134 / 23 ms) -> 3.2 s.
Other GPU classes scale every time by CLASS_TIME_FACTOR (dense bf16 throughput and memory bandwidth
relative to the H200; estimates until that class is measured). Unknown classes use 1.0.

The tiny CPU model (tests, demo) was timed on the 2-core development box, one torch thread, 64x64 frames
(prefill ~0.15 s, a 2-step stream-batch tick ~0.2-0.3 s, encode and decode included), rounded up:

    tiny, cpu:  DiT block 5 ms + 10 ms per row (4 blocks), encode 20 ms + 20 ms/chunk,
                decode 20 ms + 30 ms/chunk; a 2-step tick of one stream: 0.04 + 4 * 0.025 + 0.05 = 0.19 s;
                start-up 0.05 s (no graphs: the prefill costs about a steady tick).
    (Both VAE kinds get these: on CPU the tiny TAEHV is not much cheaper than the tiny Wan VAE.)

Profiles are keyed by (GPU class, pipeline's nominal shape = model, 480x832 (64x64 for tiny), the
pipeline's default VAE). A stream of another resolution is priced with the nominal profile scaled by
its work (`work_scales`: its VAE chunks by its pixel count, its DiT rows by its tokens, the self-
attention's share quadratically), and its measured times feed the nominal curves divided by the same
factors. A stream with the pipeline's other VAE kind has its chunks priced by the priors' ratio of
the two kinds' per-chunk times (`vae_kind_ratio`: a Wan VAE chunk is 5.2 TAEHV chunks on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduling.profile import AffineTime, ShapeKey, StageProfile


@dataclass(frozen=True)
class ProfilePrior:
    """Seed curves of one model with one VAE kind, on the reference GPU class (H200)."""

    shape: ShapeKey
    """The nominal shape (the key of its profile)."""
    num_blocks: int
    """DiT blocks one forward runs (L)."""
    encode: AffineTime
    dit_block: AffineTime
    decode: AffineTime
    startup: AffineTime
    """Constant (per_item_s = 0): the start-up cost of one stream, scheduling.profile."""


_TINY = {"encode": AffineTime(0.02, 0.02), "decode": AffineTime(0.02, 0.03)}
_GPU_VAES = {
    "wan": {"encode": AffineTime(0.001, 0.027), "decode": AffineTime(0.001, 0.054)},
    "taehv": {"encode": AffineTime(0.001, 0.0065), "decode": AffineTime(0.001, 0.009)},
}
_DIT: dict[str, tuple[int, int, int, AffineTime, float]] = {
    # model -> (nominal height, width, blocks, seed time of one block, a stream's start-up seconds)
    "tiny": (64, 64, 4, AffineTime(0.005, 0.01), 0.05),
    "wan-1.3b": (480, 832, 30, AffineTime(0.00005, 0.0007), 0.55),
    "wan-14b": (480, 832, 40, AffineTime(0.0011, 0.0026), 3.2),
}
VAE_KINDS = ("wan", "taehv")

PRIORS: dict[tuple[str, str], ProfilePrior] = {
    (model, vae): ProfilePrior(
        ShapeKey(model, height, width, vae), blocks, dit_block=block, startup=AffineTime(startup, 0.0),
        **(_TINY if model == "tiny" else _GPU_VAES[vae]),
    )
    for model, (height, width, blocks, block, startup) in _DIT.items()
    for vae in VAE_KINDS
}
"""(model preset, VAE kind) -> prior. Every model the DiT presets define has a row per VAE (a test checks)."""

CLASS_TIME_FACTOR: dict[str, float] = {
    "h200": 1.0, "h100": 1.1, "a100": 2.6, "l40s": 2.8, "rtx": 3.2, "rtx4090": 3.2, "cpu": 1.0,
}
"""GPU class (lower-case class name or Ray accelerator type) -> stage-time factor against the H200."""


def prior_of(model: str, vae: str = "wan") -> ProfilePrior:
    """The prior of a model preset with a VAE kind. Raises ValueError naming the known presets and kinds."""
    try:
        return PRIORS[(model, vae)]
    except KeyError:
        models = sorted({m for m, _ in PRIORS})
        raise ValueError(f"no profile prior for model {model!r} with VAE {vae!r}; known models {models}, "
                         f"VAEs {list(VAE_KINDS)}") from None


COLD_SHAPE_S: dict[tuple[str, str], float] = {
    ("tiny", "wan"): 0.0, ("tiny", "taehv"): 0.0,
    ("wan-1.3b", "taehv"): 9.0, ("wan-1.3b", "wan"): 42.0,
    ("wan-14b", "taehv"): 18.0, ("wan-14b", "wan"): 52.0,
}
"""(model, VAE kind) -> seconds (H200) a pipeline stalls on the first stream of a resolution it has not
run with that VAE: torch.compile's pieces for the new shapes, cuDNN's autotuning of the VAE convs, the
CUDA-graph captures; every stream on the replica waits through them. Measured for wan-1.3b, 1 step,
after the start-up warm-up at 480x832, on fresh machines (BENCHMARKS.md, "Cold shapes"; `weir bench
engine --cold-shapes`): a first TAEHV stream at 512x512 / 384x672 lost 4.8 / 5.1 s over its first two
chunks (the DiT's compiles and captures for the new token count, and the TAEHV's), 7.5 / 7.8 s in an
earlier probe; a first Wan VAE stream after it, the DiT already warm, 21.0 / 20.3 s more (30.8 / 25.6
s in the probe: the Wan VAE's norm kernels compiled for each level's new shape, once for the 1-frame
first chunk and once for 4-frame chunks, and its convs autotuned). So a Wan VAE stream first at a
shape costs both parts; the figures below sit above every run. wan-14b: not measured; 1.3B's plus the
DiT's part scaled by its one-row time (about 2x). The tiny CPU model compiles nothing."""


def vae_kind_ratio(model: str, vae: str, profile_vae: str) -> float:
    """A chunk's encode + decode work with VAE kind `vae` against one with `profile_vae` (the kind its
    profile measures), from the priors' per-chunk times; 1.0 for the same kind or '' (the default).

    Example: vae_kind_ratio("wan-1.3b", "wan", "taehv") -> (0.027 + 0.054) / (0.0065 + 0.009) = 5.23.
    """
    if not vae or vae == profile_vae:
        return 1.0
    mine, theirs = prior_of(model, vae), prior_of(model, profile_vae)
    return ((mine.encode.per_item_s + mine.decode.per_item_s)
            / (theirs.encode.per_item_s + theirs.decode.per_item_s))


def cold_shape_s(model: str, gpu_class: str, vae: str) -> float:
    """COLD_SHAPE_S of the model with VAE kind `vae`, scaled to the GPU class (0 without an entry).

    Example: cold_shape_s("wan-1.3b", "h100", "taehv") -> 9.0 * 1.1 = 9.9.
    """
    return COLD_SHAPE_S.get((model, vae), 0.0) * class_time_factor(gpu_class)


def work_scales(model: str, height: int, width: int) -> tuple[float, float]:
    """(DiT, VAE) work of a stream at height x width against the model's nominal shape, for pricing it
    with the nominal profile.

    VAE: the pixel ratio r. DiT: per row, the linear work (projections, FFN, cross-attention) grows as
    r and the self-attention over the KV caches, whose keys grow with the tokens too, as r^2. At the
    nominal shape attention's share of a block's flops is f = S / (3 D + F + S + text_len) per token
    (S = cache keys, D = width, F = FFN width: 4 S D against 2 (6 D^2 + 2 D F) + 4 text_len D), so the
    DiT factor is (1 - f) r + f r^2.

    Example: wan-1.3b (D = 1536, F = 8960, S = 6 * 1560 = 9360): f = 0.40; 512x512 has r = 262144 /
    399360 = 0.656 -> (0.566, 0.656); 720x1280 has r = 2.31 -> (3.52, 2.31).
    """
    from stages.config import DIT_PRESETS, StreamConfig

    prior = prior_of(model)
    cfg = DIT_PRESETS[model]
    r = (height * width) / (prior.shape.height * prior.shape.width)
    tokens = (prior.shape.height // 16) * (prior.shape.width // 16)
    keys = StreamConfig().num_kv_cache_frames * tokens
    f = keys / (3 * cfg.dim + cfg.ffn_dim + keys + cfg.text_len)
    return (1.0 - f) * r + f * r * r, r


def class_time_factor(gpu_class: str) -> float:
    """How much slower than an H200 `gpu_class` runs the stages (1.0 when unknown).

    Example: class_time_factor("H100") -> 1.1; class_time_factor("unlabelled-X") -> 1.0.
    """
    return CLASS_TIME_FACTOR.get(gpu_class.lower(), 1.0)


def seed_profile(model: str, gpu_class: str, vae: str = "wan") -> StageProfile:
    """A fresh StageProfile of `gpu_class` seeded with the model's prior, scaled to the class.

    Example: seed_profile("tiny", "cpu").tick_s(rows=2, admitted=1, emitted=1, num_blocks=4) -> 0.19.
    """
    p = prior_of(model, vae)
    f = class_time_factor(gpu_class)
    return StageProfile(gpu_class, p.shape, encode=p.encode.scaled(f), dit_block=p.dit_block.scaled(f),
                        decode=p.decode.scaled(f), startup=p.startup.scaled(f))
