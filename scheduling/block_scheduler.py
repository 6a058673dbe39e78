"""Splitting the L DiT blocks over W pipeline stages (GPUs, possibly of different kinds). Pure logic.

A stage owns a contiguous range of blocks [start, end); stage 0 also encodes, stage W-1 also decodes.
Stage w's time per micro-step is

    stage_time(w) = extra_s[w] + Σ_{i in [start_w, end_w)} block_times_s[w][i]

and the ring runs at the pace of the slowest stage, so the best split minimises max_w stage_time(w).
`optimal_split` finds it exactly (dynamic programming over prefixes, O(W * L^2)); among the splits with
that bottleneck it returns the most even one (least Σ stage_time², a second exact pass).

Worked example (30 blocks; an H100 at 3 ms/block that also encodes in 20 ms, then a smaller GPU at
6 ms/block that also decodes in 30 ms): the reference halves give 20 + 15*3 = 65 ms and
30 + 15*6 = 120 ms (bottleneck 120 ms). The optimum gives the H100 21 blocks: 20 + 63 = 83 ms and
30 + 9*6 = 84 ms (bottleneck 84 ms, 30% faster).

`reference_split` is the published default (W = 2: halves; otherwise near-equal ranges with the
remainder to the first ranks: 30 blocks on 4 -> [0,8), [8,16), [16,23), [23,30)).

`BlockRebalancer` watches measured stage times and, past a drift threshold and no more often than a
minimum interval (the caller passes the time), returns a new split and the block moves (weights and live
KV caches) the runtime must execute.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from scheduling.slo import median


@dataclass(frozen=True)
class BlockPlan:
    """Contiguous block ranges, one per stage, covering [0, L) in order.

    Example: BlockPlan(((0, 8), (8, 16), (16, 23), (23, 30))).owner(20) -> 2; .counts -> (8, 8, 7, 7).
    """

    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError("a block plan needs at least one stage")
        expected = 0
        for start, end in self.ranges:
            if start != expected or end <= start:
                raise ValueError(f"ranges={self.ranges} must be non-empty, contiguous and start at 0")
            expected = end

    @property
    def num_blocks(self) -> int:
        return self.ranges[-1][1]

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    @property
    def counts(self) -> tuple[int, ...]:
        """Blocks per stage."""
        return tuple(end - start for start, end in self.ranges)

    def owner(self, block: int) -> int:
        """The stage that owns a block. Raises ValueError when out of range."""
        for stage, (start, end) in enumerate(self.ranges):
            if start <= block < end:
                return stage
        raise ValueError(f"block {block} is outside [0, {self.num_blocks})")


@dataclass(frozen=True)
class BlockMove:
    """Block `block` (its weights and every stream's KV cache for it) moves from stage `src` to `dst`."""

    block: int
    src: int
    dst: int


@dataclass(frozen=True)
class SplitResult:
    """A plan with its predicted stage times."""

    plan: BlockPlan
    stage_times_s: tuple[float, ...]

    @property
    def bottleneck_s(self) -> float:
        """The slowest stage: the ring's time per micro-step."""
        return max(self.stage_times_s)


def _check_inputs(block_times_s: Sequence[Sequence[float]], extra_s: Sequence[float]) -> tuple[int, int]:
    num_stages = len(block_times_s)
    if num_stages < 1:
        raise ValueError("block_times_s needs one row per stage (at least one)")
    if len(extra_s) != num_stages:
        raise ValueError(f"extra_s has {len(extra_s)} entries for {num_stages} stages")
    num_blocks = len(block_times_s[0])
    if any(len(row) != num_blocks for row in block_times_s):
        raise ValueError("every stage needs a time for every block (rows of equal length)")
    if num_blocks < num_stages:
        raise ValueError(f"{num_blocks} blocks cannot give each of {num_stages} stages at least one")
    for value in [*extra_s, *(t for row in block_times_s for t in row)]:
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"time {value} must be a finite number of seconds >= 0")
    return num_stages, num_blocks


def uniform_block_times(per_block_s: Sequence[float], num_blocks: int) -> list[list[float]]:
    """Per-stage rows of equal block times. Example: uniform_block_times([0.003, 0.006], 2) ->
    [[0.003, 0.003], [0.006, 0.006]]."""
    return [[t] * num_blocks for t in per_block_s]


def stage_times(
    plan: BlockPlan, block_times_s: Sequence[Sequence[float]], extra_s: Sequence[float]
) -> tuple[float, ...]:
    """Each stage's time under `plan`. Example (module docstring): halves -> (0.065, 0.120)."""
    _check_inputs(block_times_s, extra_s)
    if plan.num_stages != len(block_times_s) or plan.num_blocks != len(block_times_s[0]):
        raise ValueError(
            f"plan {plan.ranges} does not match {len(block_times_s)} stages x {len(block_times_s[0])} blocks"
        )
    return tuple(extra_s[w] + sum(block_times_s[w][start:end]) for w, (start, end) in enumerate(plan.ranges))


