"""Service level objectives of a stream, deadline arithmetic, and latency statistics. Pure Python.

Times are seconds on the server clock (a float the caller supplies; nothing here reads a clock).

A stream has two objectives (the wire contract's `SLO` message):

    TTFF      from the stream opening to its first output frame leaving
    deadline  from each input frame arriving to its restyled frame leaving

Frames travel in chunks (4 frames after the first chunk) and a chunk's frames leave together, so a
chunk is on time only if its *earliest* frame is:

    frame_deadline(arrived_s=10.00, deadline_s=0.5)            -> 10.50
    chunk_deadline((10.00, 10.0625, 10.125, 10.1875), 0.5)     -> 10.50   (the first frame binds)

Statistics follow the reference demo's metrics: latency percentiles, deadline-miss rate, and jitter as
|Δ| of consecutive latencies.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_TTFF_S = 60.0
"""Upper bound on any TTFF objective (a minute: beyond that the stream is not live)."""
MAX_FRAME_DEADLINE_S = 10.0
"""Upper bound on any per-frame deadline."""


@dataclass(frozen=True)
class StreamSLO:
    """The objectives one stream was admitted with.

    Example: StreamSLO(ttff_s=1.0, frame_deadline_s=0.5) - first frame within 1 s of opening, every
    later frame within 0.5 s of its arrival.
    """

    ttff_s: float = 1.0
    """Time to first frame, seconds, in (0, 60]. The typical live-stream target is about 1 s."""
    frame_deadline_s: float = 1.0
    """Per-frame deadline, seconds, in (0, 10]. The reference demo's default target latency is 1.0 s."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ttff_s <= MAX_TTFF_S:
            raise ValueError(f"ttff_s={self.ttff_s} must be in (0, {MAX_TTFF_S}] seconds")
        if not 0.0 < self.frame_deadline_s <= MAX_FRAME_DEADLINE_S:
            raise ValueError(
                f"frame_deadline_s={self.frame_deadline_s} must be in (0, {MAX_FRAME_DEADLINE_S}] seconds"
            )


def frame_deadline(arrived_s: float, deadline_s: float) -> float:
    """The time by which a frame that arrived at `arrived_s` must leave: `arrived_s + deadline_s`.

    Example: frame_deadline(10.0, 0.5) -> 10.5.
    """
    return arrived_s + deadline_s


def chunk_deadline(arrivals_s: Sequence[float], deadline_s: float) -> float:
    """The deadline of a chunk whose frames leave together: the earliest of its frames' deadlines.

    Example: chunk_deadline((10.0, 10.0625, 10.125, 10.1875), 0.5) -> 10.5. Raises ValueError when empty.
    """
    if not arrivals_s:
        raise ValueError("a chunk needs at least one frame arrival time")
    return min(arrivals_s) + deadline_s


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) with linear interpolation between order statistics; 0.0 if empty.

    Example: percentile([1, 2, 3, 4], 50) -> 2.5; percentile([1, 2, 3, 4], 90) -> 3.7 (rank 0.9 * 3 = 2.7,
    so 3 + 0.7 * (4 - 3)).
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q={q} must be in [0, 100]")
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def median(values: Sequence[float]) -> float:
    """The median (50th percentile); 0.0 if empty. Example: median([3, 1, 2]) -> 2."""
    return percentile(values, 50.0)


def jitter(latencies_s: Sequence[float]) -> list[float]:
    """|Δ| of consecutive latencies. Example: jitter([0.30, 0.35, 0.32]) -> [0.05, 0.03] (up to rounding)."""
    return [abs(b - a) for a, b in zip(latencies_s, latencies_s[1:])]


def miss_rate(latencies_s: Sequence[float], deadline_s: float) -> float:
    """Fraction of latencies strictly above the deadline; 0.0 if empty.

    Example: miss_rate([0.2, 0.6, 0.4, 0.7], 0.5) -> 0.5.
    """
    if not latencies_s:
        return 0.0
    return sum(1 for x in latencies_s if x > deadline_s) / len(latencies_s)


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of a latency sample and of its jitter (|Δ| of consecutive latencies), in seconds."""

    count: int = 0
    mean_s: float = 0.0
    p50_s: float = 0.0
    p90_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0
    miss_rate: float = 0.0
    """Fraction of the sample above the deadline it was summarised against."""
    jitter_mean_s: float = 0.0
    jitter_p50_s: float = 0.0
    jitter_p99_s: float = 0.0


def summarize(latencies_s: Sequence[float], deadline_s: float) -> LatencySummary:
    """Summarise latencies against a deadline.

    Example: summarize([0.2, 0.6, 0.4, 0.7], 0.5) has count 4, mean 0.475, p50 0.5, miss_rate 0.5 and
    jitter sample [0.4, 0.2, 0.3] (mean 0.3).
    """
    if not latencies_s:
        return LatencySummary()
    jit = jitter(latencies_s)
    return LatencySummary(
        count=len(latencies_s),
        mean_s=sum(latencies_s) / len(latencies_s),
        p50_s=percentile(latencies_s, 50.0),
        p90_s=percentile(latencies_s, 90.0),
        p99_s=percentile(latencies_s, 99.0),
        max_s=max(latencies_s),
        miss_rate=miss_rate(latencies_s, deadline_s),
        jitter_mean_s=sum(jit) / len(jit) if jit else 0.0,
        jitter_p50_s=percentile(jit, 50.0),
        jitter_p99_s=percentile(jit, 99.0),
    )


class LatencyWindow:
    """The last `capacity` latencies of one stream, for rolling percentiles. Bounded memory.

    Example: w = LatencyWindow(3); for x in (0.1, 0.2, 0.3, 0.4): w.record(x) -> w.values() == [0.2, 0.3, 0.4].
    """

    def __init__(self, capacity: int = 512) -> None:
        if capacity < 2:
            raise ValueError(f"capacity={capacity} must be >= 2 (jitter needs two latencies)")
        self._values: deque[float] = deque(maxlen=capacity)

    def record(self, latency_s: float) -> None:
        """Append one latency (seconds, >= 0 expected; negative values mean clock skew and are kept)."""
        self._values.append(latency_s)

    def extend(self, latencies_s: Iterable[float]) -> None:
        """Append several latencies in order."""
        self._values.extend(latencies_s)

    def values(self) -> list[float]:
        """The window's latencies, oldest first."""
        return list(self._values)

    def summary(self, deadline_s: float) -> LatencySummary:
        """`summarize` over the window."""
        return summarize(self.values(), deadline_s)

    def __len__(self) -> int:
        return len(self._values)
