"""Autoscaling decisions from SLO slack, per pool of pipeline replicas (one pool per GPU class). Pure logic.

Signals: free stream slots per replica (how many more streams of a template shape admission would take,
`AdmissionController.free_slots`), requests waiting for admission and how long the oldest has waited,
and the measured deadline-miss rate per pool. Rules, evaluated by `Autoscaler.decide(signals, now)`:

    scale up    free slots (ready replicas, plus the slots of replicas still starting) must cover the
                waiting requests plus `headroom_slots`, so capacity is added BEFORE streams are refused;
                the deficit goes to the pool with the lowest price per slot that is below its maximum,
                spilling to the next. A pool whose miss rate exceeds `max_miss_rate` gets one more replica.
    scale down  only replicas with no live stream, idle for `idle_before_removal_s`, not within
                `scale_down_cooldown_s` of a scale-up, while the remaining free slots still cover the
                waiting requests plus the headroom, never below a pool's minimum; the priciest first.

Worked example: headroom 2, a pool of 8-slot replicas at price 4 (0.5 per slot) and one of 3-slot
replicas at price 1 (0.33 per slot). 4 free slots and 5 waiting requests: deficit 2 + 5 - 4 = 3 ->
one more 3-slot replica (the cheaper slot). 20 free slots, nothing waiting, a 3-slot replica idle for
long enough: 20 - 3 = 17 >= 2, so it may go.

`FleetSimulator` ramps synthetic load over pools of different GPU classes through admission and the
autoscaler, on a simulated clock, with the orchestrator (not the autoscaler) choosing which replica a
scale-down stops, as Serve does; it reports SLO violations, any attempt to drop a live stream, and how
often a replica had to drain streams because it was stopped while busy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from scheduling.admission import AdmissionConfig, AdmissionController, ReplicaInfo, StreamRequest
from scheduling.batching import StreamSpec
from scheduling.profile import ProfileBook, ShapeKey, StageProfile
from stages.errors import AdmissionRefusedError


@dataclass(frozen=True)
class PoolSpec:
    """A pool of identical replicas (one GPU class)."""

    gpu_class: str
    max_replicas: int
    """Upper bound on replicas (quota), >= min_replicas."""
    slots_per_replica: int
    """Template streams one idle replica takes (admission's free_slots on an empty replica), >= 1."""
    min_replicas: int = 0
    """Replicas always kept, >= 0."""
    cost_per_hour: float = 1.0
    """Price of one replica, >= 0."""
    startup_s: float = 60.0
    """Time from asking for a replica to it taking streams, >= 0."""

    def __post_init__(self) -> None:
        if not self.gpu_class:
            raise ValueError("gpu_class must be non-empty")
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas={self.min_replicas} must be >= 0")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"max_replicas={self.max_replicas} must be >= max(1, min_replicas={self.min_replicas})"
            )
        if self.slots_per_replica < 1:
            raise ValueError(f"slots_per_replica={self.slots_per_replica} must be >= 1")
        if self.cost_per_hour < 0.0:
            raise ValueError(f"cost_per_hour={self.cost_per_hour} must be >= 0")
        if self.startup_s < 0.0:
            raise ValueError(f"startup_s={self.startup_s} must be >= 0")

    @property
    def cost_per_slot(self) -> float:
        """Price per template stream: cost_per_hour / slots_per_replica (4 / 8 -> 0.5)."""
        return self.cost_per_hour / self.slots_per_replica


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's state for the autoscaler."""

    replica_id: str
    live_streams: int
    free_slots: int
    """More template streams admission would put here now (0 when draining)."""
    ready: bool = True
    """False while the replica is starting (its slots count as slots_per_replica)."""
    idle_since_s: float | None = None
    """When its last stream left; None while it carries streams."""


@dataclass(frozen=True)
class PoolSignals:
    """A pool's replicas and measured misses."""

    gpu_class: str
    replicas: tuple[ReplicaLoad, ...] = ()
    deadline_miss_rate: float = 0.0
    """Fraction of frames that missed their deadline over the last interval, in [0, 1]."""