def optimal_split(block_times_s: Sequence[Sequence[float]], extra_s: Sequence[float]) -> SplitResult:
    """The split minimising the slowest stage, exactly; ties broken toward the most even split.

    `block_times_s[w][i]` is block i's time on stage w's GPU, `extra_s[w]` the stage's other work per
    micro-step (encode on stage 0, decode on the last, transfers). Every stage gets >= 1 block.
    Example: see the module docstring (H100 + smaller GPU -> ((0, 21), (21, 30)), bottleneck 0.084 s).
    """
    num_stages, num_blocks = _check_inputs(block_times_s, extra_s)
    prefix = [[0.0] * (num_blocks + 1) for _ in range(num_stages)]
    for w in range(num_stages):
        for i in range(num_blocks):
            prefix[w][i + 1] = prefix[w][i] + block_times_s[w][i]

    def cost(w: int, start: int, end: int) -> float:
        return extra_s[w] + prefix[w][end] - prefix[w][start]

    # Pass 1: the optimal bottleneck. best[w][e] = min over splits of blocks [0, e) into stages 0..w.
    inf = math.inf
    best = [[inf] * (num_blocks + 1) for _ in range(num_stages)]
    for e in range(1, num_blocks + 1):
        best[0][e] = cost(0, 0, e)
    for w in range(1, num_stages):
        for e in range(w + 1, num_blocks + 1):
            best[w][e] = min(max(best[w - 1][s], cost(w, s, e)) for s in range(w, e))
    bottleneck = best[num_stages - 1][num_blocks]
    cap = bottleneck * (1.0 + 1e-12) + 1e-15

    # Pass 2: among splits with every stage <= bottleneck, the least sum of squared stage times.
    sq = [[inf] * (num_blocks + 1) for _ in range(num_stages)]
    arg = [[-1] * (num_blocks + 1) for _ in range(num_stages)]
    for e in range(1, num_blocks + 1):
        if cost(0, 0, e) <= cap:
            sq[0][e] = cost(0, 0, e) ** 2
    for w in range(1, num_stages):
        for e in range(w + 1, num_blocks + 1):
            for s in range(w, e):
                c = cost(w, s, e)
                if c <= cap and sq[w - 1][s] + c * c < sq[w][e]:
                    sq[w][e], arg[w][e] = sq[w - 1][s] + c * c, s
    ranges: list[tuple[int, int]] = []
    end = num_blocks
    for w in range(num_stages - 1, 0, -1):
        start = arg[w][end]
        assert start >= 0, "pass 2 must find a split within the optimal bottleneck"
        ranges.append((start, end))
        end = start
    ranges.append((0, end))
    plan = BlockPlan(tuple(reversed(ranges)))
    return SplitResult(plan, stage_times(plan, block_times_s, extra_s))


def reference_split(num_blocks: int, num_stages: int) -> BlockPlan:
    """The published default split: W = 2 -> [0, L//2), [L//2, L); otherwise near-equal contiguous ranges
    with the remainder going to the first ranks.

    Examples: (30, 2) -> ((0, 15), (15, 30)); (30, 4) -> ((0, 8), (8, 16), (16, 23), (23, 30));
    (40, 3) -> ((0, 14), (14, 27), (27, 40)).
    """
    if num_stages < 1 or num_blocks < num_stages:
        raise ValueError(f"cannot split {num_blocks} blocks over {num_stages} stages (need 1 <= W <= L)")
    if num_stages == 2:
        half = num_blocks // 2
        return BlockPlan(((0, half), (half, num_blocks)))
    base, extra = divmod(num_blocks, num_stages)
    ranges = []
    start = 0
    for rank in range(num_stages):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return BlockPlan(tuple(ranges))


def block_moves(old: BlockPlan, new: BlockPlan) -> tuple[BlockMove, ...]:
    """Blocks whose owner changes, in block order.

    Example: ((0, 15), (15, 30)) -> ((0, 21), (21, 30)) moves blocks 15..20 from stage 1 to stage 0.
    """
    if old.num_blocks != new.num_blocks or old.num_stages != new.num_stages:
        raise ValueError(f"plans differ in shape: {old.ranges} vs {new.ranges}")
    moves = []
    for block in range(old.num_blocks):
        src, dst = old.owner(block), new.owner(block)
        if src != dst:
            moves.append(BlockMove(block, src, dst))
    return tuple(moves)


