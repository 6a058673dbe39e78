"""Plain dataclasses passed between Weir's deployments (ingress -> router -> pipeline -> ingress).

No Ray, no protobuf: the codec converts wire messages to these at the edge, so the router and the
pipeline never see transport types and a different ingress can reuse them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scheduling.admission import Warming
from scheduling.profile import ProfileSnapshot
from stages.prompts import PromptMix

DEFAULT_TTFF_MS = 3000.0
DEFAULT_FRAME_DEADLINE_MS = 2000.0
DEFAULT_INPUT_FPS = 16.0


@dataclass(frozen=True)
class OpenRequest:
    """A validated stream-open request (the codec builds it from StreamOpen)."""

    prompt: str
    num_steps: int = 2
    noise_strength: float = 0.8
    seed: int = 0
    height: int = 480
    width: int = 832
    input_fps: float = DEFAULT_INPUT_FPS
    model: str = ""
    """'' = the deployment's default model."""
    vae: str = ""
    """'' = the model's default VAE."""
    ttff_ms: float = DEFAULT_TTFF_MS
    frame_deadline_ms: float = DEFAULT_FRAME_DEADLINE_MS
    tenant: str = "default"
    """Tenant id from the API key (never the key itself)."""
    tier: str = "standard"
    """Tenant tier: a bounded metrics label."""
    output_jpeg: bool = False
    jpeg_quality: int = 85
    client_label: str = ""
    mix: PromptMix | None = None
    """Several weighted prompts (StreamOpen.prompts); None = `prompt` alone."""
    record: bool = False
    """Record the output from the start (StreamOpen.record; the ingress does it)."""

    @property
    def prompt_mix(self) -> PromptMix:
        """What the stream is conditioned on at open."""
        return self.mix if self.mix is not None else PromptMix.of(self.prompt)


@dataclass(frozen=True)
class PromptChange:
    """A validated SetPrompt (the codec builds it): the new prompt(s), at once or blended."""

    mix: PromptMix
    blend_chunks: int = 0
    """0 = at once; N = over the stream's next N chunks (stages.prompt_blend)."""


@dataclass
class InFrame:
    """One decoded input frame on its way to a pipeline."""

    seq: int
    frame: np.ndarray
    """uint8 [H, W, 3]."""
    capture_ts_us: int
    received_ts_us: int


@dataclass
class OutFrame:
    """One restyled frame on its way back to the client (raw; the ingress encodes it)."""

    seq: int
    frame: np.ndarray
    capture_ts_us: int
    received_ts_us: int
    output_ts_us: int


@dataclass
class StreamStatsSnapshot:
    """Counters of one stream, as the pipeline sees them."""

    stream_id: str
    frames_in: int = 0
    frames_out: int = 0
    frames_skipped: int = 0
    frames_paused: int = 0
    deadline_misses: int = 0
    ttff_ms: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    jitter_ms: float = 0.0
    output_fps: float = 0.0
    queue_depth: int = 0


@dataclass
class StreamEvent:
    """One item of a pipeline's output stream for a client: frames, a stats update, or the end.

    Exactly one of `frames`, `stats`, `ended` is meaningful; `error` ends the stream with a typed error.
    """

    frames: list[OutFrame] = field(default_factory=list)
    stats: StreamStatsSnapshot | None = None
    ended: bool = False
    error: Exception | None = None


@dataclass(frozen=True)
class AdmissionGrant:
    """The router's answer to an admitted stream."""

    stream_id: str
    pipeline: str
    """Name of the pipeline deployment (the pool) that owns the stream."""
    predicted_ttff_ms: float
    first_chunk_frames: int = 1
    chunk_frames: int = 4
    replica: str = ""
    """Serve replica id of the pool's replica that holds the stream ('' = any; deployments.affinity)."""


@dataclass
class PipelineStats:
    """What one pipeline reports to the router and the metrics exporter (a snapshot plus fresh samples).

    The sample lists hold only observations made since the previous drain, so the exporter can feed
    histograms without double counting.
    """

    pipeline: str
    model: str
    gpu_type: str
    healthy: bool = True
    max_streams: int = 0
    active_streams: int = 0
    active_stream_ids: list[str] = field(default_factory=list)
    active_requests: dict[str, OpenRequest] = field(default_factory=dict)
    """stream id -> the request it was opened with, for every active stream (a restarted router
    re-learns its streams, their SLOs and tenants from these)."""
    queue_depth: int = 0
    tick_ms_ema: float = 0.0
    """Smoothed wall time of one tick (engine.step) at the current batch size."""
    tick_ms_by_batch: dict[int, float] = field(default_factory=dict)
    """Smoothed tick time per number of streams stepped together (the measured cost model)."""
    output_fps: float = 0.0
    frames_out_total: int = 0
    frames_skipped_total: int = 0
    deadline_misses_total: int = 0
    slow_ticks_total: int = 0
    """Ticks slower than their prediction by far (deployments.pipeline.SLOW_TICK_FACTOR): stalls."""
    gpu_memory_bytes: int = 0
    cuda_graphs_disabled: int = 0
    """CUDA-graph runners of the engine that stopped capturing after failed captures (they run eager,
    several times slower: stages.cuda_graphs); 0 where none runs (CPU)."""
    ttff_ms_samples: list[tuple[str, float]] = field(default_factory=list)
    """(tenant tier, ms) since the last drain."""
    latency_ms_samples: list[tuple[str, float]] = field(default_factory=list)
    jitter_ms_samples: list[tuple[str, float]] = field(default_factory=list)
    tick_ms_samples: list[float] = field(default_factory=list)
    executor_step_ms_samples: list[float] = field(default_factory=list)
    """Wall time of each executor.step call inside a tick (the engine or the compiled graph, without
    the tick's frame hand-over and delivery), drained with the other samples."""
    skipped_by_tier: dict[str, int] = field(default_factory=dict)
    misses_by_tier: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    """Frames skipped since start, by scheduling.batching.SkipReason value (cumulative)."""
    streams_by_mode: dict[str, int] = field(default_factory=dict)
    """Open streams per batching mode ('stream_batch' / 'step_by_step')."""
    num_blocks: int = 0
    """DiT blocks one forward runs on this pipeline (L)."""
    warm_shapes: list[tuple[int, int, str]] = field(default_factory=list)
    """(height, width, VAE kind) the pipeline has run (warm-ups and streams): a stream of another shape
    costs its compiles first (scheduling.admission `ReplicaInfo.cold_shape_s`)."""
    warming_shapes: list[tuple[int, int, str]] = field(default_factory=list)
    """Shapes it is warming up now, asked by the router for a refused stream (`Pipeline.warm_shape`)."""
    shape_warmups_total: int = 0
    """Shapes its warm-ups have compiled since start (start-up ones and those asked for), cumulative."""
    profile: ProfileSnapshot | None = None
    """The pipeline's measured stage-time models (seeded by scheduling.priors): what the router admits from."""
    replica_id: str = ""
    """The reporting Serve replica of the pipeline deployment ('' outside Serve)."""
    report_seq: int = 0
    """Increasing per replica (0 = unnumbered): the router ignores a report older than one it has
    already taken. A report it pulled can arrive after a newer one the replica pushed, and its stream
    list would undo the newer one (release a stream that is live, re-adopt one that ended)."""
    draining: bool = False
    """True while the replica takes no new stream (Serve no longer routes to it, or not yet)."""
    warming: dict[str, Warming] = field(default_factory=dict)
    """stream id -> start-up work and wall time left, for the streams still in their start-up (the
    router admits new streams against it: scheduling.admission)."""
