"""SLO-aware batching across the streams of one pipeline replica. Pure logic: the caller passes the time.

The state machine (the narrow interface every scheduler in Weir has):

    add_stream(stream_id, spec, now)        a stream opened (its TTFF clock starts at `now`)
    add_chunk(stream_id, chunk)             a chunk of frames arrived (bounded queue: the oldest is dropped)
    schedule(now) -> BatchPlan              what the next DiT forward runs
    update_from_output(plan, output)        measured durations and completion times of that forward
    end_input(stream_id)                    no more chunks will come: flush what is in flight
    finish_stream(stream_id) -> StreamStats forget the stream
    stats() -> SchedulerStats

Rows, steps and slots. A chunk (4 frames, one latent frame) needs n denoising steps. A *row* is one
chunk at one step in one forward. A stream's chunks in flight are always at distinct steps, so the
runtime maps step k to the stream-batch slot k (slot k owns its KV cache, as in the reference).

Two modes per stream (spec §C, §E), chosen from the load and the deadline:

    STREAM_BATCH  up to n chunks in flight; each forward the stream joins, it admits its next chunk at
                  step 0 and advances every chunk in flight by one step (n rows). One forward per chunk,
                  but a frame leaves n-1 chunks after it arrives: latency ~ (n-1) * chunk period.
    STEP_BY_STEP  one chunk in flight, advanced one step per forward: its n steps run in n consecutive
                  forwards. Latency ~ n forwards, but n forwards per chunk (more fixed cost).

A stream runs step by step when stream batching cannot meet its deadline (tight deadline) or when the
replica is lightly loaded; otherwise it stream-batches. Its first chunk always runs step by step (the
prefill, which the TTFF objective bounds).

Forming a batch: every stream with work offers a candidate (its rows, the chunk it admits, the chunks it
finishes, the deadlines at stake). Candidates are ordered earliest deadline first; the head always runs;
each next candidate joins while the predicted forward time (profile, times a safety factor) still lets
every member's chunks finish by their deadlines and the row budget holds.

Skipping: a queued chunk that can no longer make its deadline is skipped, never queued: when even alone,
now, it would finish late (DEADLINE_PASSED), when the chunks queued ahead of it in its stream make it late
(PREDICTED_LATE), when it heads the batch yet cannot fit its deadline (PREDICTED_LATE), or when its
stream's queue overflows (QUEUE_OVERFLOW, oldest first). A chunk already in flight is never skipped (its
KV entries are written); if it finishes late, its frames count as deadline misses.

Driving it (the pipeline deployment, one forward in flight at a time):

    on open          add_stream(id, spec, now)
    on a chunk       add_chunk(id, Chunk(seq, arrivals)); a returned SkippedChunk is reported to the client
    loop             plan = schedule(now); report plan.skipped;
                     if plan.is_empty: sleep until the next chunk arrives or next_wakeup_s(now), then loop;
                     else encode the admitted chunks, run the DiT over plan rows (row.step is the slot and
                     picks the timestep; prefill work takes the prefill path), decode the emitted chunks,
                     send their frames, then update_from_output(plan, BatchOutput(measured times)).
    on End           end_input(id); once has_work(id) is False, finish_stream(id)

Load model (also used by admission): with per-tick fixed cost A, per-row cost B and per-chunk cost C
(from the profile), streams of chunk rate λ = fps / 4 and n steps load the replica's rows with
ρ = Σ λ (n B + C), and a busy replica's forward carries the rows that arrived during the previous one:
tick = (A + n_max B + C) / (1 - ρ). See `estimate_load`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from scheduling.profile import Stage, StageProfile
from scheduling.slo import LatencySummary, LatencyWindow, StreamSLO, chunk_deadline
from stages.errors import StreamExistsError, StreamNotFoundError

CHUNK_FRAMES = 4
"""Input frames per chunk after the first (one latent frame: the Wan VAE compresses time by 4)."""


class BatchMode(str, Enum):
    """How a stream's denoising steps are laid over forwards (module docstring)."""

    STREAM_BATCH = "stream_batch"
    STEP_BY_STEP = "step_by_step"


class SkipReason(str, Enum):
    """Why a queued chunk was dropped without being processed."""

    DEADLINE_PASSED = "deadline_passed"
    """Even alone, starting now, it would finish after its deadline."""
    PREDICTED_LATE = "predicted_late"
    """Behind its stream's queue, or at the head of a batch, it is predicted to finish late."""
    QUEUE_OVERFLOW = "queue_overflow"
    """Its stream's bounded queue was full when a newer chunk arrived (the oldest is dropped)."""
    STREAM_FINISHED = "stream_finished"
    """Still queued when its stream finished."""


@dataclass(frozen=True)
class StreamSpec:
    """What the scheduler needs to know about a stream.

    Example: StreamSpec(num_steps=2, input_fps=16.0, slo=StreamSLO(1.0, 0.5)) has a chunk period of
    4 / 16 = 0.25 s and a chunk rate of 4 chunks/s.
    """

    num_steps: int = 2
    """Denoising steps n, in 1..4."""
    input_fps: float = 16.0
    """Frames per second the client sends, in (0, 120]."""
    slo: StreamSLO = field(default_factory=StreamSLO)
    """TTFF and per-frame deadline."""
    first_chunk_frames: int = 1
    """Frames in the first chunk: 1 (Weir) or 5 (the reference's 1 + 4)."""
    dit_scale: float = 1.0
    """A DiT row's work against the profile's nominal shape (scheduling.priors `work_scales`)."""
    vae_scale: float = 1.0
    """An encoded or decoded chunk's work against the profile's (its pixel ratio, times its VAE kind's
    cost against the profile's kind: scheduling.priors `vae_kind_ratio`)."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_steps <= 4:
            raise ValueError(f"num_steps={self.num_steps} must be in 1..4")
        if not 0.0 < self.input_fps <= 120.0:
            raise ValueError(f"input_fps={self.input_fps} must be in (0, 120]")
        if self.first_chunk_frames not in (1, 5):
            raise ValueError(f"first_chunk_frames={self.first_chunk_frames} must be 1 or 5")
        if not (self.dit_scale > 0.0 and self.vae_scale > 0.0):
            raise ValueError(f"dit_scale={self.dit_scale} and vae_scale={self.vae_scale} must be > 0")

    @property
    def chunk_period_s(self) -> float:
        """Seconds between chunk arrivals: 4 / fps (16 fps -> 0.25 s)."""
        return CHUNK_FRAMES / self.input_fps

    @property
    def chunk_rate(self) -> float:
        """Chunks per second: fps / 4 (16 fps -> 4.0)."""
        return self.input_fps / CHUNK_FRAMES

    @property
    def buffering_s(self) -> float:
        """How long a chunk's first frame waits for the chunk to fill: 3 / fps (16 fps -> 0.1875 s)."""
        return (CHUNK_FRAMES - 1) / self.input_fps


