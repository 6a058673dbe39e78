"""Admission control: which pipeline replica takes a new stream, or why none can. Pure logic.

For each replica that serves the request's shape, the controller predicts, with the steady-state load
model of `scheduling.batching` (per-forward fixed cost A, per-row cost B, per-chunk cost C from the
replica's measured profile), the load and forward time with the new stream added, assigns every stream
the mode the batching scheduler would give it (stream batch unless only step by step meets its deadline),
and checks, with a safety margin:

    * the replica has a free stream slot and is not draining;
    * the row load ρ = Σ λ (n B + C) stays under `max_row_load` (headroom for jitter);
    * the new stream's TTFF and per-frame latency fit its SLO;
    * every stream already there still fits ITS deadline (admitted streams are protected), including
      through the start-ups in progress: a stream's first chunks cost extra device work (its prefill,
      eager calls and CUDA-graph captures; the profile's `startup_s`) that every stream on the replica
      waits through. The start-up work still ahead of the replica's warming streams plus the new
      stream's must fit in the smallest slack of the streams there; otherwise the stream is refused
      with a retry hint of when the warming streams are through (streams join one after the other
      instead of all at once, which would overflow every queue on the replica). A stream of a
      resolution the replica has not run adds the replica's `cold_shape_s` (the new shape's compiles)
      to that start-up and to its TTFF: it goes where that stalls nobody, an idle replica or one
      whose streams have the slack, and a replica already warm for it is preferred by the same test.
      A shape is a (height, width, VAE kind): each kind compiles its own VAE (tens of seconds for the
      Wan VAE, scheduling.priors `COLD_SHAPE_S`).

Warm-ups on demand: when no replica fits and the only thing between the stream and an idle replica is
its cold shape (it fits there once the shape is warm), the refusal names that replica and shape
(`AdmissionRefusedError` details `warm_up_replica`, `warm_up_shape`) with a retry hint of the shape's
`cold_shape_s`: the caller has the replica warm the shape up (deployments.pipeline `warm_shape`) and
the client retries then. Until the replica reports the shape warm (`set_warm_shapes`), its warm-up
counts as start-up work ahead of any stream there, and the shape is not charged twice; one warm-up at
a time per replica; a warm-up the replica neither reports warm nor in progress WARM_UP_REPORT_GRACE_S
after it was asked for is taken as failed (the next such request asks again). A client whose TTFF
allows the compiles is simply admitted cold instead, as above.

Among the replicas that pass, it picks the cheapest GPU class for this stream: the replica's price times
the share of its capacity the stream takes, cost_per_hour * Δρ / max_row_load. Within that class it fills
the replica registered first: streams pack onto the oldest replicas, so as load falls the newest ones go
idle, and those are the ones the orchestrator stops first (Serve stops the newest replica of a node
first), which the autoscaler removes only when idle. (Placing on the replica with the most free slots
instead spreads streams so that, under churn, no replica ever goes idle and a pool never shrinks: the
fleet simulation of scheduling.autoscale shows it.) When none passes it raises
`AdmissionRefusedError` with a retry hint and every replica's numbers; when not even an idle replica of
any known GPU class could meet the SLO it raises `SLOUnattainableError` with the floors.

Affinity: an admitted stream stays on its replica until `finish_stream`.

Worked example (A = 0.052 s, B = 0.006 s, C = 0.008 s; 16 fps streams, n = 2, deadline 1 s, margin 10%):
one stream adds Δρ = 4 * (2 * 0.006 + 0.008) = 0.08. With 8 streams there, a 9th gives ρ = 0.72 and a
forward bound of (0.052 + 0.012 + 0.008) / 0.28 = 0.257 s; in stream-batch mode the latency is
0.1875 + 0.25 + 2 * 0.257 * 1.15 = 1.03 s > 0.9 s (and step by step cannot keep up): refused. With 6
there, ρ = 0.56, forward 0.164 s, latency 0.814 s <= 0.9 s: admitted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scheduling.batching import (
    BatchMode,
    LoadEstimate,
    StreamLoad,
    StreamSpec,
    alone_floor_s,
    estimate_load,
    predicted_latency_s,
    predicted_ttff_s,
)
from scheduling.profile import ProfileBook, ShapeKey, StageProfile
from stages.config import StreamConfig
from stages.errors import (
    AdmissionRefusedError,
    BadRequestError,
    SLOUnattainableError,
    StreamExistsError,
    StreamNotFoundError,
)

STARTUP_CHUNKS = StreamConfig().num_kv_cache_frames + 3
"""Chunks until a new stream runs steady ones (9 with the default 6-frame KV caches): its prefill, the
chunks while its caches fill, and the first two with full caches (a new CUDA-graph key: one eager
call, one capture). The replica counts start-ups with it; the router also takes it as the wall time
of a start-up it has not heard about yet."""

WARM_UP_REPORT_GRACE_S = 10.0
"""A requested warm-up the replica reports neither done nor in progress after this long has failed."""

WarmKey = tuple[int, int, str]
"""A shape a replica compiles for: (height, width, VAE kind)."""


@dataclass(frozen=True)
class StreamRequest:
    """A stream asking to be admitted."""

    stream_id: str
    shape: ShapeKey
    spec: StreamSpec
    resolution: tuple[int, int] | None = None
    """The stream's (height, width); None: the profile's nominal one. A replica that has not run it
    with the stream's VAE kind yet prices its compiles (`ReplicaInfo.cold_shape_s`)."""
    vae: str = ""
    """The stream's VAE kind; '' = the profile's (`shape.vae`)."""

    @property
    def warm_key(self) -> WarmKey | None:
        """(height, width, VAE kind) the stream's replica must have compiled; None: no resolution given."""
        if self.resolution is None:
            return None
        return (int(self.resolution[0]), int(self.resolution[1]), self.vae or self.shape.vae)


