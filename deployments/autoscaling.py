"""Serve autoscaling of pipeline pools on SLO slack, one pool (deployment) per GPU class.

Three pieces, each a thin shim over `scheduling.autoscale`:

    AutoscalingStatsRecorder   inside a pipeline replica: turns its load into the custom metrics of
                               `record_autoscaling_stats` (free slots, live streams, idle time, miss rate,
                               refused opens and how long the oldest has waited, slots per replica)
    slo_policy / SLOPolicy     in the Serve controller: AutoscalingContext -> target replicas, through
                               `scheduling.autoscale.Autoscaler` with this deployment as its one pool
    pipeline_deployment_options  per GPU class: accelerator_type / the `weir_gpu_<class>` resource,
                               stream slots from the class's capacity table, the autoscaling config
    pool_size_options          a PipelineSpec's pool size: fixed replicas, or this policy between bounds

Scale-down safety. Serve, not the policy, picks which replica a downscale stops (Ray 2.60's
`DeploymentScheduler._get_replicas_to_stop`: replicas not yet running first, then by node — head node
last, fewest replicas first — newest first; it never looks at load). So three things hold together:
  1. the policy never targets fewer replicas than hold live streams, removes only as many as there are
     replicas idle for `idle_before_removal_s`, and not within `scale_down_cooldown_s` of a scale-up;
  2. admission fills the oldest replicas first (scheduling.admission), so the newest — Serve's first
     pick — are the ones that go idle;
  3. whichever replica Serve stops, no stream is cut or moved: deployments.affinity keeps routing the
     stopping replica's streams to it while Serve's graceful shutdown waits for them (a live stream is an
     ongoing request), up to `graceful_shutdown_timeout_s` = MAX_STREAM_S. A stream still running on a
     stopping replica after MAX_STREAM_S is the one case that is cut.

Hook in the Pipeline deployment (deployments/pipeline.py):

    self._autoscaling = AutoscalingStatsRecorder(spec.max_streams)                # in __init__
    def record_autoscaling_stats(self): return self._autoscaling.stats(self.core.load())

Worked example (headroom 2): a pool of 3 replicas of 4 slots, live streams 4, 1, 0 (free 0, 3, 4), the
idle one idle for 90 s >= 60 s: without it 7 - 4 = 3 free slots >= 2, so the target is 2; with live
4, 3, 0 (free 0, 1, 4) it would leave 5 - 4 = 1 < 2, so the target stays 3; with live 4, 4, 3 (free
1 < 2) the target is 4, before any stream is refused.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

from deployments.config import PipelineSpec
from deployments.messages import PipelineStats
from scheduling.autoscale import AutoscaleConfig, Autoscaler, FleetSignals, PoolSignals, PoolSpec, ReplicaLoad

POLICY_IMPORT_PATH = "deployments.autoscaling:slo_policy"
MAX_STREAM_S = 3600.0
"""Longest a stopping replica waits for its streams to end (graceful_shutdown_timeout_s)."""

# Custom metric names (record_autoscaling_stats keys -> AutoscalingContext.aggregated_metrics keys).
FREE_SLOTS = "weir_free_slots"
LIVE_STREAMS = "weir_live_streams"
IDLE_S = "weir_idle_s"
"""Seconds since the replica's last stream left; -1 while it carries streams."""
MISS_RATE = "weir_deadline_miss_rate"
REFUSED = "weir_refused_opens"
ADMISSION_WAIT_S = "weir_admission_wait_s"
SLOTS = "weir_slots_per_replica"


# ---- in the replica -------------------------------------------------------------------------------------


