"""The one Prometheus exporter of Weir. Cores return stats dataclasses; only this file names metrics.

Pipelines push a PipelineStats (fresh samples drained since the last push) every stats interval, the
router pushes its capacity counters, the ingress pushes stream-open outcomes. The exporter folds them
into one registry, rendered by the `Metrics` deployment; the ingress serves it at GET /metrics on the
Serve HTTP proxy (so every node's proxy is an endpoint).

Labels are bounded: model, gpu_type, stage, tier (and the open outcome). Never a stream id, a tenant
id, or a pipeline name: per-pipeline gauges are summed over the pipelines of a (model, gpu_type).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from ray import serve

from deployments.config import TIERS
from deployments.messages import PipelineStats

LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
TTFF_BUCKETS_S = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
JITTER_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
STAGE_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
OPEN_OUTCOMES = ("admitted", "refused", "over_quota", "slo_unattainable", "unauthenticated", "bad_request",
                 "error")


def _tier(tier: str) -> str:
    return tier if tier in TIERS else "standard"


def _increase(total: int, before: int) -> int:
    """What a pipeline's cumulative count added since its last report: total - before, or all of
    total when it fell (the pipeline restarted and counts from 0 again)."""
    return total - before if total >= before else total


class MetricsExporter:
    """Owns a private CollectorRegistry; every method takes plain stats, never Prometheus types."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        mg = ("model", "gpu_type")
        self.ttff = Histogram("weir_ttff_seconds", "Stream open to first output frame.", (*mg, "tier"),
                              buckets=TTFF_BUCKETS_S, registry=r)
        self.latency = Histogram("weir_frame_latency_seconds", "Input frame arrival to its output leaving.",
                                 (*mg, "tier"), buckets=LATENCY_BUCKETS_S, registry=r)
        self.jitter = Histogram("weir_frame_jitter_seconds", "|change| of consecutive output intervals of a stream.",
                                (*mg, "tier"), buckets=JITTER_BUCKETS_S, registry=r)
        self.misses = Counter("weir_deadline_misses", "Frames sent after their deadline.", (*mg, "tier"), registry=r)
        self.skipped = Counter("weir_frames_skipped", "Frames skipped: could not meet their deadline.",
                               (*mg, "tier"), registry=r)
        self.skipped_reason = Counter("weir_frames_skipped_by_reason",
                                      "Frames skipped, by reason (scheduling.batching.SkipReason, output_overflow).",
                                      (*mg, "reason"), registry=r)
        self.modes = Gauge("weir_streams_by_mode", "Open streams per batching mode (stream_batch, step_by_step).",
                           (*mg, "mode"), registry=r)
        self.frames_out = Counter("weir_frames_out", "Frames sent back.", mg, registry=r)
        self.slow_ticks = Counter("weir_slow_ticks", "Pipeline ticks that took several times their predicted "
                                  "time (stalls: compiles, captures, host hiccups).", mg, registry=r)
        self.stage = Histogram("weir_stage_seconds", "Wall time of one pipeline stage call.", (*mg, "stage"),
                               buckets=STAGE_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("weir_queue_depth", "Input frames waiting in pipelines.", mg, registry=r)
        self.active = Gauge("weir_active_streams", "Streams open on pipelines.", mg, registry=r)
        self.starting = Gauge("weir_streams_starting", "Open streams still in their start-up (prefill, graph "
                              "captures): new streams are admitted against their remaining work.", mg, registry=r)
        self.startup = Gauge("weir_stream_startup_seconds", "Device work one stream's start-up costs beyond its "
                             "steady chunks, as the pipelines' profiles price it (largest over pipelines).", mg,
                             registry=r)
        self.fps = Gauge("weir_pipeline_fps", "Output frames per second (5 s window), summed over pipelines.",
                         mg, registry=r)
        self.gpu_mem = Gauge("weir_gpu_memory_bytes", "Accelerator memory allocated by the engines.", mg, registry=r)
        self.graphs_off = Gauge("weir_cuda_graphs_disabled", "CUDA-graph runners of the engines that run eager "
                                "after failed captures (several times slower; 0 is healthy).", mg, registry=r)
        self.shape_warmups = Counter("weir_shape_warmups", "Shapes (resolution, VAE kind) pipelines' warm-ups "
                                     "compiled: at start-up and for streams refused while cold.", mg, registry=r)
        self.shapes_warming = Gauge("weir_shapes_warming", "Shapes pipelines are warming up now.", mg, registry=r)
        self.healthy = Gauge("weir_pipelines_healthy", "Pipelines reporting healthy.", mg, registry=r)
        self.opens = Counter("weir_stream_opens", "Stream open attempts by outcome.", ("tier", "outcome"), registry=r)
        self.admitted = Gauge("weir_admitted_streams", "Streams the router has admitted and not released.",
                              registry=r)
        self.free_slots = Gauge("weir_free_stream_slots", "Stream slots free on healthy pipelines.", registry=r)
        self.refused = Counter("weir_streams_refused", "Streams the router refused (admission).", registry=r)
        self._latest: dict[tuple[str, str], PipelineStats] = {}
        self._refused_seen = 0
        for tier in TIERS:  # make the series exist before the first observation
            for outcome in OPEN_OUTCOMES:
                self.opens.labels(tier, outcome)

    def record_pipeline(self, s: PipelineStats) -> None:
        mg = (s.model, s.gpu_type)
        for tier, ms in s.ttff_ms_samples:
            self.ttff.labels(*mg, _tier(tier)).observe(ms / 1000)
        for tier, ms in s.latency_ms_samples:
            self.latency.labels(*mg, _tier(tier)).observe(ms / 1000)
        for tier, ms in s.jitter_ms_samples:
            self.jitter.labels(*mg, _tier(tier)).observe(ms / 1000)
        for ms in s.tick_ms_samples:
            self.stage.labels(*mg, "step").observe(ms / 1000)
        for ms in s.executor_step_ms_samples:
            self.stage.labels(*mg, "executor_step").observe(ms / 1000)
        for tier, n in s.skipped_by_tier.items():
            self.skipped.labels(*mg, _tier(tier)).inc(n)
        for tier, n in s.misses_by_tier.items():
            self.misses.labels(*mg, _tier(tier)).inc(n)
        prev = self._latest.get((s.pipeline, s.replica_id))  # one series per replica of a pool
        self.frames_out.labels(*mg).inc(_increase(s.frames_out_total, prev.frames_out_total if prev else 0))
        self.slow_ticks.labels(*mg).inc(_increase(s.slow_ticks_total, prev.slow_ticks_total if prev else 0))
        self.shape_warmups.labels(*mg).inc(
            _increase(s.shape_warmups_total, prev.shape_warmups_total if prev else 0))
        for reason, total in s.skipped_by_reason.items():  # cumulative per pipeline: count the increase
            before = prev.skipped_by_reason.get(reason, 0) if prev else 0
            self.skipped_reason.labels(*mg, reason).inc(_increase(total, before))
        self._latest[(s.pipeline, s.replica_id)] = s
        group = [p for p in self._latest.values() if (p.model, p.gpu_type) == mg]
        self.queue_depth.labels(*mg).set(sum(p.queue_depth for p in group))
        self.active.labels(*mg).set(sum(p.active_streams for p in group))
        self.starting.labels(*mg).set(sum(len(p.warming) for p in group))
        self.startup.labels(*mg).set(max((p.profile.startup(1) for p in group if p.profile is not None), default=0.0))
        self.fps.labels(*mg).set(sum(p.output_fps for p in group))
        self.gpu_mem.labels(*mg).set(sum(p.gpu_memory_bytes for p in group))
        self.graphs_off.labels(*mg).set(sum(p.cuda_graphs_disabled for p in group))
        self.healthy.labels(*mg).set(sum(1 for p in group if p.healthy))
        self.shapes_warming.labels(*mg).set(sum(len(p.warming_shapes) for p in group))
        for mode in ("stream_batch", "step_by_step"):
            self.modes.labels(*mg, mode).set(sum(p.streams_by_mode.get(mode, 0) for p in group))

    def record_router(self, capacity: dict) -> None:
        self.admitted.set(capacity.get("active_streams", 0))
        self.free_slots.set(capacity.get("free_stream_slots", 0))
        refused = int(capacity.get("refused_total", 0))
        if refused > self._refused_seen:
            self.refused.inc(refused - self._refused_seen)
        self._refused_seen = max(self._refused_seen, refused)

    def record_open(self, tier: str, outcome: str) -> None:
        self.opens.labels(_tier(tier), outcome if outcome in OPEN_OUTCOMES else "error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class Metrics:
    """Serve shim over MetricsExporter; GET returns the Prometheus text exposition."""

    def __init__(self) -> None:
        self.exporter = MetricsExporter()

    def record_pipeline(self, stats: PipelineStats) -> None:
        self.exporter.record_pipeline(stats)

    def record_router(self, capacity: dict) -> None:
        self.exporter.record_router(capacity)

    def record_open(self, tier: str, outcome: str) -> None:
        self.exporter.record_open(tier, outcome)

    def render(self) -> bytes:
        return self.exporter.render()