@dataclass(frozen=True)
class ReplicaInfo:
    """A pipeline replica as admission sees it (static; its streams are tracked by the controller)."""

    replica_id: str
    gpu_class: str
    """Names the profile (with `shape`) and the autoscaling pool."""
    shape: ShapeKey
    """The model, resolution and VAE this replica serves."""
    num_blocks: int
    """DiT blocks one forward runs (L), >= 1."""
    max_streams: int
    """Stream slots (memory for per-stream caches), >= 1."""
    cost_per_hour: float = 1.0
    """Price of the replica, >= 0, in any consistent unit."""
    cold_shape_s: Mapping[str, float] = field(default_factory=dict)
    """VAE kind -> device time a stream of a shape with that kind the replica has not run costs on top
    of its start-up (the compiles, cuDNN's autotuning and graph captures of the new shapes), >= 0;
    every stream there waits through it (scheduling.priors `cold_shape_s`). A kind not listed costs
    the largest listed; none listed: 0."""

    def cold_s(self, vae: str) -> float:
        """`cold_shape_s` for a shape with VAE kind `vae`."""
        return float(self.cold_shape_s.get(vae, max(self.cold_shape_s.values(), default=0.0)))

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("replica_id must be non-empty")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")
        if self.max_streams < 1:
            raise ValueError(f"max_streams={self.max_streams} must be >= 1")
        if self.cost_per_hour < 0.0:
            raise ValueError(f"cost_per_hour={self.cost_per_hour} must be >= 0")
        if any(not v >= 0.0 for v in self.cold_shape_s.values()):
            raise ValueError(f"cold_shape_s={self.cold_shape_s} must be >= 0")


@dataclass(frozen=True)
class AdmissionConfig:
    """Tunables of admission."""

    latency_margin: float = 0.1
    """Predictions must fit within (1 - margin) of each objective, in [0, 0.9]."""
    max_row_load: float = 0.85
    """Largest row load ρ a replica may carry, in (0, 1)."""
    safety_factor: float = 1.15
    """Forward times are multiplied by this (as in the batching scheduler), in [1, 3]."""
    retry_after_s: float = 5.0
    """Retry hint of a refusal when the caller has no better estimate, in (0, 600]."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.latency_margin <= 0.9:
            raise ValueError(f"latency_margin={self.latency_margin} must be in [0, 0.9]")
        if not 0.0 < self.max_row_load < 1.0:
            raise ValueError(f"max_row_load={self.max_row_load} must be in (0, 1)")
        if not 1.0 <= self.safety_factor <= 3.0:
            raise ValueError(f"safety_factor={self.safety_factor} must be in [1, 3]")
        if not 0.0 < self.retry_after_s <= 600.0:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be in (0, 600]")


@dataclass(frozen=True)
class ReplicaEstimate:
    """What admitting a stream on one replica would do. `reason` is "" when it fits."""

    replica_id: str
    gpu_class: str
    fits: bool
    reason: str
    mode: BatchMode | None
    """The new stream's predicted mode (None when the replica cannot serve the shape)."""
    ttff_s: float
    latency_s: float
    """The new stream's predicted per-frame latency."""
    row_load: float
    """ρ after admission."""
    tick_s: float
    """Forward-time bound after admission."""
    worst_slack_s: float
    """Smallest (deadline * (1 - margin) - predicted latency) over the streams already there; inf if none."""
    cost_per_hour: float
    """The stream's share of the replica's price: price * Δρ / max_row_load."""
    retry_after_s: float | None = None
    """When refused only because streams are starting up there: about when they are through."""
    warm_up_fits: bool = False
    """Refused, but it would fit were its shape warm there: a replica to warm the shape up on."""