@dataclass(frozen=True)
class Chunk:
    """Frames of one stream that are encoded and denoised together.

    Example: Chunk(seq=3, arrivals_s=(10.0, 10.0625, 10.125, 10.1875)) is ready at 10.1875; with a 0.5 s
    deadline it must leave by 10.5 (its first frame binds).
    """

    seq: int
    """Strictly increasing within a stream."""
    arrivals_s: tuple[float, ...]
    """Server arrival time of each frame, in order."""

    def __post_init__(self) -> None:
        if not self.arrivals_s:
            raise ValueError(f"chunk seq={self.seq} has no frames")
        if list(self.arrivals_s) != sorted(self.arrivals_s):
            raise ValueError(f"chunk seq={self.seq}: arrivals_s={self.arrivals_s} must be non-decreasing")

    @property
    def num_frames(self) -> int:
        return len(self.arrivals_s)

    @property
    def ready_s(self) -> float:
        """When the last frame arrived."""
        return self.arrivals_s[-1]

    @property
    def latent_frames(self) -> int:
        """Latent frames after the VAE (time /4, first frame alone): 1 -> 1, 4 -> 1, 5 -> 2."""
        return 1 + (self.num_frames - 1) // CHUNK_FRAMES if self.num_frames > 1 else 1


@dataclass(frozen=True)
class Row:
    """One chunk at one denoising step in a forward; `step` is also the stream-batch slot."""

    stream_id: str
    chunk_seq: int
    step: int
    latent_frames: int = 1


@dataclass(frozen=True)
class StreamWork:
    """One stream's share of a forward: encode `admitted` (if any), run `rows`, decode `emitted`."""

    stream_id: str
    mode: BatchMode
    rows: tuple[Row, ...]
    admitted: Chunk | None
    """A queued chunk entering the pipeline this forward (encode it, then its row is at step 0)."""
    emitted: tuple[int, ...]
    """Seqs of the chunks whose last step is in this forward (decode and send them after)."""
    prefill: bool
    """The rows belong to the stream's first chunk: run the prefill path (fills the caches)."""
    deadline_s: float
    """The earliest deadline among this work's chunks (the EDF key)."""


@dataclass(frozen=True)
class SkippedChunk:
    """A chunk dropped unprocessed: the runtime frees its frames and counts them for the client."""

    stream_id: str
    chunk_seq: int
    num_frames: int
    reason: SkipReason


@dataclass(frozen=True)
class BatchPlan:
    """The next forward. Empty (`work == ()`) when there is nothing to run; it may still carry skips."""

    plan_id: int
    created_s: float
    work: tuple[StreamWork, ...]
    """Members in earliest-deadline-first order."""
    skipped: tuple[SkippedChunk, ...]
    """Chunks dropped since the previous plan."""
    predicted_s: float
    """Predicted forward time (encode + DiT + decode), before the safety factor."""

    @property
    def num_rows(self) -> int:
        """Latent rows in the DiT batch."""
        return sum(r.latent_frames for w in self.work for r in w.rows)

    @property
    def num_admitted(self) -> int:
        return sum(1 for w in self.work if w.admitted is not None)

    @property
    def num_emitted(self) -> int:
        return sum(len(w.emitted) for w in self.work)

    @property
    def is_empty(self) -> bool:
        return not self.work


@dataclass(frozen=True)
class BatchOutput:
    """What the runtime measured while executing a plan. Durations of 0 mean "not measured".

    Example: BatchOutput(plan_id=7, started_s=3.00, finished_s=3.12, encode_s=0.02, dit_s=0.08,
    decode_s=0.02) - every emitted chunk left at 3.12 unless `emitted_s` says otherwise.
    """

    plan_id: int
    started_s: float
    finished_s: float
    encode_s: float = 0.0
    dit_s: float = 0.0
    """The whole DiT forward over the replica's blocks."""
    decode_s: float = 0.0
    emitted_s: Mapping[tuple[str, int], float] = field(default_factory=dict)
    """(stream_id, chunk_seq) -> when its frames left, if it differs from finished_s."""

    def __post_init__(self) -> None:
        if self.finished_s < self.started_s:
            raise ValueError(f"finished_s={self.finished_s} is before started_s={self.started_s}")


@dataclass(frozen=True)
class CompletedChunk:
    """A chunk whose frames left, with the latency of its first (oldest) frame."""

    stream_id: str
    chunk_seq: int
    left_s: float
    latency_s: float
    """left_s minus the first frame's arrival."""
    frames_late: int
    """Frames that left after their deadline (for the first chunk: after the TTFF deadline)."""