class AutoscalingStatsRecorder:
    """Per-replica state behind `record_autoscaling_stats`. Clock injected (monotonic seconds).

    The miss rate is deadline misses / frames out since the previous call; refused opens (a router that
    found this pool full calls `note_refused`) count for `refusal_window_s`.
    """

    def __init__(self, slots_per_replica: int, *, refusal_window_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if slots_per_replica < 1:
            raise ValueError(f"slots_per_replica={slots_per_replica} must be >= 1")
        self.slots_per_replica = slots_per_replica
        self.refusal_window_s = refusal_window_s
        self.clock = clock
        self._idle_since: float | None = clock()
        self._prev_out = 0
        self._prev_misses = 0
        self._refusals: deque[float] = deque()

    def note_refused(self) -> None:
        self._refusals.append(self.clock())

    def stats(self, load: PipelineStats) -> dict[str, float]:
        now = self.clock()
        if load.active_streams:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        out = load.frames_out_total - self._prev_out
        misses = load.deadline_misses_total - self._prev_misses
        if out < 0 or misses < 0:  # the core restarted
            out, misses = load.frames_out_total, load.deadline_misses_total
        self._prev_out, self._prev_misses = load.frames_out_total, load.deadline_misses_total
        while self._refusals and now - self._refusals[0] > self.refusal_window_s:
            self._refusals.popleft()
        capacity = min(load.max_streams or self.slots_per_replica, self.slots_per_replica)
        return {
            FREE_SLOTS: float(max(0, capacity - load.active_streams) if load.healthy else 0),
            LIVE_STREAMS: float(load.active_streams),
            IDLE_S: -1.0 if self._idle_since is None else now - self._idle_since,
            MISS_RATE: min(1.0, misses / out) if out > 0 else 0.0,
            REFUSED: float(len(self._refusals)),
            ADMISSION_WAIT_S: now - self._refusals[0] if self._refusals else 0.0,
            SLOTS: float(self.slots_per_replica),
        }


# ---- in the controller ----------------------------------------------------------------------------------


def _metric(ctx, name: str) -> Mapping:
    return (ctx.aggregated_metrics or {}).get(name) or {}


def decide(ctx, config: AutoscaleConfig | None = None) -> tuple[int, dict, str]:
    """(target replicas, policy state, reason) for one deployment from its AutoscalingContext.

    Replicas that have not reported yet (starting) count as ready-to-be with all their slots. The target
    is never below the replicas holding live streams, nor below current during the cooldown after a
    scale-up, and stays in the context's capacity-adjusted [min, max].
    """
    config = config or AutoscaleConfig()
    state = dict(ctx.policy_state or {})
    now = ctx.current_time if ctx.current_time is not None else time.time()
    free, live, idle = _metric(ctx, FREE_SLOTS), _metric(ctx, LIVE_STREAMS), _metric(ctx, IDLE_S)
    miss, refused, wait, slots = (_metric(ctx, m) for m in (MISS_RATE, REFUSED, ADMISSION_WAIT_S, SLOTS))
    slots_per_replica = max(1, round(max(slots.values(), default=state.get("slots_per_replica", 1))))
    state["slots_per_replica"] = slots_per_replica
    loads = []
    running = list(ctx.running_replicas or ())
    for rid in running:
        key = rid if rid in free else getattr(rid, "unique_id", rid)
        if key not in free:  # running but not reported yet: treat as starting
            loads.append(ReplicaLoad(str(key), 0, 0, ready=False))
            continue
        n_live = round(live.get(key, 0.0))
        idle_s = idle.get(key, -1.0)
        loads.append(ReplicaLoad(str(key), n_live, round(free[key]), True,
                                 now - idle_s if n_live == 0 and idle_s >= 0 else None))
    for i in range(max(0, ctx.target_num_replicas - len(running))):  # asked for, still starting
        loads.append(ReplicaLoad(f"starting-{i}", 0, 0, ready=False))
    busy = sum(1 for r in loads if r.live_streams > 0)
    lo, hi = ctx.capacity_adjusted_min_replicas, max(1, ctx.capacity_adjusted_max_replicas)
    pool = PoolSpec(ctx.deployment_name, max_replicas=max(hi, lo), slots_per_replica=slots_per_replica,
                    min_replicas=lo)
    weights = [(miss.get(k, 0.0), live.get(k, 0.0)) for k in free]
    total_live = sum(w for _, w in weights)
    miss_rate = sum(m * w for m, w in weights) / total_live if total_live > 0 else 0.0
    signals = FleetSignals(
        (PoolSignals(ctx.deployment_name, tuple(loads), min(1.0, miss_rate)),),
        waiting_requests=round(max(refused.values(), default=0.0)),
        admission_wait_s=max(wait.values(), default=0.0),
    )
    (d,) = Autoscaler([pool], config).decide(signals, now)
    target, reason = d.target, d.reason
    if target > d.current:
        state["last_scale_up_s"] = now
    elif target < d.current and now - state.get("last_scale_up_s", -math.inf) < config.scale_down_cooldown_s:
        target, reason = d.current, "cooldown after scale-up"
    target = min(max(target, busy, lo), max(hi, busy))
    state["reason"] = reason
    return target, state, reason


def slo_policy(ctx) -> tuple[int, dict]:
    """Serve custom autoscaling policy (`policy_function="deployments.autoscaling:slo_policy"`)."""
    target, state, _ = decide(ctx)
    return target, state


class SLOPolicy:
    """The same policy with tuned AutoscaleConfig fields as `policy_kwargs` (a class policy:
    `policy_function="deployments.autoscaling:SLOPolicy", policy_kwargs={"headroom_slots": 4}`)."""

    def __init__(self, **kwargs: float) -> None:
        known = {f.name for f in fields(AutoscaleConfig)}
        unknown = set(kwargs) - known
        if unknown:
            raise ValueError(f"unknown SLOPolicy kwargs {sorted(unknown)}; known: {sorted(known)}")
        self.config = AutoscaleConfig(**kwargs)

    def __call__(self, ctx) -> tuple[int, dict]:
        target, state, _ = decide(ctx, self.config)
        return target, state


# ---- per GPU class ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuClass:
    """A node type by accelerator, with the stream capacity of one pipeline replica on it."""

    name: str
    """Lowercase class id: the resource `weir_gpu_<name>` and the deployment name suffix."""
    accelerator_type: str
    """Ray's accelerator_type (ray.util.accelerators, e.g. 'H100'); '' for a CPU class (tests)."""
    cost_per_hour: float
    """Price of one replica (one GPU), any consistent unit, >= 0."""
    capacity: tuple[tuple[str, int, int, int, int], ...]
    """(model, height, width, num_steps, stream slots) rows at 16 fps input with 1 s deadlines."""
    startup_s: float = 90.0
    """Replica start-up (weights load, warm-up), >= 0."""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower() or not self.name.replace("_", "").isalnum():
            raise ValueError(f"gpu class name {self.name!r} must be lowercase alphanumeric (e.g. 'h100')")
        if self.cost_per_hour < 0 or self.startup_s < 0:
            raise ValueError(f"{self.name}: cost_per_hour and startup_s must be >= 0")
        for row in self.capacity:
            if row[4] < 0:
                raise ValueError(f"{self.name}: capacity row {row} has negative slots")

    @property
    def resource(self) -> str:
        return f"weir_gpu_{self.name}"

    def slots_for(self, model: str, height: int, width: int, num_steps: int) -> int:
        """Stream slots for this shape: the row of the same model with the fewest pixels and steps that
        cover it (conservative), 0 if none does. Example (H100 rows below): wan-1.3b 480x832 2 steps -> 2;
        wan-1.3b 320x576 1 step -> the 480x832 1-step row's 4 if no smaller row covers it."""
        rows = [r for r in self.capacity
                if r[0] == model and r[1] * r[2] >= height * width and r[3] >= num_steps]
        if not rows:
            return 0
        return min(rows, key=lambda r: (r[1] * r[2], r[3]))[4]


GPU_CLASSES: Mapping[str, GpuClass] = {
    c.name: c for c in (
        # Seed capacities (not yet measured on these GPUs): replace with `weir bench serve` results.
        GpuClass("h200", "H200", 5.0, (("wan-1.3b", 480, 832, 1, 6), ("wan-1.3b", 480, 832, 2, 3),
                                       ("wan-1.3b", 480, 832, 4, 1), ("wan-14b", 480, 832, 1, 1))),
        GpuClass("h100", "H100", 4.0, (("wan-1.3b", 480, 832, 1, 4), ("wan-1.3b", 480, 832, 2, 2),
                                       ("wan-1.3b", 480, 832, 4, 1), ("wan-14b", 480, 832, 1, 1))),
        GpuClass("a100", "A100", 2.0, (("wan-1.3b", 480, 832, 1, 2), ("wan-1.3b", 480, 832, 2, 1))),
        GpuClass("l40s", "L40S", 1.2, (("wan-1.3b", 480, 832, 1, 2), ("wan-1.3b", 480, 832, 2, 1))),
        GpuClass("rtx4090", "RTX", 0.7, (("wan-1.3b", 480, 832, 1, 1), ("wan-1.3b", 320, 576, 2, 1))),
    )
}
"""The profile table of the GPU classes Weir knows. Ray reports every GeForce card as 'RTX'; pin the
4090 nodes with the `weir_gpu_rtx4090` resource instead."""


def gpu_class_of(gpu_type: str) -> GpuClass | None:
    """The class of a PipelineSpec.gpu_type given as class name ('h100') or accelerator type ('H100')."""
    key = gpu_type.lower()
    return GPU_CLASSES.get(key) or next(
        (c for c in GPU_CLASSES.values() if c.accelerator_type.lower() == key), None)


def pipeline_deployment_options(
    gpu: GpuClass,
    spec: PipelineSpec,
    *,
    shape: tuple[int, int, int] = (480, 832, 2),
    min_replicas: int = 0,
    max_replicas: int = 1,
    initial_replicas: int | None = None,
    autoscale: bool = True,
) -> dict:
    """`Pipeline.options(**...)` for one GPU class: name `Pipeline-<class>-<model>`, the class's resource
    (and accelerator_type on CUDA), stream slots from the capacity table for `shape` = (height, width,
    num_steps) (falling back to spec.max_streams when the table has no row), and either the SLO
    autoscaling config or one fixed replica (`autoscale=False`).

    Example: GPU_CLASSES["h100"], a wan-1.3b cuda spec, shape (480, 832, 2) -> resources
    {"weir_gpu_h100": 1}, num_gpus 1, accelerator_type "H100", 2 slots.
    """
    slots = slots_of(gpu, spec, shape)
    actor: dict = {"num_cpus": spec.num_cpus, "resources": {gpu.resource: 1}}
    if spec.device == "cuda":
        actor["num_gpus"] = 1
        if gpu.accelerator_type:
            actor["accelerator_type"] = gpu.accelerator_type
    options: dict = {
        "name": f"Pipeline-{gpu.name}-{spec.model}",
        "ray_actor_options": actor,
        "max_ongoing_requests": max(64, 8 * slots),
        "graceful_shutdown_timeout_s": MAX_STREAM_S,
    }
    if autoscale:
        options["autoscaling_config"] = autoscaling_config(min_replicas, max_replicas, initial_replicas)
    else:
        options["num_replicas"] = 1
    return options


def slots_of(gpu: GpuClass, spec: PipelineSpec, shape: tuple[int, int, int] = (480, 832, 2)) -> int:
    """The stream slots a replica of this class gets (PipelineSpec.max_streams for the class)."""
    return gpu.slots_for(spec.model, *shape) or spec.max_streams


def pool_size_options(spec: PipelineSpec) -> dict:
    """`Pipeline.options(**...)` sizing a spec's pool: `num_replicas` for a fixed pool, or the SLO
    autoscaling config between spec.replicas and spec.max_replicas. Example: replicas 2, max_replicas 0
    -> {"num_replicas": 2}; replicas 1, max_replicas 4 -> an autoscaling_config with min 1, max 4."""
    if spec.max_replicas > spec.replicas:
        return {"autoscaling_config": autoscaling_config(spec.replicas, spec.max_replicas, spec.replicas)}
    return {"num_replicas": spec.replicas}


def autoscaling_config(min_replicas: int, max_replicas: int, initial_replicas: int | None = None) -> dict:
    """Serve autoscaling_config driving `slo_policy`. Serve's own delays stay short (the policy holds the
    idle time and cooldown); metrics averaged over a 10 s window."""
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(f"need 0 <= min_replicas={min_replicas} <= max_replicas={max_replicas}, max >= 1")
    cfg = {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "look_back_period_s": 10.0,
        "upscale_delay_s": 2.0,
        "downscale_delay_s": 30.0,
        "policy": {"policy_function": POLICY_IMPORT_PATH},
    }
    if initial_replicas is not None:
        cfg["initial_replicas"] = initial_replicas
    return cfg