@dataclass(frozen=True)
class FleetSignals:
    """Everything one decision looks at."""

    pools: tuple[PoolSignals, ...]
    waiting_requests: int = 0
    """Distinct requests refused and retrying (demand that found no slot)."""
    admission_wait_s: float = 0.0
    """How long the oldest waiting request has waited."""


@dataclass(frozen=True)
class AutoscaleConfig:
    """Tunables of the autoscaler."""

    headroom_slots: int = 2
    """Free template-stream slots kept beyond the waiting demand, >= 0."""
    max_miss_rate: float = 0.01
    """A pool missing more deadlines than this gets a replica, in [0, 1]."""
    max_admission_wait_s: float = 2.0
    """Waiting longer than this counts one extra replica of demand, > 0."""
    idle_before_removal_s: float = 60.0
    """A replica must have had no stream this long before it may go, >= 0."""
    scale_down_cooldown_s: float = 120.0
    """No removal within this long after a scale-up, >= 0."""

    def __post_init__(self) -> None:
        if self.headroom_slots < 0:
            raise ValueError(f"headroom_slots={self.headroom_slots} must be >= 0")
        if not 0.0 <= self.max_miss_rate <= 1.0:
            raise ValueError(f"max_miss_rate={self.max_miss_rate} must be in [0, 1]")
        if self.max_admission_wait_s <= 0.0:
            raise ValueError(f"max_admission_wait_s={self.max_admission_wait_s} must be > 0")
        if self.idle_before_removal_s < 0.0 or self.scale_down_cooldown_s < 0.0:
            raise ValueError("idle_before_removal_s and scale_down_cooldown_s must be >= 0")


@dataclass(frozen=True)
class PoolDecision:
    """What to do with one pool: reach `target` replicas; `remove` names the idle ones that may go."""

    gpu_class: str
    current: int
    """Replicas now, ready or starting."""
    target: int
    remove: tuple[str, ...]
    reason: str


