"""Measured stage-time profiles: how long encode, one DiT block and decode take on a GPU class. Pure Python.

A profile belongs to one GPU class (e.g. "H100") and one shape (model, resolution, VAE kind) and holds
three curves, each a time as a function of a batch size:

    encode     seconds to VAE-encode `chunks` chunks (4 frames each) together
    dit_block  seconds for ONE DiT block over `rows` rows (a row = one latent frame of one denoising
               slot of one stream, i.e. F tokens); a forward over L blocks costs L * dit_block(rows)
    decode     seconds to VAE-decode `chunks` finished chunks together

and one scalar:

    startup    seconds of device work a stream's start costs beyond its steady chunks (its prefill,
               and the eager calls and CUDA-graph captures of its first chunks), paid once per stream
               while other streams wait (`items` is always 1)

The denoising step count is not part of the key: it enters through the rows. A stream with n steps in
stream-batch mode puts n rows in each forward; in step-by-step mode it puts one row in each of n forwards.

Each curve is affine in the batch size, `t(b) = fixed_s + per_item_s * b`, fitted robustly from a rolling
window of measurements (median per batch size, then the Theil-Sen line through those medians) and seeded
from an offline benchmark until enough measurements arrive. A batch of 0 costs 0 (the stage is skipped).

Worked example, 1.3B at 480x832 on one GPU class, seed dit_block = 2 ms + 1.5 ms/row, 30 blocks:
a forward over 6 rows costs 30 * (0.002 + 0.0015 * 6) = 0.33 s.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from scheduling.slo import median


class Stage(str, Enum):
    """The three timed stages of a pipeline tick, and a stream's start-up."""

    ENCODE = "encode"
    DIT_BLOCK = "dit_block"
    DECODE = "decode"
    STARTUP = "startup"
    """Not a stage of a tick: the extra work of a stream's first chunks (module docstring)."""


@dataclass(frozen=True)
class ShapeKey:
    """What a profile was measured for, besides the GPU class. Steps are folded into rows (module doc).

    Example: ShapeKey(model="wan-1.3b", height=480, width=832, vae="wan").
    """

    model: str
    """Model preset name ("tiny", "wan-1.3b", "wan-14b")."""
    height: int
    """Frame height in pixels, a positive multiple of 16."""
    width: int
    """Frame width in pixels, a positive multiple of 16."""
    vae: str = "wan"
    """VAE kind ("wan" or "taehv")."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a non-empty preset name, e.g. 'wan-1.3b'")
        for name, value in (("height", self.height), ("width", self.width)):
            if value < 16 or value % 16:
                raise ValueError(f"{name}={value} must be a positive multiple of 16")
        if not self.vae:
            raise ValueError("vae must be a non-empty VAE kind, e.g. 'wan' or 'taehv'")


@dataclass(frozen=True)
class AffineTime:
    """`t(b) = fixed_s + per_item_s * b` seconds for a batch of b >= 1 items; 0 for b == 0 (stage skipped).

    Example: AffineTime(0.002, 0.0015)(6) -> 0.011; AffineTime(0.002, 0.0015)(0) -> 0.0.
    """

    fixed_s: float
    """Cost paid once per call, whatever the batch (weights read, launch overhead), >= 0."""
    per_item_s: float
    """Cost per item (row or chunk), >= 0."""

    def __post_init__(self) -> None:
        for name, value in (("fixed_s", self.fixed_s), ("per_item_s", self.per_item_s)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name}={value} must be a finite number of seconds >= 0")

    def __call__(self, items: int) -> float:
        if items < 0:
            raise ValueError(f"items={items} must be >= 0")
        return 0.0 if items == 0 else self.fixed_s + self.per_item_s * items

    def scaled(self, factor: float) -> AffineTime:
        """Both coefficients times `factor` (> 0). Example: AffineTime(1, 2).scaled(0.5) -> AffineTime(0.5, 1)."""
        if not factor > 0.0:
            raise ValueError(f"factor={factor} must be > 0")
        return AffineTime(self.fixed_s * factor, self.per_item_s * factor)


def fit_affine(points: Iterable[tuple[int, float]], prior: AffineTime | None = None) -> AffineTime:
    """Robust affine fit of (batch size >= 1, seconds) measurements.

    1. Take the median time per distinct batch size (one outlier per size does not move it).
    2. With two or more sizes: the Theil-Sen slope (median of pairwise slopes between those medians),
       clamped at 0, and the intercept median(y - slope * x), clamped at 0.
    3. With one size x: the prior's shape scaled through the measured median (if a prior is given),
       else a line through the origin (conservative for larger batches).

    Example: points (1, 0.010), (1, 0.011), (1, 0.500), (2, 0.012), (4, 0.016) -> medians 0.011, 0.012,
    0.016; pairwise slopes 0.001, 0.00167, 0.002 -> slope 0.00167; intercepts 0.00933, 0.00867, 0.00933
    -> AffineTime(0.00933, 0.00167). The 0.5 s outlier does not matter.
    Raises ValueError when there are no points or a batch size is < 1 or a time is negative.
    """
    by_size: dict[int, list[float]] = {}
    for size, seconds in points:
        if size < 1:
            raise ValueError(f"batch size {size} must be >= 1")
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise ValueError(f"measured time {seconds} must be a finite number of seconds >= 0")
        by_size.setdefault(size, []).append(seconds)
    if not by_size:
        raise ValueError("fit_affine needs at least one measurement")
    xs = sorted(by_size)
    ys = [median(by_size[x]) for x in xs]
    if len(xs) == 1:
        x, y = xs[0], ys[0]
        if prior is not None and prior(x) > 0.0 and y > 0.0:
            return prior.scaled(y / prior(x))
        return AffineTime(0.0, y / x)
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    slope = max(0.0, median(slopes))
    intercept = max(0.0, median([y - slope * x for x, y in zip(xs, ys)]))
    return AffineTime(intercept, slope)


@dataclass(frozen=True)
class ProfileConfig:
    """How curves learn from measurements."""

    window: int = 64
    """Measurements kept per curve (rolling), >= 1. Older ones are forgotten, so drift is followed."""
    min_samples: int = 3
    """Measurements before the fitted curve replaces the seed, in [1, window]."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1")
        if not 1 <= self.min_samples <= self.window:
            raise ValueError(f"min_samples={self.min_samples} must be in [1, window={self.window}]")