@dataclass(frozen=True)
class BatchingConfig:
    """Tunables of one replica's batching scheduler."""

    num_blocks: int
    """DiT blocks a forward runs on this replica (L, e.g. 30 for 1.3B), >= 1."""
    max_rows: int = 32
    """Largest DiT batch in latent rows that the replica's memory allows, >= 1."""
    max_queued_chunks: int = 4
    """Bound of each stream's queue; a newer chunk pushes the oldest out. >= 1."""
    safety_factor: float = 1.15
    """Predicted times are multiplied by this before comparing with deadlines, in [1, 3]."""
    light_load: float = 0.5
    """Predicted utilization below which a stream may switch to step-by-step for latency, in (0, 1)."""
    heavy_load: float = 0.8
    """Predicted utilization above which a step-by-step stream returns to stream batching, in (light_load, 1]."""
    utilization_window_s: float = 2.0
    """Window over which measured busy time is reported as utilization, > 0."""
    latency_window: int = 512
    """Per-stream latencies kept for percentiles, >= 2."""
    tick_ema: float = 0.3
    """Weight of the newest measured forward in the running tick estimate, in (0, 1]."""

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")
        if self.max_rows < 1:
            raise ValueError(f"max_rows={self.max_rows} must be >= 1")
        if self.max_queued_chunks < 1:
            raise ValueError(f"max_queued_chunks={self.max_queued_chunks} must be >= 1")
        if not 1.0 <= self.safety_factor <= 3.0:
            raise ValueError(f"safety_factor={self.safety_factor} must be in [1, 3]")
        if not 0.0 < self.light_load < 1.0:
            raise ValueError(f"light_load={self.light_load} must be in (0, 1)")
        if not self.light_load < self.heavy_load <= 1.0:
            raise ValueError(f"heavy_load={self.heavy_load} must be in (light_load={self.light_load}, 1]")
        if self.utilization_window_s <= 0.0:
            raise ValueError(f"utilization_window_s={self.utilization_window_s} must be > 0")
        if self.latency_window < 2:
            raise ValueError(f"latency_window={self.latency_window} must be >= 2")
        if not 0.0 < self.tick_ema <= 1.0:
            raise ValueError(f"tick_ema={self.tick_ema} must be in (0, 1]")


# ---------------------------------------------------------------------------------------------------
# Load model (shared with admission)


@dataclass(frozen=True)
class StreamLoad:
    """A stream as the load model sees it: its spec and the mode it runs in."""

    spec: StreamSpec
    mode: BatchMode


@dataclass(frozen=True)
class LoadEstimate:
    """Steady-state load of a replica (see `estimate_load`)."""

    row_load: float
    """ρ: fraction of GPU time the streams' rows and chunks need, fixed costs aside. Must stay < 1."""
    utilization: float
    """Busy fraction if no two streams ever shared a forward (an upper bound), capped at 1."""
    tick_s: float
    """Bound on one forward's duration under this load (inf when ρ >= 1)."""
    keeps_up: bool
    """ρ < 1 and every step-by-step stream gets its n forwards per chunk period (n * tick <= period)."""


def tick_coefficients(profile: StageProfile, num_blocks: int) -> tuple[float, float, float]:
    """(A, B, C): per-forward fixed cost, per-row cost, per-chunk cost, from the profile's models.

    A = encode.fixed + decode.fixed + L * block.fixed, B = L * block.per_row, C = encode.per + decode.per.
    Example: encode 20 ms + 10 ms, block 2 ms + 1.5 ms, decode 30 ms + 15 ms, L = 30 ->
    A = 0.02 + 0.03 + 0.06 = 0.11, B = 0.045, C = 0.025.
    """
    enc = profile.curve(Stage.ENCODE).model
    blk = profile.curve(Stage.DIT_BLOCK).model
    dec = profile.curve(Stage.DECODE).model
    fixed = enc.fixed_s + dec.fixed_s + num_blocks * blk.fixed_s
    return fixed, num_blocks * blk.per_item_s, enc.per_item_s + dec.per_item_s


def estimate_load(profile: StageProfile, num_blocks: int, streams: Sequence[StreamLoad]) -> LoadEstimate:
    """Steady-state load of a replica running `streams`.

    ρ = Σ λ (n B + C); utilization = min(1, ρ + A * forwards/s) with forwards/s = Σ λ over stream-batch
    streams + Σ n λ over step-by-step ones (no sharing assumed); tick = (A + r_max B + C) / (1 - ρ) where
    r_max is the most rows one stream adds to a forward (n in stream batch, 1 step by step). A stream's
    B and C are scaled by its `dit_scale` and `vae_scale` (its shape against the profile's).
    Correction: tick = max(A + r_max B + C, A / (1 - ρ)) — every forward serves all chunks that arrived
    during the previous one (T = A + ρ T), and holds at least one stream's rows; dividing the whole
    one-stream cost by (1 - ρ) double-counts the work and refused a lone stream an idle GPU could serve.

    Example (A=0.11, B=0.045, C=0.025 as in `tick_coefficients`; two 16 fps streams, n=2, stream batch):
    λ = 4, ρ = 2 * 4 * (0.09 + 0.025) = 0.92, tick = max(0.11 + 0.09 + 0.025, 0.11 / 0.08) = 1.375 s: far too slow
    for a 0.25 s chunk period, which admission catches through the latencies.
    """
    fixed, per_row, per_chunk = tick_coefficients(profile, num_blocks)

    def chunk_work(s: StreamLoad, rows: int) -> float:  # B and C scaled to the stream's shape
        return rows * per_row * s.spec.dit_scale + per_chunk * s.spec.vae_scale

    row_load = sum(s.spec.chunk_rate * chunk_work(s, s.spec.num_steps) for s in streams)
    forwards = sum(
        s.spec.chunk_rate * (s.spec.num_steps if s.mode is BatchMode.STEP_BY_STEP else 1) for s in streams
    )
    largest = max((chunk_work(s, s.spec.num_steps if s.mode is BatchMode.STREAM_BATCH else 1) for s in streams),
                  default=per_row + per_chunk)
    if row_load >= 1.0:
        return LoadEstimate(row_load, 1.0, math.inf, False)
    # each forward serves every chunk that arrived during the previous one: T = A + rho * T, and a
    # forward holds at least one stream's rows and chunk (periodic arrivals, not Poisson)
    tick = max(fixed + largest, fixed / (1.0 - row_load))
    keeps_up = all(
        s.spec.num_steps * tick <= s.spec.chunk_period_s for s in streams if s.mode is BatchMode.STEP_BY_STEP
    )
    return LoadEstimate(row_load, min(1.0, row_load + fixed * forwards), tick, keeps_up)