class Autoscaler:
    """Pool targets from SLO slack (module docstring). Stateful only in the time of the last scale-up."""

    def __init__(self, pools: Sequence[PoolSpec], config: AutoscaleConfig | None = None) -> None:
        names = [p.gpu_class for p in pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool gpu classes must be unique, got {names}")
        self.pools = {p.gpu_class: p for p in pools}
        self.config = config or AutoscaleConfig()
        self._last_scale_up_s = -math.inf

    def decide(self, signals: FleetSignals, now: float) -> tuple[PoolDecision, ...]:
        """One decision per pool (module docstring). Never lists a replica that carries a stream."""
        by_class = {p.gpu_class: p for p in signals.pools}
        unknown = set(by_class) - set(self.pools)
        if unknown:
            raise ValueError(f"signals for unknown pools {sorted(unknown)}")
        current = {g: len(by_class[g].replicas) if g in by_class else 0 for g in self.pools}
        free = sum(
            r.free_slots if r.ready else self.pools[p.gpu_class].slots_per_replica
            for p in signals.pools
            for r in p.replicas
        )
        cfg = self.config
        demand = signals.waiting_requests + cfg.headroom_slots
        if signals.waiting_requests and signals.admission_wait_s > cfg.max_admission_wait_s:
            demand += min(s.slots_per_replica for s in self.pools.values())
        add = dict.fromkeys(self.pools, 0)
        reasons: dict[str, list[str]] = {g: [] for g in self.pools}
        for g, spec in self.pools.items():  # minimums first
            if current[g] < spec.min_replicas:
                add[g] = spec.min_replicas - current[g]
                free += add[g] * spec.slots_per_replica
                reasons[g].append(f"below minimum {spec.min_replicas}")
        deficit = demand - free
        for spec in sorted(self.pools.values(), key=lambda s: (s.cost_per_slot, s.gpu_class)):
            if deficit <= 0:
                break
            room = spec.max_replicas - current[spec.gpu_class] - add[spec.gpu_class]
            n = min(room, math.ceil(deficit / spec.slots_per_replica))
            if n > 0:
                add[spec.gpu_class] += n
                deficit -= n * spec.slots_per_replica
                reasons[spec.gpu_class].append(f"free slots {free} < demand {demand}")
        for p in signals.pools:
            spec = self.pools[p.gpu_class]
            if (
                p.deadline_miss_rate > cfg.max_miss_rate
                and current[p.gpu_class] + add[p.gpu_class] < spec.max_replicas
            ):
                if add[p.gpu_class] == 0:
                    add[p.gpu_class] = 1
                    reasons[p.gpu_class].append(
                        f"miss rate {p.deadline_miss_rate:.3f} > {cfg.max_miss_rate:.3f}"
                    )
        if any(add.values()):
            self._last_scale_up_s = now
        remove: dict[str, list[str]] = {g: [] for g in self.pools}
        if not any(add.values()) and now - self._last_scale_up_s >= cfg.scale_down_cooldown_s:
            surplus = free - demand
            missing = {p.gpu_class for p in signals.pools if p.deadline_miss_rate > cfg.max_miss_rate}
            for spec in sorted(self.pools.values(), key=lambda s: (-s.cost_per_slot, s.gpu_class)):
                if spec.gpu_class not in by_class or spec.gpu_class in missing:
                    continue
                keep = current[spec.gpu_class]
                idle = [
                    r
                    for r in by_class[spec.gpu_class].replicas
                    if r.ready
                    and r.live_streams == 0
                    and r.idle_since_s is not None
                    and now - r.idle_since_s >= cfg.idle_before_removal_s
                ]
                for r in sorted(idle, key=lambda r: (r.idle_since_s, r.replica_id)):
                    if keep <= spec.min_replicas or surplus - r.free_slots < 0:
                        break
                    remove[spec.gpu_class].append(r.replica_id)
                    surplus -= r.free_slots
                    keep -= 1
                if remove[spec.gpu_class]:
                    reasons[spec.gpu_class].append(
                        f"{len(remove[spec.gpu_class])} idle replicas beyond headroom"
                    )
        return tuple(
            PoolDecision(
                g,
                current[g],
                current[g] + add[g] - len(remove[g]),
                tuple(remove[g]),
                "; ".join(reasons[g]) or "steady",
            )
            for g in sorted(self.pools)
        )


# ---------------------------------------------------------------------------------------------------
# Simulation


@dataclass(frozen=True)
class SimPool:
    """A simulated pool: its spec, the profile its GPUs run at, and per-replica constants."""

    spec: PoolSpec
    profile: StageProfile
    num_blocks: int
    max_streams: int
    initial_replicas: int = 0


@dataclass(frozen=True)
class SimReport:
    """Outcome of a FleetSimulator run."""

    admitted: int
    refusals: int
    """Refused admission attempts (a request may be refused several times)."""
    ever_waited: int
    """Requests refused at least once."""
    max_live_streams: int
    max_wait_s: float
    slo_violations: int
    """(step, stream) pairs where a live stream's replica no longer met its predicted SLO."""
    dropped_live_streams: int
    """Removals the autoscaler asked for on replicas that carried streams (must be 0)."""
    drained_busy_replicas: int
    """Replicas the orchestrator chose to stop while they carried streams: they took no new stream and
    went when their last stream ended (no stream is ever cut); few when placement leaves the newest
    replicas idle."""
    peak_replicas: Mapping[str, int]
    final_replicas: Mapping[str, int]
    timeline: tuple[tuple[float, int, Mapping[str, int]], ...]
    """(time, live streams, replicas per class) after each step; draining replicas included."""


@dataclass
class _SimReplica:
    info: ReplicaInfo
    ready_at_s: float
    ready: bool = False
    idle_since_s: float | None = None
    draining: bool = False


@dataclass
class _Waiting:
    request: StreamRequest
    since_s: float
    next_try_s: float
    refused: bool = False


@dataclass
class _SimState:
    replicas: dict[str, _SimReplica] = field(default_factory=dict)
    """In start order (the orchestrator stops the newest first)."""
    live: dict[str, float] = field(default_factory=dict)
    """Live stream id -> when it was admitted, oldest first."""
    waiting: list[_Waiting] = field(default_factory=list)
    next_id: int = 0
    drained_busy: int = 0


class FleetSimulator:
    """Synthetic load over pools of different GPU classes, through admission and autoscaling.

    Time is simulated: `run` starts at `start_s` and advances by `step_s`; nothing reads a clock. Each
    step: starting replicas whose start-up elapsed become ready; streams are opened (as requests that
    retry after refusals, honouring the retry hint) or closed (oldest first, and any older than
    `stream_lifetime_s`) to follow `target_streams(t)`; every `decide_every_s` the autoscaler decides and
    the orchestrator applies the targets the way Serve does: it adds replicas, and it picks the replicas
    to stop itself (starting ones first, then the newest), whatever the autoscaler would have removed; a
    picked replica that carries streams drains (no new stream, removed when its last stream ends); finally
    every replica's live streams are checked against their SLO.

    Example: pools H100 (8 slots each, price 4) and L40 (3 slots, price 1), load ramping 1 -> 20 streams
    over 400 s: replicas are added ahead of the ramp (headroom), no live stream's SLO is violated, and
    after the load falls away idle replicas are removed without ever touching a live stream.
    """

    def __init__(
        self,
        pools: Sequence[SimPool],
        shape: ShapeKey,
        template: StreamSpec,
        *,
        autoscale: AutoscaleConfig | None = None,
        admission: AdmissionConfig | None = None,
        decide_every_s: float = 5.0,
    ) -> None:
        if decide_every_s <= 0.0:
            raise ValueError(f"decide_every_s={decide_every_s} must be > 0")
        self.pools = {p.spec.gpu_class: p for p in pools}
        self.shape = shape
        self.template = template
        self.decide_every_s = decide_every_s
        book = ProfileBook([p.profile for p in pools])
        self.admission = AdmissionController(book, admission)
        self.autoscaler = Autoscaler([p.spec for p in pools], autoscale)

    def run(
        self,
        target_streams: Callable[[float], int],
        duration_s: float,
        *,
        step_s: float = 1.0,
        start_s: float = 0.0,
        stream_lifetime_s: float | None = None,
    ) -> SimReport:
        """Simulate `duration_s` seconds of load (class docstring) and report."""
        if step_s <= 0.0 or duration_s <= 0.0:
            raise ValueError(f"step_s={step_s} and duration_s={duration_s} must be > 0")
        if stream_lifetime_s is not None and stream_lifetime_s <= 0.0:
            raise ValueError(f"stream_lifetime_s={stream_lifetime_s} must be > 0 (or None)")
        state = _SimState()
        for pool in self.pools.values():
            for _ in range(pool.initial_replicas):
                self._start_replica(state, pool, start_s, ready_now=True)
        admitted = refusals = slo_violations = dropped = 0
        waited_ids: set[str] = set()
        max_live = 0
        max_wait = 0.0
        peak = dict.fromkeys(self.pools, 0)
        timeline = []
        next_decision = start_s
        now = start_s
        while now <= start_s + duration_s + 1e-9:
            for rep in state.replicas.values():
                if not rep.ready and rep.ready_at_s <= now:
                    rep.ready = True
                    rep.idle_since_s = now
                    self.admission.add_replica(rep.info)
            if stream_lifetime_s is not None:
                for sid in [s for s, t in state.live.items() if now - t >= stream_lifetime_s]:
                    self._close(state, sid, now)
            self._follow_load(state, max(0, target_streams(now)), now)
            retry_hint = min(
                (r.ready_at_s - now for r in state.replicas.values() if not r.ready), default=None
            )
            for w in list(state.waiting):
                if w.next_try_s > now:
                    continue
                try:
                    decision = self.admission.admit(w.request, now, retry_after_s=retry_hint)
                except AdmissionRefusedError as err:
                    refusals += 1
                    waited_ids.add(w.request.stream_id)
                    w.next_try_s = now + max(err.retry_after_s, step_s)
                    continue
                state.waiting.remove(w)
                state.live[w.request.stream_id] = now
                state.replicas[decision.replica_id].idle_since_s = None
                admitted += 1
                max_wait = max(max_wait, now - w.since_s)
            if now >= next_decision:
                next_decision = now + self.decide_every_s
                dropped += self._autoscale(state, now)
            for rep in state.replicas.values():
                if rep.ready:
                    slo_violations += len(self.admission.check_replica(rep.info.replica_id))
            max_live = max(max_live, len(state.live))
            counts = dict.fromkeys(self.pools, 0)
            for rep in state.replicas.values():
                counts[rep.info.gpu_class] += 1
            for g, c in counts.items():
                peak[g] = max(peak[g], c)
            timeline.append((now, len(state.live), counts))
            now += step_s
        return SimReport(
            admitted=admitted,
            refusals=refusals,
            ever_waited=len(waited_ids),
            max_live_streams=max_live,
            max_wait_s=max_wait,
            slo_violations=slo_violations,
            dropped_live_streams=dropped,
            drained_busy_replicas=state.drained_busy,
            peak_replicas=peak,
            final_replicas=timeline[-1][2] if timeline else {},
            timeline=tuple(timeline),
        )

    def _start_replica(self, state: _SimState, pool: SimPool, now: float, *, ready_now: bool = False) -> None:
        replica_id = f"{pool.spec.gpu_class}-{state.next_id}"
        state.next_id += 1
        info = ReplicaInfo(
            replica_id,
            pool.spec.gpu_class,
            self.shape,
            pool.num_blocks,
            pool.max_streams,
            pool.spec.cost_per_hour,
        )
        rep = _SimReplica(info, now if ready_now else now + pool.spec.startup_s)
        state.replicas[replica_id] = rep
        if ready_now:
            rep.ready = True
            rep.idle_since_s = now
            self.admission.add_replica(info)

    def _close(self, state: _SimState, stream_id: str, now: float) -> None:
        del state.live[stream_id]
        replica_id = self.admission.replica_of(stream_id)
        self.admission.finish_stream(stream_id)
        if not self.admission.streams_on(replica_id):
            rep = state.replicas[replica_id]
            rep.idle_since_s = now
            if rep.draining:  # its last stream ended: the drain is over
                self.admission.remove_replica(replica_id)
                del state.replicas[replica_id]

    def _follow_load(self, state: _SimState, target: int, now: float) -> None:
        while len(state.live) + len(state.waiting) < target:
            stream_id = f"s{state.next_id}"
            state.next_id += 1
            request = StreamRequest(stream_id, self.shape, self.template)
            state.waiting.append(_Waiting(request, now, now))
        while len(state.live) + len(state.waiting) > target:
            if state.waiting:
                state.waiting.pop()
                continue
            self._close(state, next(iter(state.live)), now)

    def _autoscale(self, state: _SimState, now: float) -> int:
        pools = []
        for g in self.pools:
            loads = []
            for rep in state.replicas.values():
                if rep.info.gpu_class != g or rep.draining:  # a stopping replica is no longer the pool's
                    continue
                if rep.ready:
                    live = len(self.admission.streams_on(rep.info.replica_id))
                    free = self.admission.free_slots(rep.info.replica_id, self.template)
                else:
                    live, free = 0, 0
                loads.append(ReplicaLoad(rep.info.replica_id, live, free, rep.ready, rep.idle_since_s))
            pools.append(PoolSignals(g, tuple(loads)))
        oldest = min((w.since_s for w in state.waiting), default=now)
        signals = FleetSignals(tuple(pools), len(state.waiting), now - oldest)
        dropped = 0
        for decision in self.autoscaler.decide(signals, now):
            pool = self.pools[decision.gpu_class]
            dropped += sum(1 for rid in decision.remove if self.admission.streams_on(rid))
            for _ in range(decision.current - decision.target):
                self._stop_one(state, decision.gpu_class)
            for _ in range(decision.target - decision.current):
                self._start_replica(state, pool, now)
        return dropped

    def _stop_one(self, state: _SimState, gpu_class: str) -> None:
        """The orchestrator's pick (Serve's rule on one node): a starting replica, else the newest."""
        pool = [r for r in state.replicas.values() if r.info.gpu_class == gpu_class and not r.draining]
        rep = next((r for r in reversed(pool) if not r.ready), None) or pool[-1]
        rid = rep.info.replica_id
        if not rep.ready:
            del state.replicas[rid]
        elif self.admission.streams_on(rid):
            state.drained_busy += 1
            rep.draining = True
            self.admission.set_draining(rid)
        else:
            self.admission.remove_replica(rid)
            del state.replicas[rid]