class StageCurve:
    """One stage's time as a function of batch size: the seed until `min_samples` measurements, then the
    robust fit over the last `window` measurements (with the seed as the prior for single-size windows).

    Example: StageCurve(AffineTime(0.01, 0.001)).predict(4) -> 0.014; after observe(4, 0.028) three times
    (min_samples=3) only one size is known, so the seed is scaled by 0.028 / 0.014 = 2: predict(8) -> 0.036.
    """

    def __init__(self, seed: AffineTime | None = None, config: ProfileConfig | None = None) -> None:
        self._config = config or ProfileConfig()
        self._seed = seed
        self._samples: deque[tuple[int, float]] = deque(maxlen=self._config.window)
        self._model: AffineTime | None = seed

    def observe(self, items: int, seconds: float) -> None:
        """Record that the stage took `seconds` for a batch of `items` (>= 1) items."""
        if items < 1:
            raise ValueError(f"items={items} must be >= 1 to be a measurement")
        if not (math.isfinite(seconds) and seconds >= 0.0):
            raise ValueError(f"seconds={seconds} must be a finite time >= 0")
        self._samples.append((items, seconds))
        if len(self._samples) >= self._config.min_samples:
            self._model = fit_affine(self._samples, prior=self._seed)

    @property
    def model(self) -> AffineTime:
        """The current affine model. Raises ValueError when there is neither a seed nor enough measurements."""
        if self._model is None:
            raise ValueError("this curve has no seed and fewer than min_samples measurements")
        return self._model

    @property
    def num_samples(self) -> int:
        """Measurements currently in the window."""
        return len(self._samples)

    def predict(self, items: int) -> float:
        """Predicted seconds for a batch of `items` (0 -> 0.0)."""
        return self.model(items)


@dataclass(frozen=True)
class ProfileSnapshot:
    """A frozen copy of a profile's three models (for export and for tests)."""

    gpu_class: str
    shape: ShapeKey
    encode: AffineTime
    dit_block: AffineTime
    decode: AffineTime
    startup: AffineTime = AffineTime(0.0, 0.0)