def predicted_latency_s(spec: StreamSpec, mode: BatchMode, tick_s: float) -> float:
    """Steady-state latency of a chunk's first frame, from its arrival to its output leaving.

    Both modes wait for the chunk to fill (3 / fps) and for the forward in progress (one tick). Stream
    batch then waits n - 1 chunk periods for the chunks behind it and runs one tick; step by step runs n
    ticks. Example (16 fps, n = 2, tick 0.05 s): stream batch 0.1875 + 0.25 + 2 * 0.05 = 0.5375 s;
    step by step 0.1875 + 3 * 0.05 = 0.3375 s.
    """
    n = spec.num_steps
    if mode is BatchMode.STREAM_BATCH:
        return spec.buffering_s + (n - 1) * spec.chunk_period_s + 2.0 * tick_s
    return spec.buffering_s + (n + 1) * tick_s


def predicted_ttff_s(spec: StreamSpec, tick_s: float) -> float:
    """Time to first frame: the first chunk fills ((frames - 1) / fps), waits one tick, then runs its n
    prefill steps. Example (1-frame first chunk, n = 2, tick 0.05 s): 0 + 3 * 0.05 = 0.15 s."""
    return (spec.first_chunk_frames - 1) / spec.input_fps + (spec.num_steps + 1) * tick_s


def alone_floor_s(spec: StreamSpec, profile: StageProfile, num_blocks: int) -> tuple[float, float]:
    """(TTFF floor, per-frame latency floor) of a stream alone on an idle replica: no waiting at all.

    TTFF floor = first-chunk fill + encode(1) + n * L * block(1) + decode(1). Latency floor = buffering +
    the same processing, in step-by-step mode if n such forwards fit in a chunk period, else the stream
    batch floor buffering + (n - 1) * period + one forward of n rows.
    Example (16 fps, n = 2, encode 10 ms, 30 blocks of 1 ms for one row, decode 15 ms): processing =
    0.01 + 2 * 0.03 + 0.015 = 0.085 s = the TTFF floor; 2 forwards of <= 0.055 s fit in 0.25 s, so the
    latency floor is 0.1875 + 0.085 = 0.2725 s.
    """
    n = spec.num_steps
    d, v = spec.dit_scale, spec.vae_scale
    one_row = profile.dit_s(d, num_blocks)
    processing = profile.encode_s(v) + n * one_row + profile.decode_s(v)
    ttff = (spec.first_chunk_frames - 1) / spec.input_fps + processing
    if n * (one_row + profile.encode_s(v) + profile.decode_s(v)) <= spec.chunk_period_s or n == 1:
        latency = spec.buffering_s + processing
    else:
        latency = spec.buffering_s + (n - 1) * spec.chunk_period_s + profile.tick_s(n * d, v, v, num_blocks)
    return ttff, latency


# ---------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class StreamStats:
    """Counters and latency percentiles of one stream (frames unless named otherwise)."""

    stream_id: str
    mode: BatchMode
    queue_depth: int
    """Chunks queued, not yet admitted."""
    in_flight: int
    """Chunks being denoised."""
    frames_in: int
    frames_out: int
    deadline_misses: int
    """Frames that left after their deadline."""
    skipped_frames: Mapping[SkipReason, int]
    ttff_s: float | None
    """Open to first output, None until then."""
    latency: LatencySummary
    """Per-frame latency percentiles and jitter over the recent window."""


@dataclass(frozen=True)
class SchedulerStats:
    """One replica's scheduler at a glance (plain numbers for the metrics exporter)."""

    num_streams: int
    queue_depth: int
    """Chunks queued over all streams."""
    in_flight_chunks: int
    plans: int
    """Non-empty plans handed out."""
    mean_batch_rows: float
    batch_rows_histogram: Mapping[int, int]
    """Rows in a forward -> how many forwards had that many."""
    deadline_misses: int
    skipped_frames: Mapping[SkipReason, int]
    utilization: float
    """Measured busy fraction over the last utilization_window_s."""
    tick_estimate_s: float
    """Running estimate of one forward's duration (measured; predicted until the first)."""
    streams: tuple[StreamStats, ...]


# ---------------------------------------------------------------------------------------------------
# The scheduler


@dataclass
class _InFlight:
    chunk: Chunk
    deadline_s: float
    steps_done: int = 0
    prefill: bool = False


@dataclass
class _Stream:
    stream_id: str
    spec: StreamSpec
    opened_s: float
    latencies: LatencyWindow
    mode: BatchMode = BatchMode.STEP_BY_STEP
    queue: deque[Chunk] = field(default_factory=deque)
    in_flight: list[_InFlight] = field(default_factory=list)
    busy: bool = False
    prefilled: bool = False
    input_ended: bool = False
    finished: bool = False
    last_seq: int | None = None
    last_ready_s: float | None = None
    frames_in: int = 0
    frames_out: int = 0
    misses: int = 0
    first_output_s: float | None = None
    skipped: dict[SkipReason, int] = field(default_factory=dict)


@dataclass
class _Candidate:
    stream: _Stream
    work: StreamWork
    # (finish_by_s, forwards_after_this_one) for every chunk whose timing this forward decides
    constraints: list[tuple[float, int]]
    rows: int


