"""The service configuration of a Weir Serve application: frozen, documented, validated on construction.

Parsed once at the edge (the `weir` CLI or a Serve config YAML's `args`) and passed to `build_app`.
Plain Python (no Ray), so the CLI can validate it before starting anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from deployments.tenants import TIERS, TenantRegistry, load_registry
from stages.config import DIT_PRESETS

__all__ = ["TIERS", "PipelineSpec", "ServiceConfig"]


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline deployment: one engine instance (one GPU, or the CPU), serving many streams."""

    model: str = "tiny"
    """DiT preset the engine runs: 'tiny', 'wan-1.3b', 'wan-14b'."""
    vae: str = "wan"
    """Default VAE of streams that do not choose one: 'wan' or 'taehv'."""
    device: str = "cpu"
    """'cpu' or 'cuda'. With 'cuda' the replica reserves one GPU."""
    dtype: str = "float32"
    """'float32' (CPU) or 'bfloat16' (GPU)."""
    checkpoint_dir: str | None = None
    """Published weights folder; None = random weights (tiny model, tests, demo)."""
    gpu_type: str = "cpu"
    """Bounded metrics label and accelerator_type request (e.g. 'H100'); 'cpu' on CPU."""
    max_streams: int = 8
    """Stream slots: the router never places more streams here (1..256)."""
    cold_shape_s: float | None = None
    """Seconds of device time a stream of a shape (resolution, VAE kind) the pipeline has not run costs
    first (its compiles), for either VAE kind; the router prices it into that stream's start-up.
    None: scheduling.priors' measurement for the model, VAE kind and GPU class."""
    warm_resolutions: tuple[tuple[int, int], ...] = ()
    """(height, width) the replica warms up before it takes clients, besides 480x832 on a GPU: the
    first stream of each starts without the new shape's compiles, and admission prices no
    `cold_shape_s` for it. Each side a multiple of 16 in [16, 1280]; a start-up warm-up per shape."""
    warm_streams: int | None = None
    """GPU only: streams of each warm step count (1 and 2) whose DiT states and CUDA graphs the replica
    prepares before it takes clients, so that many clients start without eager calls or captures
    (deployments.pipeline.warm_up_executor). None = max_streams, as memory allows; 0..max_streams."""
    num_cpus: float = 1.0
    """CPUs the replica reserves (0 allowed in tests on a small machine)."""
    executor: str = "auto"
    """'graph': stage actors (VAE encode, DiT shards, VAE decode) pinned to the pipeline's GPUs and
    wired by a Ray compiled graph over NCCL; 'inprocess': the engine inside the replica; 'auto':
    'graph' on CUDA, 'inprocess' on CPU (busy-polling graph actors starve a small CPU machine)."""
    num_gpus: int = 1
    """GPUs of one pipeline (graph executor): the DiT blocks are split over them (1..16)."""
    ring: bool = False
    """Graph executor: streams run as W interleaved stream-batch chains, W = the DiT shard actors
    (cluster.graph, "Ring"), so that W ticks of ONE stream can be in the pipeline at once. Off by
    default here: the pipeline loop runs one step at a time and its scheduler expects a chunk n-1
    ticks after it entered, so in serving the ring would only add (n-1)*(W-1) ticks of latency."""
    replicas: int = 1
    """Replicas of this pipeline deployment, a pool of one GPU class (1..64): each stream stays on one
    of them (deployments.affinity). With max_replicas above it, the pool's minimum and first size."""
    max_replicas: int = 0
    """> replicas: the SLO autoscaling policy (deployments.autoscaling) sizes the pool between replicas
    and this; 0 = a fixed pool of `replicas`."""

    @property
    def accelerator_type(self) -> str | None:
        """The Ray accelerator type the pipeline's GPUs are pinned to: gpu_type, except 'cpu' and the
        'unlabelled-...' labels of GPUs Ray does not name (those pin nothing)."""
        if self.gpu_type == "cpu" or self.gpu_type.startswith("unlabelled-"):
            return None
        return self.gpu_type

    @property
    def resolved_warm_streams(self) -> int:
        return self.max_streams if self.warm_streams is None else self.warm_streams

    @property
    def resolved_spare_streams(self) -> int:
        """Closed streams' states each stage keeps: the warm pool of both warm step counts (1 and 2),
        and at least 8 (stages.dit_stage, "Spare states")."""
        return max(8, 2 * self.resolved_warm_streams)

    @property
    def resolved_executor(self) -> str:
        """'graph' or 'inprocess' after resolving 'auto'."""
        if self.executor == "auto":
            return "graph" if self.device == "cuda" else "inprocess"
        return self.executor

    def __post_init__(self) -> None:
        if self.executor not in ("auto", "graph", "inprocess"):
            raise ValueError(f"executor={self.executor!r}: choose 'auto', 'graph' or 'inprocess'")
        if not 1 <= self.num_gpus <= 16:
            raise ValueError(f"num_gpus={self.num_gpus} must be in 1..16")
        if self.num_gpus > 1 and self.resolved_executor != "graph":
            raise ValueError(f"num_gpus={self.num_gpus} needs executor='graph' (one process drives one GPU)")
        if self.ring and self.resolved_executor != "graph":
            raise ValueError("ring=True needs executor='graph' (the ring interleaves a stream over pipeline stages)")
        if self.model not in DIT_PRESETS:
            raise ValueError(f"model={self.model!r}: choose one of {sorted(DIT_PRESETS)}")
        if self.vae not in ("wan", "taehv"):
            raise ValueError(f"vae={self.vae!r}: choose 'wan' or 'taehv'")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: choose 'cpu' or 'cuda'")
        if not 1 <= self.max_streams <= 256:
            raise ValueError(f"max_streams={self.max_streams} must be in 1..256")
        if self.cold_shape_s is not None and not self.cold_shape_s >= 0.0:
            raise ValueError(f"cold_shape_s={self.cold_shape_s} must be >= 0 seconds")
        object.__setattr__(self, "warm_resolutions", tuple(tuple(int(v) for v in r) for r in self.warm_resolutions))
        for shape in self.warm_resolutions:
            if len(shape) != 2 or any(v % 16 or not 16 <= v <= 1280 for v in shape):
                raise ValueError(f"warm_resolutions: {shape} must be (height, width), each a multiple of 16 "
                                 "in [16, 1280]")
        if self.warm_streams is not None and not 0 <= self.warm_streams <= self.max_streams:
            raise ValueError(f"warm_streams={self.warm_streams} must be in 0..max_streams={self.max_streams}")
        if not self.gpu_type:
            raise ValueError("gpu_type must name the GPU class (e.g. 'H100'), or 'cpu'")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus={self.num_cpus} must be >= 0")
        if not 1 <= self.replicas <= 64:
            raise ValueError(f"replicas={self.replicas} must be in 1..64")
        if self.max_replicas and not self.replicas <= self.max_replicas <= 64:
            raise ValueError(f"max_replicas={self.max_replicas} must be 0 (a fixed pool) or in "
                             f"replicas={self.replicas}..64")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `build_app` needs. Defaults: one tiny CPU pipeline, open access."""

    pipelines: tuple[PipelineSpec, ...] = (PipelineSpec(),)
    """One entry per pipeline deployment: a pool of `replicas` replicas of one GPU class, each owning one engine."""
    app_name: str = "weir"
    """Serve application name; clients send it as the `application` gRPC metadata."""
    grpc_port: int = 9000
    """Port of Serve's gRPC proxy."""
    http_port: int = 8000
    """Port of Serve's HTTP proxy, which also serves the metrics endpoint at /metrics."""
    tenants: TenantRegistry | None = None
    """Tenants, their hashed API keys and quotas (deployments.tenants). None = open access: every stream
    is tenant 'anonymous', tier 'standard', without quotas."""
    stats_interval_s: float = 1.0
    """Period of StreamStats messages to clients and of stats reports to the router and exporter."""
    idle_timeout_s: float = 30.0
    """A stream that sends no frame for this long is closed (its client is presumed gone)."""
    retry_after_s: float = 2.0
    """Retry hint sent with a refusal when no better estimate exists."""
    output_queue_frames: int = 256
    """Output frames held for a slow client before the oldest are dropped."""
    scheduler_ttff_margin: float = 1.0
    """Multiplier on predicted TTFF at admission (>1 = conservative)."""
    recordings_dir: str | None = None
    """Folder the ingress writes stream recordings to (<id>.mp4 and <id>.json each; deployments.recording);
    None = recording off (a start is answered RECORDING_FAILED). With ingress replicas on several nodes,
    point it at storage they share, or a fetch may land on a replica that cannot see the file."""
    max_recordings: int = 4
    """Recordings being written at once per ingress replica (1..64); one more is refused in-band."""
    max_recording_bytes: int = 512 * 2**20
    """Size at which a recording stops (finished, marked as cut short): 1 MiB..64 GiB."""
    recording_queue_frames: int = 64
    """Output frames held for a recording's encoder (8..4096); beyond it frames are dropped from the
    recording (counted), never delayed on their way to the client."""
    max_kept_recordings: int = 100
    """Finished recordings kept in recordings_dir (1..100000); the oldest beyond it are deleted."""

    def __post_init__(self) -> None:
        if not self.pipelines:
            raise ValueError("pipelines must name at least one PipelineSpec")
        for port_name in ("grpc_port", "http_port"):
            port = getattr(self, port_name)
            if not 1 <= port <= 65535:
                raise ValueError(f"{port_name}={port} must be a TCP port (1..65535)")
        if self.tenants is not None and not isinstance(self.tenants, TenantRegistry):
            raise ValueError("tenants must be a TenantRegistry (parse it with deployments.tenants.load_registry)")
        if self.stats_interval_s <= 0 or self.idle_timeout_s <= 0:
            raise ValueError("stats_interval_s and idle_timeout_s must be > 0")
        if not 0 < self.retry_after_s <= 600:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be in (0, 600]")
        if self.output_queue_frames < 8:
            raise ValueError(f"output_queue_frames={self.output_queue_frames} must be >= 8")
        if self.scheduler_ttff_margin <= 0:
            raise ValueError(f"scheduler_ttff_margin={self.scheduler_ttff_margin} must be > 0")
        if self.recordings_dir is not None and not str(self.recordings_dir).strip():
            raise ValueError("recordings_dir must be a folder path, or None to turn recording off")
        bounds = {"max_recordings": (1, 64), "max_recording_bytes": (2**20, 64 * 2**30),
                  "recording_queue_frames": (8, 4096), "max_kept_recordings": (1, 100_000)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} must be an integer in [{low}, {high}]")

    @property
    def pipeline_names(self) -> list[str]:
        """Deployment name of each pipeline, e.g. ['Pipeline-0-tiny']."""
        return [f"Pipeline-{i}-{p.model}" for i, p in enumerate(self.pipelines)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, environ: Mapping[str, str] | None = None) -> ServiceConfig:
        """Build from plain data (YAML `args`); unknown keys raise ValueError naming them.

        `tenants` may be a registry mapping, or the path of a registry file; when absent, the registry
        comes from $WEIR_TENANTS (a secret holding the file's content) if set, else open access.
        """
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown service config keys {sorted(unknown)}; known: {sorted(known)}")
        pipes = data.pop("pipelines", None)
        if pipes is not None:
            data["pipelines"] = tuple(p if isinstance(p, PipelineSpec) else PipelineSpec(**p) for p in pipes)
        tenants = data.get("tenants")
        if isinstance(tenants, Mapping):
            data["tenants"] = TenantRegistry.from_dict(tenants)
        elif isinstance(tenants, (str, os.PathLike)):
            data["tenants"] = load_registry(tenants)
        elif tenants is None:
            data["tenants"] = load_registry(None, os.environ if environ is None else environ)
        return cls(**data)