class StageProfile:
    """The measured encode / DiT-block / decode curves of one GPU class for one shape.

    Example (seeded, 30 blocks): encode 20 ms + 10 ms/chunk, dit_block 2 ms + 1.5 ms/row, decode 30 ms +
    15 ms/chunk. A tick that admits 2 chunks, runs 6 rows and emits 2 chunks costs
    (0.02 + 0.02) + 30 * (0.002 + 0.009) + (0.03 + 0.03) = 0.43 s: `tick_s(rows=6, admitted=2, emitted=2,
    num_blocks=30)`.
    """

    def __init__(
        self,
        gpu_class: str,
        shape: ShapeKey,
        *,
        encode: AffineTime,
        dit_block: AffineTime,
        decode: AffineTime,
        startup: AffineTime = AffineTime(0.0, 0.0),
        config: ProfileConfig | None = None,
    ) -> None:
        if not gpu_class:
            raise ValueError("gpu_class must be a non-empty name, e.g. 'H100'")
        self.gpu_class = gpu_class
        self.shape = shape
        self._curves = {
            Stage.ENCODE: StageCurve(encode, config),
            Stage.DIT_BLOCK: StageCurve(dit_block, config),
            Stage.DECODE: StageCurve(decode, config),
            Stage.STARTUP: StageCurve(startup, config),
        }

    def curve(self, stage: Stage) -> StageCurve:
        """The curve of one stage."""
        return self._curves[stage]

    def encode_s(self, chunks: int) -> float:
        """Seconds to encode `chunks` chunks together (0 -> 0.0)."""
        return self._curves[Stage.ENCODE].predict(chunks)

    def dit_s(self, rows: int, num_blocks: int) -> float:
        """Seconds for `num_blocks` DiT blocks over `rows` rows: num_blocks * dit_block(rows)."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks={num_blocks} must be >= 0")
        return num_blocks * self._curves[Stage.DIT_BLOCK].predict(rows)

    def decode_s(self, chunks: int) -> float:
        """Seconds to decode `chunks` chunks together (0 -> 0.0)."""
        return self._curves[Stage.DECODE].predict(chunks)

    def startup_s(self) -> float:
        """Seconds of device work one stream's start costs beyond its steady chunks."""
        return self._curves[Stage.STARTUP].predict(1)

    def tick_s(self, rows: int, admitted: int, emitted: int, num_blocks: int) -> float:
        """Seconds for one pipeline tick on one device: encode the admitted chunks, run every block over
        the rows, decode the emitted chunks (see the class example)."""
        return self.encode_s(admitted) + self.dit_s(rows, num_blocks) + self.decode_s(emitted)

    def observe(self, stage: Stage, items: int, seconds: float) -> None:
        """Feed one measurement of a stage (for DIT_BLOCK: the time of ONE block; see observe_dit)."""
        self._curves[stage].observe(items, seconds)

    def observe_dit(self, rows: int, num_blocks: int, seconds: float) -> None:
        """Feed the measured time of a forward over `num_blocks` blocks: seconds / num_blocks per block.

        Example: observe_dit(rows=6, num_blocks=30, seconds=0.33) records dit_block(6) = 0.011 s.
        """
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.observe(Stage.DIT_BLOCK, rows, seconds / num_blocks)

    def snapshot(self) -> ProfileSnapshot:
        """The current models, frozen."""
        return ProfileSnapshot(
            gpu_class=self.gpu_class,
            shape=self.shape,
            encode=self._curves[Stage.ENCODE].model,
            dit_block=self._curves[Stage.DIT_BLOCK].model,
            decode=self._curves[Stage.DECODE].model,
            startup=self._curves[Stage.STARTUP].model,
        )


class ProfileBook:
    """All profiles of a fleet, keyed by (GPU class, shape). Profiles are shared, live objects: whoever
    measures feeds them, admission and batching read them.

    Example: book.put(profile); book.get("H100", ShapeKey("wan-1.3b", 480, 832)) is profile.
    """

    def __init__(self, profiles: Sequence[StageProfile] = ()) -> None:
        self._profiles: dict[tuple[str, ShapeKey], StageProfile] = {}
        for profile in profiles:
            self.put(profile)

    def put(self, profile: StageProfile) -> None:
        """Add or replace the profile of (profile.gpu_class, profile.shape)."""
        self._profiles[(profile.gpu_class, profile.shape)] = profile

    def get(self, gpu_class: str, shape: ShapeKey) -> StageProfile:
        """The profile of a GPU class and shape. Raises KeyError naming both when it was never measured."""
        try:
            return self._profiles[(gpu_class, shape)]
        except KeyError:
            raise KeyError(
                f"no profile for gpu_class={gpu_class!r} shape={shape}; run the profiler"
            ) from None

    def find(self, gpu_class: str, shape: ShapeKey) -> StageProfile | None:
        """Like get, but None when missing."""
        return self._profiles.get((gpu_class, shape))

    def gpu_classes(self, shape: ShapeKey) -> list[str]:
        """GPU classes that have a profile for this shape, sorted."""
        return sorted(g for g, s in self._profiles if s == shape)