@dataclass(frozen=True)
class AdmissionDecision:
    """An admitted stream: where it goes and what it was promised."""

    stream_id: str
    replica_id: str
    mode: BatchMode
    predicted_ttff_s: float
    predicted_latency_s: float
    estimates: tuple[ReplicaEstimate, ...]


@dataclass(frozen=True)
class ReplicaLoadStats:
    """One replica's admitted load."""

    replica_id: str
    gpu_class: str
    live_streams: int
    max_streams: int
    row_load: float
    draining: bool


@dataclass(frozen=True)
class AdmissionStats:
    """Cumulative counters and the current load per replica."""

    admitted: int
    refused: int
    unattainable: int
    live_streams: int
    replicas: tuple[ReplicaLoadStats, ...]


def _warm_key(shape: Sequence) -> WarmKey:
    """A reported shape as a WarmKey."""
    height, width, vae = shape
    return int(height), int(width), str(vae)


def assign_modes(
    profile: StageProfile, num_blocks: int, specs: Sequence[StreamSpec], config: AdmissionConfig
) -> tuple[list[BatchMode], LoadEstimate]:
    """The modes the batching scheduler would settle on under this load, and the resulting estimate:
    stream batch, except streams whose deadline only step by step can meet. Iterates to a fixed point
    (at most 4 rounds; modes change the forward time).

    Example: a 16 fps, 2-step stream with a 0.4 s deadline can never stream-batch (0.1875 + 0.25 > 0.36),
    so it gets STEP_BY_STEP; one with a 1 s deadline gets STREAM_BATCH.
    """
    modes = [BatchMode.STREAM_BATCH] * len(specs)
    estimate = estimate_load(profile, num_blocks, [StreamLoad(s, m) for s, m in zip(specs, modes)])
    for _ in range(4):
        budget = [s.slo.frame_deadline_s * (1.0 - config.latency_margin) for s in specs]
        tick = estimate.tick_s * config.safety_factor
        new = [
            BatchMode.STEP_BY_STEP
            if s.num_steps > 1 and predicted_latency_s(s, BatchMode.STREAM_BATCH, tick) > b
            else BatchMode.STREAM_BATCH
            for s, b in zip(specs, budget)
        ]
        if new == modes:
            break
        modes = new
        estimate = estimate_load(profile, num_blocks, [StreamLoad(s, m) for s, m in zip(specs, modes)])
    return modes, estimate


@dataclass
class _Replica:
    info: ReplicaInfo
    streams: dict[str, StreamSpec]
    draining: bool = False
    warming: dict[str, Warming] = field(default_factory=dict)
    """Streams still in their start-up (reported by the replica, or admitted since its last report)."""
    closing: int = 0
    """Streams the replica reported still running that the controller no longer counts (released,
    still closing there): they hold slots until the replica lets them go."""
    warm_shapes: set[WarmKey] | None = None
    """Shapes the replica has run (reported, plus those admitted since); None: not reported, taken as
    warm for every shape."""
    shape_warmups: dict[WarmKey, tuple[float, float]] = field(default_factory=dict)
    """Warm-ups asked of the replica and not yet reported done: shape -> (asked at, seconds)."""

    def is_cold(self, key: WarmKey | None) -> bool:
        """Whether a stream of shape `key` would be the replica's first of it (never for None)."""
        return key is not None and self.warm_shapes is not None and key not in self.warm_shapes

    def warm_up_left_s(self, now: float | None) -> float:
        """Device work left of the warm-ups in progress (their whole estimate when `now` is None)."""
        return sum(seconds if now is None else max(0.0, asked + seconds - now)
                   for asked, seconds in self.shape_warmups.values())