@dataclass(frozen=True)
class StageTiming:
    """One measured micro-step of one stage: the time of its DiT blocks and of its other work."""

    stage: int
    dit_s: float
    """Time of the stage's blocks over the whole micro-step."""
    extra_s: float = 0.0
    """Encode / decode / transfer time in the same micro-step."""


@dataclass(frozen=True)
class RebalanceConfig:
    """When a live ring is re-split."""

    threshold: float = 0.1
    """Re-split only if the measured bottleneck exceeds the best split's by more than this fraction,
    in (0, 1). The new split must win by that margin, so noise around a balanced split does nothing."""
    min_interval_s: float = 30.0
    """Least time between two re-splits (and from the start), >= 0: moving KV caches is not free."""
    min_samples: int = 5
    """Measurements per stage before judging, >= 1."""
    window: int = 32
    """Measurements kept per stage (rolling medians), >= min_samples."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1)")
        if self.min_interval_s < 0.0:
            raise ValueError(f"min_interval_s={self.min_interval_s} must be >= 0")
        if self.min_samples < 1:
            raise ValueError(f"min_samples={self.min_samples} must be >= 1")
        if self.window < self.min_samples:
            raise ValueError(f"window={self.window} must be >= min_samples={self.min_samples}")


@dataclass(frozen=True)
class Rebalance:
    """A re-split to execute: the new plan, the moves, and why."""

    plan: BlockPlan
    moves: tuple[BlockMove, ...]
    measured_bottleneck_s: float
    """The current split's slowest stage, from the medians."""
    predicted_bottleneck_s: float
    """The new split's slowest stage, predicted from the same medians."""


class BlockRebalancer:
    """Online re-splitting of a live ring from measured stage times.

    Each stage's per-block time is estimated as median(dit_s) / blocks it owns (blocks on one GPU cost
    the same), its extra work as median(extra_s). `propose(now)` returns a Rebalance (and adopts it)
    when at least `min_interval_s` passed since the start or the last re-split, every stage has
    `min_samples` measurements, and the best split beats the measured bottleneck by more than
    `threshold`; otherwise None.

    Example: ring (0, 15), (15, 30); stage 0 measures 45 ms of blocks + 20 ms encode, stage 1 90 ms +
    30 ms decode -> per-block 3 ms and 6 ms, bottleneck 120 ms; the best split (0, 21), (21, 30) predicts
    84 ms (30% better > 10%): propose returns it with moves of blocks 15..20 from stage 1 to stage 0.
    """

    def __init__(self, plan: BlockPlan, now: float, config: RebalanceConfig | None = None) -> None:
        self.config = config or RebalanceConfig()
        self._plan = plan
        self._last_s = now
        self._dit: list[deque[float]] = [deque(maxlen=self.config.window) for _ in plan.ranges]
        self._extra: list[deque[float]] = [deque(maxlen=self.config.window) for _ in plan.ranges]

    @property
    def plan(self) -> BlockPlan:
        """The split in force."""
        return self._plan

    def observe(self, timing: StageTiming) -> None:
        """Record one stage's micro-step (times under the current plan). Raises ValueError on a bad stage."""
        if not 0 <= timing.stage < self._plan.num_stages:
            raise ValueError(f"stage {timing.stage} is outside [0, {self._plan.num_stages})")
        if timing.dit_s < 0.0 or timing.extra_s < 0.0:
            raise ValueError(f"times must be >= 0, got dit_s={timing.dit_s} extra_s={timing.extra_s}")
        self._dit[timing.stage].append(timing.dit_s / self._plan.counts[timing.stage])
        self._extra[timing.stage].append(timing.extra_s)

    def measured(self) -> tuple[list[float], list[float]] | None:
        """(per-block time, extra time) per stage from the medians, or None before min_samples each."""
        if any(len(d) < self.config.min_samples for d in self._dit):
            return None
        return [median(list(d)) for d in self._dit], [median(list(e)) for e in self._extra]

    def propose(self, now: float) -> Rebalance | None:
        """A re-split if it is due and worth it (class docstring), else None. Adopts what it returns."""
        if now - self._last_s < self.config.min_interval_s:
            return None
        measured = self.measured()
        if measured is None:
            return None
        per_block, extra = measured
        times = uniform_block_times(per_block, self._plan.num_blocks)
        current = max(stage_times(self._plan, times, extra))
        best = optimal_split(times, extra)
        if current <= best.bottleneck_s * (1.0 + self.config.threshold):
            return None
        moves = block_moves(self._plan, best.plan)
        self._plan = best.plan
        self._last_s = now
        # per-block medians stay valid (a block costs the same on the same GPU); extras too
        return Rebalance(best.plan, moves, current, best.bottleneck_s)