class BatchingScheduler:
    """The SLO-aware batching scheduler of one pipeline replica (module docstring).

    Example of one tick (times in seconds): on a fast GPU, after their prefills, streams "a" (deadline
    0.5) and "b" (deadline 0.4), both 2 steps, each have a chunk queued; the load is light (and 0.4 s is
    too tight for stream batching anyway), so both run step by step. schedule(10.0) returns
    a plan whose work is [b, a] (earliest deadline first), each admitting its chunk at step 0: 2 rows.
    After update_from_output(plan, BatchOutput(plan.plan_id, 10.0, 10.05, ...)) both chunks are at step 1;
    the next plan finishes them (emitted=(seq,)).
    """

    def __init__(self, config: BatchingConfig, profile: StageProfile) -> None:
        self.config = config
        self.profile = profile
        self._streams: dict[str, _Stream] = {}
        self._outstanding: dict[int, BatchPlan] = {}
        self._next_plan_id = 0
        self._pending_skips: list[SkippedChunk] = []
        self._busy_intervals: deque[tuple[float, float]] = deque()
        self._tick_estimate: float | None = None
        self._plans = 0
        self._rows_hist: dict[int, int] = {}
        self._misses = 0
        self._skipped: dict[SkipReason, int] = {}
        self._finished_stats: dict[str, StreamStats] = {}

    # -- streams ------------------------------------------------------------------------------------

    def add_stream(self, stream_id: str, spec: StreamSpec, now: float) -> None:
        """Open a stream at `now` (its TTFF deadline is now + spec.slo.ttff_s).

        Raises StreamExistsError when the id is open.
        """
        if stream_id in self._streams:
            raise StreamExistsError(
                f"stream {stream_id!r} is already open on this replica", stream_id=stream_id
            )
        self._streams[stream_id] = _Stream(
            stream_id, spec, now, LatencyWindow(self.config.latency_window), mode=BatchMode.STEP_BY_STEP
        )

    def add_chunk(self, stream_id: str, chunk: Chunk) -> SkippedChunk | None:
        """Queue a chunk. When the stream's queue is full, its oldest chunk is dropped and returned
        (reason QUEUE_OVERFLOW; it also appears in the next plan's `skipped`).

        Raises StreamNotFoundError for an unknown stream, ValueError when seq does not increase or the
        stream's input has ended.
        """
        stream = self._stream(stream_id)
        if stream.input_ended:
            raise ValueError(f"stream {stream_id!r}: input has ended, chunk seq={chunk.seq} refused")
        if stream.last_seq is not None and chunk.seq <= stream.last_seq:
            raise ValueError(f"stream {stream_id!r}: chunk seq={chunk.seq} must exceed {stream.last_seq}")
        stream.last_seq = chunk.seq
        stream.last_ready_s = chunk.ready_s
        stream.frames_in += chunk.num_frames
        dropped = None
        if len(stream.queue) >= self.config.max_queued_chunks:
            dropped = self._skip(stream, stream.queue.popleft(), SkipReason.QUEUE_OVERFLOW)
        stream.queue.append(chunk)
        return dropped

    def end_input(self, stream_id: str) -> None:
        """No more chunks will come: in-flight chunks are flushed without waiting for arrivals."""
        self._stream(stream_id).input_ended = True

    def has_work(self, stream_id: str) -> bool:
        """Whether the stream still has chunks queued or in flight (a clean end waits until False)."""
        stream = self._stream(stream_id)
        return bool(stream.queue or stream.in_flight)

    def finish_stream(self, stream_id: str) -> StreamStats:
        """Forget a stream; queued chunks are skipped (STREAM_FINISHED), in-flight ones dropped. Returns its
        final stats. If it is part of an outstanding plan, that plan's output is still accepted.

        Raises StreamNotFoundError for an unknown stream.
        """
        stream = self._stream(stream_id)
        while stream.queue:
            self._skip(stream, stream.queue.popleft(), SkipReason.STREAM_FINISHED)
        final = self._stream_stats(stream)
        stream.finished = True
        stream.in_flight.clear()
        del self._streams[stream_id]
        return final

    # -- scheduling ---------------------------------------------------------------------------------

    def schedule(self, now: float) -> BatchPlan:
        """Choose the next forward (module docstring). Streams in an outstanding plan are left out, so a
        runtime with several forwards in flight gets disjoint plans."""
        tick = self._tick_estimate_s()
        candidates: list[_Candidate] = []
        for stream in self._streams.values():
            if stream.busy:
                continue
            self._choose_mode(stream)
            self._prune_queue(stream, now, tick)
            candidate = self._candidate(stream, now, tick)
            if candidate is not None:
                candidates.append(candidate)
        members = self._grow(candidates, now)
        skipped = tuple(self._pending_skips)
        self._pending_skips = []
        plan_id = self._next_plan_id
        self._next_plan_id += 1
        work = tuple(c.work for c in members)
        plan = BatchPlan(plan_id, now, work, skipped, self._predict(members))
        if work:
            for c in members:
                c.stream.busy = True
                if c.work.admitted is not None:
                    popped = c.stream.queue.popleft()
                    assert popped is c.work.admitted
                    deadline = self._deadline(c.stream, popped, prefill=c.work.prefill)
                    c.stream.in_flight.append(_InFlight(popped, deadline, 0, prefill=c.work.prefill))
                    if c.work.prefill:
                        c.stream.prefilled = True
            self._outstanding[plan_id] = plan
            self._plans += 1
            self._rows_hist[plan.num_rows] = self._rows_hist.get(plan.num_rows, 0) + 1
        return plan

    def update_from_output(self, plan: BatchPlan, output: BatchOutput) -> list[CompletedChunk]:
        """Apply a finished forward: feed the measured durations to the profile, advance every row by one
        step, and record the emitted chunks' latencies and misses. Returns the completed chunks.

        Raises ValueError when the plan is not outstanding or the output belongs to another plan.
        """
        if output.plan_id != plan.plan_id:
            raise ValueError(f"output of plan {output.plan_id} given for plan {plan.plan_id}")
        if self._outstanding.pop(plan.plan_id, None) is None:
            raise ValueError(f"plan {plan.plan_id} is not outstanding (already updated, or never scheduled)")
        self._observe(plan, output)
        completed: list[CompletedChunk] = []
        for work in plan.work:
            stream = self._streams.get(work.stream_id)
            if stream is None:  # finished while the forward ran
                continue
            stream.busy = False
            by_seq = {f.chunk.seq: f for f in stream.in_flight}
            for row in work.rows:
                by_seq[row.chunk_seq].steps_done += 1
            for seq in work.emitted:
                flight = by_seq[seq]
                assert flight.steps_done == stream.spec.num_steps, "emitted before its last step"
                stream.in_flight.remove(flight)
                left = output.emitted_s.get((stream.stream_id, seq), output.finished_s)
                completed.append(self._complete(stream, flight, left))
        return completed

    def next_wakeup_s(self, now: float) -> float | None:
        """When `schedule` should run again even if no chunk arrives: the earliest time a stream-batching
        stream with chunks in flight and none queued must flush rather than wait (see _must_drain).
        None when only arrivals (or outstanding outputs) can create work.

        Example: 16 fps, 2 steps, deadline 1 s; chunk 1 (first frame at 0.0625, deadline 1.0625) is at
        step 1 after a forward; the next chunk is due at 0.5. With a 0.1 s forward estimate and safety
        factor 1.15 the stream may wait until 1.0625 - 0.115 = 0.9475 before it must flush: wakeup 0.75
        (two periods without input mean a pause) is earlier, so 0.75.
        """
        tick = self._tick_estimate_s() * self.config.safety_factor
        times = []
        for stream in self._streams.values():
            if (
                stream.busy
                or stream.queue
                or not stream.in_flight
                or stream.mode is not BatchMode.STREAM_BATCH
            ):
                continue
            if stream.input_ended or stream.last_ready_s is None:
                return now
            period = stream.spec.chunk_period_s
            next_arrival = stream.last_ready_s + period
            oldest = min(stream.in_flight, key=lambda f: f.deadline_s)
            left = stream.spec.num_steps - oldest.steps_done
            latest_start = oldest.deadline_s - (left - 1) * period - tick
            times.append(min(next_arrival + period, max(next_arrival, latest_start)))
        return max(now, min(times)) if times else None

    def stats(self) -> SchedulerStats:
        """A snapshot of counters and percentiles."""
        streams = tuple(self._stream_stats(s) for s in self._streams.values())
        total_rows = sum(rows * count for rows, count in self._rows_hist.items())
        return SchedulerStats(
            num_streams=len(self._streams),
            queue_depth=sum(len(s.queue) for s in self._streams.values()),
            in_flight_chunks=sum(len(s.in_flight) for s in self._streams.values()),
            plans=self._plans,
            mean_batch_rows=total_rows / self._plans if self._plans else 0.0,
            batch_rows_histogram=dict(sorted(self._rows_hist.items())),
            deadline_misses=self._misses,
            skipped_frames=dict(self._skipped),
            utilization=self._measured_utilization(),
            tick_estimate_s=self._tick_estimate_s(),
            streams=streams,
        )

    def stream_stats(self, stream_id: str) -> StreamStats:
        """Stats of one open stream. Raises StreamNotFoundError."""
        return self._stream_stats(self._stream(stream_id))

    def mode_of(self, stream_id: str) -> BatchMode:
        """The stream's current mode. Raises StreamNotFoundError."""
        return self._stream(stream_id).mode

    def spec_of(self, stream_id: str) -> StreamSpec:
        """The stream's spec (its SLO, steps and work scales). Raises StreamNotFoundError."""
        return self._stream(stream_id).spec

    # -- internals ----------------------------------------------------------------------------------

    def _stream(self, stream_id: str) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open on this replica") from None

    def _deadline(self, stream: _Stream, chunk: Chunk, *, prefill: bool) -> float:
        if prefill:
            return stream.opened_s + stream.spec.slo.ttff_s
        return chunk_deadline(chunk.arrivals_s, stream.spec.slo.frame_deadline_s)

    def _skip(self, stream: _Stream, chunk: Chunk, reason: SkipReason) -> SkippedChunk:
        stream.skipped[reason] = stream.skipped.get(reason, 0) + chunk.num_frames
        self._skipped[reason] = self._skipped.get(reason, 0) + chunk.num_frames
        skipped = SkippedChunk(stream.stream_id, chunk.seq, chunk.num_frames, reason)
        self._pending_skips.append(skipped)
        return skipped

    def _tick_estimate_s(self) -> float:
        if self._tick_estimate is not None:
            return self._tick_estimate
        loads = [StreamLoad(s.spec, s.mode) for s in self._streams.values()]
        return estimate_load(self.profile, self.config.num_blocks, loads).tick_s

    def _choose_mode(self, stream: _Stream) -> None:
        """Step by step when stream batching misses the deadline and step by step is faster and keeps
        up, or (with hysteresis) when the load predicted with this stream step by step is light; stream
        batch otherwise (also under overload, where fewer forwards per chunk is all that helps)."""
        spec = stream.spec
        if spec.num_steps == 1:
            stream.mode = BatchMode.STREAM_BATCH  # one step: the two modes coincide
            return
        others = [StreamLoad(s.spec, s.mode) for s in self._streams.values() if s is not stream]
        as_sbs = estimate_load(
            self.profile, self.config.num_blocks, [*others, StreamLoad(spec, BatchMode.STEP_BY_STEP)]
        )
        as_sb = estimate_load(
            self.profile, self.config.num_blocks, [*others, StreamLoad(spec, BatchMode.STREAM_BATCH)]
        )
        sf = self.config.safety_factor
        sb_latency = predicted_latency_s(spec, BatchMode.STREAM_BATCH, as_sb.tick_s * sf)
        sbs_latency = predicted_latency_s(spec, BatchMode.STEP_BY_STEP, as_sbs.tick_s * sf)
        if sb_latency > spec.slo.frame_deadline_s and sbs_latency < sb_latency and as_sbs.keeps_up:
            stream.mode = BatchMode.STEP_BY_STEP  # only step by step can still make the deadline
        elif stream.mode is BatchMode.STEP_BY_STEP:
            if as_sbs.utilization > self.config.heavy_load or not as_sbs.keeps_up:
                stream.mode = BatchMode.STREAM_BATCH
        elif as_sbs.utilization < self.config.light_load and as_sbs.keeps_up:
            stream.mode = BatchMode.STEP_BY_STEP

    def _alone_finish(self, stream: _Stream, now: float) -> float:
        """Lower bound on when a queued chunk could finish: alone, starting now, no safety factor."""
        n = stream.spec.num_steps
        return (
            now
            + self.profile.encode_s(1)
            + n * self.profile.dit_s(1, self.config.num_blocks)
            + (self.profile.decode_s(1))
        )

    def _prune_queue(self, stream: _Stream, now: float, tick: float) -> None:
        """Skip queued chunks that can no longer make their deadline, oldest first (module docstring)."""
        n = stream.spec.num_steps
        sf = self.config.safety_factor
        # a forward is at least this stream's own rows alone, whatever recent forwards measured
        own_rows = 1 if stream.mode is BatchMode.STEP_BY_STEP else n
        tick = max(tick, self.profile.tick_s(own_rows, 1, 1, self.config.num_blocks))
        kept: deque[Chunk] = deque()
        pending_prefill = not stream.prefilled
        in_flight_left = max((n - f.steps_done for f in stream.in_flight), default=0)
        while stream.queue:
            chunk = stream.queue.popleft()
            if pending_prefill:  # the first chunk is never skipped: without it the stream cannot start
                kept.append(chunk)
                pending_prefill = False
                in_flight_left += n
                continue
            deadline = self._deadline(stream, chunk, prefill=False)
            if self._alone_finish(stream, now) > deadline:
                self._skip(stream, chunk, SkipReason.DEADLINE_PASSED)
                continue
            ahead = len(kept)
            if stream.mode is BatchMode.STEP_BY_STEP:
                forwards = in_flight_left + (ahead + 1) * n
            else:
                forwards = ahead + n
            if now + forwards * tick * sf > deadline and stream.queue:
                self._skip(stream, chunk, SkipReason.PREDICTED_LATE)  # a newer chunk can still be on time
                continue
            kept.append(chunk)
        stream.queue = kept

    def _candidate(self, stream: _Stream, now: float, tick: float) -> _Candidate | None:
        """The work the stream would do in the next forward, or None if it has none (or waits)."""
        n = stream.spec.num_steps
        flights = list(stream.in_flight)
        admitted: Chunk | None = None
        prefill = False
        step_by_step = stream.mode is BatchMode.STEP_BY_STEP or any(f.prefill for f in flights)
        if stream.queue:
            if not stream.prefilled:
                if not flights:
                    admitted, prefill = stream.queue[0], True
            elif step_by_step:
                if not flights:
                    admitted = stream.queue[0]
            elif len(flights) < n:
                admitted = stream.queue[0]
        if admitted is None and not flights:
            return None
        if admitted is None and not step_by_step and not self._must_drain(stream, now, tick):
            return None  # stream batching: wait for the next chunk to push the buffer along
        rows: list[Row] = []
        emitted: list[int] = []
        constraints: list[tuple[float, int]] = []
        deadlines: list[float] = []
        for f in flights:
            rows.append(Row(stream.stream_id, f.chunk.seq, f.steps_done, self._latents(f.chunk, f.prefill)))
            left_after = n - f.steps_done - 1
            deadlines.append(f.deadline_s)
            if left_after == 0:
                emitted.append(f.chunk.seq)
                constraints.append((f.deadline_s, 0))
            elif step_by_step:
                constraints.append((f.deadline_s, left_after))
        if admitted is not None:
            deadline = self._deadline(stream, admitted, prefill=prefill)
            rows.append(Row(stream.stream_id, admitted.seq, 0, self._latents(admitted, prefill)))
            deadlines.append(deadline)
            if n == 1:
                emitted.append(admitted.seq)
                constraints.append((deadline, 0))
            elif step_by_step or prefill:
                constraints.append((deadline, n - 1))
        work = StreamWork(
            stream_id=stream.stream_id,
            mode=BatchMode.STEP_BY_STEP if (prefill or any(f.prefill for f in flights)) else stream.mode,
            rows=tuple(sorted(rows, key=lambda r: r.step)),
            admitted=admitted,
            emitted=tuple(emitted),
            prefill=prefill or any(f.prefill for f in flights),
            deadline_s=min(deadlines),
        )
        return _Candidate(stream, work, constraints, sum(r.latent_frames for r in rows))

    @staticmethod
    def _latents(chunk: Chunk, prefill: bool) -> int:
        return chunk.latent_frames if prefill else 1

    def _must_drain(self, stream: _Stream, now: float, tick: float) -> bool:
        """A stream-batching stream with chunks in flight and none queued joins the forward anyway when
        waiting for its next chunk would make its oldest chunk late, or when its input ended/paused."""
        if stream.input_ended or stream.last_ready_s is None:
            return True
        period = stream.spec.chunk_period_s
        next_arrival = stream.last_ready_s + period
        if now >= next_arrival + period:  # two periods without input: paused, flush
            return True
        oldest = min(stream.in_flight, key=lambda f: f.deadline_s)
        left = stream.spec.num_steps - oldest.steps_done
        waiting_finish = max(now, next_arrival) + (left - 1) * period + tick * self.config.safety_factor
        return waiting_finish > oldest.deadline_s

    def _predict(self, members: Sequence[_Candidate]) -> float:
        """The forward's time, each member's rows and chunks counted at its shape's work."""
        rows = sum(c.rows * c.stream.spec.dit_scale for c in members)
        admitted = sum(c.stream.spec.vae_scale for c in members if c.work.admitted is not None)
        emitted = sum(len(c.work.emitted) * c.stream.spec.vae_scale for c in members)
        return self.profile.tick_s(rows, admitted, emitted, self.config.num_blocks)

    def _nominal_share(self, plan: BatchPlan) -> tuple[float, float, float]:
        """(rows, admitted, emitted) of the plan over the same counted at the members' shapes' work: the
        factor that turns the forward's measured stage times into the profile's nominal shape's."""
        def scales(sid: str) -> StreamSpec:
            stream = self._streams.get(sid)
            return stream.spec if stream is not None else StreamSpec()

        rows = sum(r.latent_frames * scales(w.stream_id).dit_scale for w in plan.work for r in w.rows)
        admitted = sum(scales(w.stream_id).vae_scale for w in plan.work if w.admitted is not None)
        emitted = sum(len(w.emitted) * scales(w.stream_id).vae_scale for w in plan.work)
        return (plan.num_rows / rows if rows else 1.0, plan.num_admitted / admitted if admitted else 1.0,
                plan.num_emitted / emitted if emitted else 1.0)

    def _fits(self, members: Sequence[_Candidate], now: float) -> bool:
        forward = self._predict(members) * self.config.safety_factor
        return all(now + forward * (1 + after) <= by for c in members for by, after in c.constraints)

    def _grow(self, candidates: list[_Candidate], now: float) -> list[_Candidate]:
        """EDF: the head runs; others join while the batch still fits everyone's deadlines and the rows.

        First, a candidate that only admits a queued (non-prefill) chunk which cannot make its deadline
        even alone skips that chunk and drops out; in every other candidate, constraints that are already
        out of reach alone are dropped (those chunks will be late whatever happens: they must not stop
        the batch from growing)."""
        viable: list[_Candidate] = []
        for cand in candidates:
            if self._fits([cand], now):
                viable.append(cand)
                continue
            work = cand.work
            if work.admitted is not None and not work.prefill and not cand.stream.in_flight:
                self._skip(cand.stream, cand.stream.queue.popleft(), SkipReason.PREDICTED_LATE)
                continue
            forward = self._predict([cand]) * self.config.safety_factor
            cand.constraints = [(by, k) for by, k in cand.constraints if now + forward * (1 + k) <= by]
            viable.append(cand)
        viable.sort(key=lambda c: (c.work.deadline_s, c.stream.stream_id))
        members: list[_Candidate] = []
        rows = 0
        for cand in viable:
            if not members or (
                rows + cand.rows <= self.config.max_rows and self._fits([*members, cand], now)
            ):
                members.append(cand)
                rows += cand.rows
        return members

    def _observe(self, plan: BatchPlan, output: BatchOutput) -> None:
        rows, admitted, emitted = self._nominal_share(plan)
        if output.encode_s > 0.0 and plan.num_admitted:
            self.profile.observe(Stage.ENCODE, plan.num_admitted, output.encode_s * admitted)
        if output.dit_s > 0.0 and plan.num_rows:
            self.profile.observe_dit(plan.num_rows, self.config.num_blocks, output.dit_s * rows)
        if output.decode_s > 0.0 and plan.num_emitted:
            self.profile.observe(Stage.DECODE, plan.num_emitted, output.decode_s * emitted)
        duration = output.finished_s - output.started_s
        if plan.work:
            a = self.config.tick_ema
            prev = self._tick_estimate
            self._tick_estimate = duration if prev is None else a * duration + (1 - a) * prev
            self._busy_intervals.append((output.started_s, output.finished_s))
            horizon = output.finished_s - self.config.utilization_window_s
            while self._busy_intervals and self._busy_intervals[0][1] < horizon:
                self._busy_intervals.popleft()

    def _measured_utilization(self) -> float:
        if not self._busy_intervals:
            return 0.0
        end = self._busy_intervals[-1][1]
        start = end - self.config.utilization_window_s
        busy = sum(max(0.0, f - max(s, start)) for s, f in self._busy_intervals)
        return min(1.0, busy / self.config.utilization_window_s)

    def _complete(self, stream: _Stream, flight: _InFlight, left_s: float) -> CompletedChunk:
        chunk = flight.chunk
        latencies = [left_s - t for t in chunk.arrivals_s]
        if flight.prefill:
            late = chunk.num_frames if left_s > flight.deadline_s else 0
            if stream.first_output_s is None:
                stream.first_output_s = left_s
        else:
            late = sum(1 for x in latencies if x > stream.spec.slo.frame_deadline_s)
        stream.latencies.extend(latencies)
        stream.frames_out += chunk.num_frames
        stream.misses += late
        self._misses += late
        return CompletedChunk(stream.stream_id, chunk.seq, left_s, latencies[0], late)

    def _stream_stats(self, stream: _Stream) -> StreamStats:
        return StreamStats(
            stream_id=stream.stream_id,
            mode=stream.mode,
            queue_depth=len(stream.queue),
            in_flight=len(stream.in_flight),
            frames_in=stream.frames_in,
            frames_out=stream.frames_out,
            deadline_misses=stream.misses,
            skipped_frames=dict(stream.skipped),
            ttff_s=None if stream.first_output_s is None else stream.first_output_s - stream.opened_s,
            latency=stream.latencies.summary(stream.spec.slo.frame_deadline_s),
        )