@dataclass(frozen=True)
class Warming:
    """A stream still in its start-up: device work and wall time until it runs steady chunks only.

    Example: Warming(work_s=0.3, wall_s=1.2) - 0.3 s of start-up work left, done in about 1.2 s.
    """

    work_s: float
    wall_s: float


class AdmissionController:
    """Places streams on replicas (module docstring). State: the replicas and the streams on each.

    Example: with replicas "h100-0" (price 4) and "l40-0" (price 1) both able to meet a stream's SLO,
    admit() returns the one with the smaller price * Δρ; with neither able, it raises
    AdmissionRefusedError(retry_after_s=...) whose details list both estimates. With "h-0" (full), "h-1"
    (1 of 4 slots used) and "h-2" (idle) of one class, registered in that order, it returns "h-1".
    """

    def __init__(self, profiles: ProfileBook, config: AdmissionConfig | None = None) -> None:
        self.profiles = profiles
        self.config = config or AdmissionConfig()
        self._replicas: dict[str, _Replica] = {}
        self._placement: dict[str, str] = {}
        self._admitted = 0
        self._refused = 0
        self._unattainable = 0

    # -- replicas -----------------------------------------------------------------------------------

    def add_replica(self, info: ReplicaInfo) -> None:
        """Register a ready replica. Raises ValueError if the id exists or no profile covers it."""
        if info.replica_id in self._replicas:
            raise ValueError(f"replica {info.replica_id!r} is already registered")
        self.profiles.get(info.gpu_class, info.shape)  # KeyError naming the missing profile
        self._replicas[info.replica_id] = _Replica(info, {})

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica. Raises ValueError if it still carries live streams (drain it first)."""
        replica = self._replica(replica_id)
        if replica.streams:
            raise ValueError(
                f"replica {replica_id!r} still carries {len(replica.streams)} live streams; drain it first"
            )
        del self._replicas[replica_id]

    def set_draining(self, replica_id: str, draining: bool = True) -> None:
        """A draining replica keeps its streams but takes no new ones."""
        self._replica(replica_id).draining = draining

    def replicas(self) -> tuple[ReplicaInfo, ...]:
        """The registered replicas."""
        return tuple(r.info for r in self._replicas.values())

    def streams_on(self, replica_id: str) -> tuple[str, ...]:
        """Ids of the live streams on a replica."""
        return tuple(self._replica(replica_id).streams)

    def replica_of(self, stream_id: str) -> str:
        """The replica a live stream is pinned to. Raises StreamNotFoundError."""
        try:
            return self._placement[stream_id]
        except KeyError:
            raise StreamNotFoundError(f"stream {stream_id!r} is not admitted", stream_id=stream_id) from None

    # -- admission ----------------------------------------------------------------------------------

    def estimate(self, request: StreamRequest, now: float | None = None) -> tuple[ReplicaEstimate, ...]:
        """Every replica's estimate for the request, without changing anything (`now` None: warm-ups
        in progress count whole)."""
        return tuple(self._estimate(r, request, now) for r in self._replicas.values())

    def admit(
        self, request: StreamRequest, now: float, retry_after_s: float | None = None
    ) -> AdmissionDecision:
        """Admit the stream on the best fitting replica, or raise.

        `retry_after_s` is the caller's estimate of when capacity appears (e.g. a replica that is
        starting); the config's default otherwise. Raises StreamExistsError for a live id,
        BadRequestError when no GPU class has a profile for the shape, SLOUnattainableError when even an
        idle replica of any profiled class misses the SLO, AdmissionRefusedError otherwise.
        """
        if request.stream_id in self._placement:
            raise StreamExistsError(
                f"stream {request.stream_id!r} is already admitted", stream_id=request.stream_id
            )
        self._check_attainable(request)
        estimates = self.estimate(request, now)
        fitting = [e for e in estimates if e.fits]
        if not fitting:
            self._refused += 1
            hint = self.config.retry_after_s if retry_after_s is None else retry_after_s
            waits = [e.retry_after_s for e in estimates if e.retry_after_s is not None]
            if waits and len(waits) == len(estimates):  # every replica is only busy starting streams
                hint = min(hint, max(0.5, min(waits)))
            reasons = "; ".join(f"{e.replica_id}: {e.reason}" for e in estimates) or "no replica serves it"
            warming_it = [r.warm_up_left_s(now) for r in self._replicas.values()
                          if request.warm_key in r.shape_warmups]
            if warming_it:  # its shape is warming up somewhere: retry when that is through
                hint = max(hint, min(warming_it))
            warm_up = None if warming_it else self._ask_warm_up(request, estimates, now)
            if warm_up is not None:
                replica_id, seconds = warm_up
                h, w, vae = request.warm_key
                raise AdmissionRefusedError(
                    f"no replica can take stream {request.stream_id!r} within its SLO now ({reasons}); "
                    f"replica {replica_id} warms {h}x{w} ({vae} VAE) up for it: retry in about {seconds:.0f} s",
                    retry_after_s=max(hint, seconds), estimates=estimates,
                    warm_up_replica=replica_id, warm_up_shape=request.warm_key,
                )
            raise AdmissionRefusedError(
                f"no replica can take stream {request.stream_id!r} within its SLO now ({reasons})",
                retry_after_s=hint,
                estimates=estimates,
            )
        best = min(fitting, key=self._placement_key(fitting))
        replica = self._replicas[best.replica_id]
        replica.streams[request.stream_id] = request.spec
        profile = self.profiles.get(replica.info.gpu_class, replica.info.shape)
        startup_s = self._startup_s(replica, request, profile)
        if replica.is_cold(request.warm_key):
            replica.warm_shapes.add(request.warm_key)
        replica.warming[request.stream_id] = Warming(startup_s, STARTUP_CHUNKS * request.spec.chunk_period_s)
        self._placement[request.stream_id] = best.replica_id
        self._admitted += 1
        assert best.mode is not None
        return AdmissionDecision(
            request.stream_id, best.replica_id, best.mode, best.ttff_s, best.latency_s, estimates
        )

    def adopt(self, replica_id: str, stream_id: str, spec: StreamSpec) -> bool:
        """Count a stream that already runs on `replica_id` without admitting it (a restarted router
        learning its replicas' streams from their reports): no SLO check, the replica's load simply
        includes it from now on. Returns False, changing nothing, when the id is already placed.
        Raises ValueError for an unknown replica."""
        replica = self._replica(replica_id)
        if stream_id in self._placement:
            return False
        replica.streams[stream_id] = spec
        self._placement[stream_id] = replica_id
        return True

    def _placement_key(self, fitting: Sequence[ReplicaEstimate]):
        """Sort key of fitting estimates (module docstring): the class's best price, then registration
        order."""
        class_cost: dict[str, float] = {}
        for e in fitting:
            class_cost[e.gpu_class] = min(class_cost.get(e.gpu_class, e.cost_per_hour), e.cost_per_hour)
        order = {rid: i for i, rid in enumerate(self._replicas)}
        return lambda e: (class_cost[e.gpu_class], order[e.replica_id])

    def finish_stream(self, stream_id: str) -> None:
        """Release a stream's slot. Raises StreamNotFoundError."""
        replica_id = self.replica_of(stream_id)
        del self._placement[stream_id]
        del self._replicas[replica_id].streams[stream_id]
        self._replicas[replica_id].warming.pop(stream_id, None)

    def set_warming(self, replica_id: str, warming: Mapping[str, Warming], *, keep: Sequence[str] = ()) -> None:
        """The replica's streams still in their start-up, as it reported them; the streams in `keep`
        (admitted, possibly after the report was made) that the report does not name keep the estimate
        they were admitted with. Raises ValueError for an unknown replica."""
        replica = self._replica(replica_id)
        kept = {sid: replica.warming[sid] for sid in keep if sid in replica.warming and sid not in warming}
        replica.warming = {sid: w for sid, w in warming.items() if sid in replica.streams} | kept

    def set_closing(self, replica_id: str, count: int) -> None:
        """How many released streams the replica last reported still running (they keep their slots
        until it closes them). Raises ValueError for an unknown replica."""
        self._replica(replica_id).closing = max(0, count)

    def set_warm_shapes(self, replica_id: str, shapes: Sequence[WarmKey], *, warming: Sequence[WarmKey] = (),
                        now: float | None = None) -> None:
        """The shapes the replica reports it has run, added to those known: a pipeline never forgets a
        shape, and one admitted there since the report is being compiled by its stream. `warming`:
        the shapes it reports warming up; a warm-up asked of it that it reports neither done nor in
        progress WARM_UP_REPORT_GRACE_S after the asking (`now`) is dropped (module docstring).
        Raises ValueError for an unknown replica."""
        replica = self._replica(replica_id)
        admitted = replica.warm_shapes or set()
        replica.warm_shapes = {_warm_key(s) for s in shapes} | admitted
        in_progress = {_warm_key(s) for s in warming}
        for key, (asked, seconds) in list(replica.shape_warmups.items()):
            done = key in replica.warm_shapes
            lost = key not in in_progress and now is not None and now - asked > WARM_UP_REPORT_GRACE_S
            if done or lost:
                del replica.shape_warmups[key]
            elif key in in_progress and now is not None:  # running past its estimate: a second more at least
                replica.shape_warmups[key] = (asked, max(seconds, now - asked + 1.0))

    def warm_ups_on(self, replica_id: str) -> dict[WarmKey, tuple[float, float]]:
        """The warm-ups asked of the replica and not reported done: shape -> (asked at, seconds)."""
        return dict(self._replica(replica_id).shape_warmups)

    def cancel_warm_up(self, replica_id: str, key: WarmKey) -> None:
        """Forget a warm-up the caller could not hand to the replica."""
        self._replica(replica_id).shape_warmups.pop(_warm_key(key), None)

    def _ask_warm_up(self, request: StreamRequest, estimates: Sequence[ReplicaEstimate],
                     now: float) -> tuple[str, float] | None:
        """The replica to warm the refused request's shape up on, and the seconds it takes, recorded as
        in progress there (module docstring, "Warm-ups on demand"); None when there is none: no
        resolution given, or no idle replica where it would then fit (of those, the cheapest GPU
        class). The caller asks only when no warm-up of the shape is in progress anywhere."""
        key = request.warm_key
        if key is None:
            return None
        idle = [self._replicas[e.replica_id] for e in estimates if e.warm_up_fits]
        idle = [r for r in idle if not (r.streams or r.warming or r.closing or r.shape_warmups or r.draining)]
        if not idle:
            return None
        replica = min(idle, key=lambda r: r.info.cost_per_hour)  # the cheapest; the first registered of those
        seconds = replica.info.cold_s(key[2])
        replica.shape_warmups[key] = (now, seconds)
        return replica.info.replica_id, seconds

    def warming_on(self, replica_id: str) -> dict[str, Warming]:
        """The replica's streams still in their start-up."""
        return dict(self._replica(replica_id).warming)

    def free_slots(self, replica_id: str, template: StreamSpec) -> int:
        """How many more streams like `template` the replica could take now (0 when draining).

        Example: a replica with 6 of the worked example's streams (module docstring) and 16 slots has 2
        free slots: a 7th (latency 0.814 s) and an 8th (0.898 s) fit the 0.9 s budget, a 9th does not.
        """
        replica = self._replica(replica_id)
        if replica.draining:
            return 0
        specs = list(replica.streams.values())
        free = 0
        while len(specs) + replica.closing + free < replica.info.max_streams:
            if self._violations(replica.info, [*specs, *([template] * (free + 1))]):
                break
            free += 1
        return free

    def check_replica(self, replica_id: str) -> list[str]:
        """The live streams whose SLO the replica's current load no longer meets (predicted), e.g. after
        its profile slowed down. Empty when all is well."""
        replica = self._replica(replica_id)
        ids = list(replica.streams)
        bad = self._violations(replica.info, [replica.streams[i] for i in ids])
        return [ids[i] for i in bad]

    def stats(self) -> AdmissionStats:
        """Counters and per-replica load."""
        rows = []
        for r in self._replicas.values():
            profile = self.profiles.get(r.info.gpu_class, r.info.shape)
            _, est = assign_modes(profile, r.info.num_blocks, list(r.streams.values()), self.config)
            rows.append(
                ReplicaLoadStats(
                    r.info.replica_id,
                    r.info.gpu_class,
                    len(r.streams),
                    r.info.max_streams,
                    est.row_load,
                    r.draining,
                )
            )
        return AdmissionStats(
            self._admitted, self._refused, self._unattainable, len(self._placement), tuple(rows)
        )

    # -- internals ----------------------------------------------------------------------------------

    def _replica(self, replica_id: str) -> _Replica:
        try:
            return self._replicas[replica_id]
        except KeyError:
            raise ValueError(f"unknown replica {replica_id!r}") from None

    def _violations(self, info: ReplicaInfo, specs: Sequence[StreamSpec]) -> list[int]:
        """Indices of streams whose deadline the replica misses under this load (all of them when the
        row load exceeds the cap)."""
        profile = self.profiles.get(info.gpu_class, info.shape)
        modes, est = assign_modes(profile, info.num_blocks, specs, self.config)
        if est.row_load > self.config.max_row_load or not est.keeps_up:
            return list(range(len(specs)))
        tick = est.tick_s * self.config.safety_factor
        margin = 1.0 - self.config.latency_margin
        return [
            i
            for i, (s, m) in enumerate(zip(specs, modes))
            if predicted_latency_s(s, m, tick) > s.slo.frame_deadline_s * margin
        ]

    @staticmethod
    def _cold_s(replica: _Replica, request: StreamRequest) -> float:
        """The replica's cold_shape_s when the stream's shape is new there, else 0 (also while it warms
        the shape up: that work counts as the warm-up's, `_Replica.warm_up_left_s`)."""
        key = request.warm_key
        if not replica.is_cold(key) or key in replica.shape_warmups:
            return 0.0
        return replica.info.cold_s(key[2])

    @classmethod
    def _startup_s(cls, replica: _Replica, request: StreamRequest, profile: StageProfile) -> float:
        """The device work of the stream's start-up on the replica: the profile's, scaled to its DiT
        work, plus the new resolution's compiles (`_cold_s`)."""
        return profile.startup_s() * request.spec.dit_scale + cls._cold_s(replica, request)

    def _estimate(self, replica: _Replica, request: StreamRequest, now: float | None = None) -> ReplicaEstimate:
        info, spec, shape = replica.info, request.spec, request.shape
        inf = float("inf")

        def refuse(reason: str, retry_after_s: float | None = None, warm_up_fits: bool = False,
                   **numbers: float) -> ReplicaEstimate:
            values = {"ttff_s": inf, "latency_s": inf, "row_load": inf, "tick_s": inf, "worst_slack_s": -inf}
            values.update(numbers)
            return ReplicaEstimate(
                info.replica_id, info.gpu_class, False, reason, None, cost_per_hour=inf,
                retry_after_s=retry_after_s, warm_up_fits=warm_up_fits, **values
            )

        if info.shape != shape:
            return refuse(
                f"serves {info.shape.model} {info.shape.height}x{info.shape.width} {info.shape.vae}"
            )
        if replica.draining:
            return refuse("draining")
        if len(replica.streams) + replica.closing >= info.max_streams:
            closing = f" ({replica.closing} by streams still closing)" if replica.closing else ""
            return refuse(f"all {info.max_streams} stream slots taken{closing}")
        profile = self.profiles.get(info.gpu_class, info.shape)
        existing = list(replica.streams.values())
        _, before = assign_modes(profile, info.num_blocks, existing, self.config)
        modes, after = assign_modes(profile, info.num_blocks, [*existing, spec], self.config)
        tick = after.tick_s * self.config.safety_factor
        margin = 1.0 - self.config.latency_margin
        mode = modes[-1]
        ttff = predicted_ttff_s(spec, tick)
        latency = predicted_latency_s(spec, mode, tick)
        slacks = [
            s.slo.frame_deadline_s * margin - predicted_latency_s(s, m, tick)
            for s, m in zip(existing, modes[:-1])
        ]
        worst = min(slacks, default=inf)
        warming = replica.warming.values()
        # start-up work the replica still has to do: its streams' and its shape warm-ups'
        warm_up_s = replica.warm_up_left_s(now)
        ahead_s = sum(w.work_s for w in warming) + warm_up_s
        # a shape new to the replica: its compiles, which every stream there waits through
        cold_s = self._cold_s(replica, request)
        ttff += ahead_s + cold_s
        startup_s = ahead_s + self._startup_s(replica, request, profile)
        numbers = {
            "ttff_s": ttff,
            "latency_s": latency,
            "row_load": after.row_load,
            "tick_s": after.tick_s,
            "worst_slack_s": worst,
        }
        reason = ""
        if after.row_load > self.config.max_row_load:
            reason = f"row load {after.row_load:.2f} would exceed {self.config.max_row_load:.2f}"
        elif not after.keeps_up:
            reason = f"forwards of {after.tick_s * 1e3:.0f} ms too slow for step-by-step streams"
        elif ttff > spec.slo.ttff_s * margin:
            reason = f"TTFF {ttff:.3f}s > {spec.slo.ttff_s * margin:.3f}s"
            if cold_s or warm_up_s:
                reason += f" (of which {cold_s + warm_up_s:.1f}s compiling shapes)"
                warm_fits = (ttff - cold_s - warm_up_s <= spec.slo.ttff_s * margin
                             and latency <= spec.slo.frame_deadline_s * margin and worst >= startup_s)
                if warm_fits:  # only the compiles stand in the way: wait for a warm-up, or ask for one
                    return refuse(reason, retry_after_s=warm_up_s or None, warm_up_fits=bool(cold_s), **numbers)
        elif latency > spec.slo.frame_deadline_s * margin:
            reason = f"latency {latency:.3f}s > {spec.slo.frame_deadline_s * margin:.3f}s"
        elif worst < 0.0:
            reason = f"an admitted stream would miss its deadline by {-worst:.3f}s"
        elif worst < startup_s:
            starting = f"with {len(warming)} stream(s) still starting up, " if warming else ""
            reason = (f"{starting}its start-up ({startup_s:.2f}s of device work in all) would exceed an admitted "
                      f"stream's slack of {worst:.2f}s")
            return refuse(reason, retry_after_s=max((w.wall_s for w in warming), default=0.0) or None,
                          **numbers)
        if reason:
            return refuse(reason, **numbers)
        share = info.cost_per_hour * (after.row_load - before.row_load) / self.config.max_row_load
        return ReplicaEstimate(
            info.replica_id, info.gpu_class, True, "", mode, cost_per_hour=share, **numbers
        )

    def _blocks_of(self, model: str) -> int | None:
        for replica in self._replicas.values():
            if replica.info.shape.model == model:
                return replica.info.num_blocks
        return None

    def _check_attainable(self, request: StreamRequest) -> None:
        """Raise SLOUnattainableError when no profiled GPU class could meet the SLO even idle."""
        shape, spec = request.shape, request.spec
        classes = self.profiles.gpu_classes(shape)
        if not classes:
            raise BadRequestError(
                f"no GPU class is profiled for {shape.model} {shape.height}x{shape.width} {shape.vae}",
                shape=shape,
            )
        num_blocks = self._blocks_of(shape.model)
        if num_blocks is None:
            return  # no replica for the model yet: admission refuses with a retry hint instead
        floors: dict[str, tuple[float, float, float]] = {}
        margin = 1.0 - self.config.latency_margin
        for gpu_class in classes:
            profile = self.profiles.get(gpu_class, shape)
            ttff, latency = alone_floor_s(spec, profile, num_blocks)
            load = estimate_load(profile, num_blocks, [StreamLoad(spec, BatchMode.STREAM_BATCH)]).row_load
            floors[gpu_class] = (ttff, latency, load)
            if (
                ttff <= spec.slo.ttff_s * margin
                and latency <= spec.slo.frame_deadline_s * margin
                and load <= self.config.max_row_load
            ):
                return
        self._unattainable += 1
        best = min(floors.items(), key=lambda kv: kv[1])
        raise SLOUnattainableError(
            f"stream {request.stream_id!r}: even an idle {best[0]} needs TTFF >= {best[1][0]:.3f}s and "
            f"latency >= {best[1][1]:.3f}s (asked {spec.slo.ttff_s:.3f}s / {spec.slo.frame_deadline_s:.3f}s "
            f"with {self.config.latency_margin:.0%} margin) at row load {best[1][2]:.2f}",
            floors=floors,
        )


def replica_capacity(
    profile: StageProfile,
    num_blocks: int,
    max_streams: int,
    template: StreamSpec,
    config: AdmissionConfig | None = None,
) -> int:
    """How many `template` streams an empty replica with this profile admits (the autoscaler's
    slots_per_replica). Example: the module docstring's profile with 16 slots and 16 fps, 2-step, 1 s
    streams -> 8 (the 9th misses its latency budget)."""
    shape = profile.shape
    controller = AdmissionController(ProfileBook([profile]), config)
    controller.add_replica(ReplicaInfo("probe", profile.gpu_class, shape, num_blocks, max_streams))
    return controller.free_slots("probe", template)


def fleet_free_slots(controller: AdmissionController, template: StreamSpec) -> Mapping[str, int]:
    """Free slots for `template` streams per replica id (see AdmissionController.free_slots)."""
    return {
        info.replica_id: controller.free_slots(info.replica_id, template) for info in controller.replicas()
    }
