"""The router: admission control across pipeline replicas, tenants' stream quotas, and the service's capacity.

A pipeline deployment is a pool of replicas of one GPU class (ServiceConfig.pipelines: one entry per
pool). A stream is admitted to one replica for its whole life (its KV caches live there;
deployments.affinity routes every later call for it there), or refused at once with a retry hint: a
replica that would miss the SLOs of the streams it already serves is never given one more. The decision
is `scheduling.admission.AdmissionController`'s, per replica: for each one it predicts, from the measured
stage-time profile of its GPU class (encode, DiT block, decode; seeded by `scheduling.priors`, replaced
by the profiles replicas report) and the streams already placed there, the new stream's TTFF and
per-frame latency in the batching mode it would get, and whether every admitted stream still meets its
deadline; a stream is admitted to a pool only if some replica in it can hold it:

    the tenant already has Quota.max_streams open             AdmissionRefusedError naming the quota
    refused, every replica of the model full or too loaded    AdmissionRefusedError (RESOURCE_EXHAUSTED,
                                                              retry hint ServiceConfig.retry_after_s)
    even an idle replica of any profiled GPU class misses     SLOUnattainableError (FAILED_PRECONDITION)
    no pipeline serves the model                              BadRequestError (INVALID_ARGUMENT)

The router learns a pool's replicas from their reports (`Router.report`, every stats interval: load,
profile, live stream ids, draining). A replica that stops reporting takes no new stream after STALE_AFTER_S
and is forgotten once it carries none after FORGET_AFTER_S. Before any replica of a pool has reported,
the router pulls one report through the pool's handle. Outside Serve (tests) a report without a replica
id stands for the pool's one replica, registered under the pool's name from the start.

The concurrent-streams quota of each tenant is counted here (one logical owner: every open of every
ingress replica is admitted here), released with the stream (`release`) or its expired reservation.

Reservations: a stream admitted here but not reported active by its replica within RESERVATION_GRACE_S
(its client vanished before opening) is released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ray import serve

from deployments.autoscaling import gpu_class_of
from deployments.config import PipelineSpec, ServiceConfig
from deployments.messages import AdmissionGrant, OpenRequest, PipelineStats
from deployments.pipeline import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, stream_spec
from deployments.tenants import StreamQuota
from scheduling.admission import AdmissionController, ReplicaInfo, StreamRequest
from scheduling.priors import VAE_KINDS, cold_shape_s, prior_of, seed_profile
from scheduling.profile import ProfileBook, StageProfile
from stages.errors import AdmissionRefusedError, BadRequestError, StreamExistsError, StreamNotFoundError

log = logging.getLogger("weir.router")

RESERVATION_GRACE_S = 10.0
"""A reservation the replica does not report as active after this long is dropped (client never opened)."""
STALE_AFTER_S = 5.0
"""A replica that has not reported for this long takes no new stream."""
FORGET_AFTER_S = 30.0
"""A replica that has not reported for this long is forgotten once it carries no stream."""


class RouterAdmission:
    """Admission over the service's pipeline pools and their replicas: plain logic, no Ray, clock injected.

    Wraps a scheduling.admission.AdmissionController with one ReplicaInfo per replica (its pool's GPU
    class, the model's shape and block count, its stream slots) and feeds it the replicas' reported
    profiles, health and draining state (a draining or unhealthy replica keeps its streams, takes no new
    one), plus a tenants.StreamQuota for the tenants' concurrent streams.
    """

    def __init__(self, service: ServiceConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.clock = clock
        self.book = ProfileBook()
        self.admission = AdmissionController(self.book)
        self.quota = StreamQuota(service.tenants)
        self.pools: dict[str, PipelineSpec] = dict(zip(service.pipeline_names, service.pipelines))
        self.models: dict[str, str] = {name: spec.model for name, spec in self.pools.items()}
        """pool (deployment) name -> model."""
        self.pool_of: dict[str, str] = {}
        """replica key (its Serve replica id, or the pool's name before any replica reported) -> pool."""
        self.reported_s: dict[str, float] = {}
        """replica key -> time of its latest report (replicas known by their Serve id only)."""
        self.reserved: dict[str, tuple[str, float]] = {}
        """stream id -> (replica key, admission time) until its replica reports it active."""
        self.released_s: dict[str, float] = {}
        """stream id -> release time, for RESERVATION_GRACE_S: a report sent before the release may
        still name the stream, which must not be adopted back."""
        self.report_seq: dict[str, int] = {}
        """replica key -> the newest PipelineStats.report_seq taken from it (older reports are ignored)."""
        for name, spec in self.pools.items():
            if self.book.find(spec.gpu_type, prior_of(spec.model, spec.vae).shape) is None:
                self.book.put(seed_profile(spec.model, spec.gpu_type, spec.vae))
            self._add_replica(name, name, spec.max_streams)

    def _add_replica(self, pool: str, key: str, max_streams: int) -> None:
        spec = self.pools[pool]
        prior = prior_of(spec.model, spec.vae)
        gpu_class = gpu_class_of(spec.gpu_type)
        cost = gpu_class.cost_per_hour if gpu_class is not None else 1.0
        cold_s = {vae: spec.cold_shape_s if spec.cold_shape_s is not None else cold_shape_s(spec.model, spec.gpu_type, vae)
                  for vae in VAE_KINDS}
        self.admission.add_replica(ReplicaInfo(key, spec.gpu_type, prior.shape, prior.num_blocks,
                                               max(1, max_streams), cost_per_hour=cost, cold_shape_s=cold_s))
        self.pool_of[key] = pool

    def _remove_replica(self, key: str) -> None:
        self.admission.remove_replica(key)
        del self.pool_of[key]
        self.reported_s.pop(key, None)
        self.report_seq.pop(key, None)

    @property
    def owner(self) -> dict[str, str]:
        """stream id -> pool (deployment) name of every admitted stream."""
        return {sid: self.pool_of[rid] for sid, rid in self.placement().items()}

    def placement(self) -> dict[str, str]:
        """stream id -> replica key of every admitted stream."""
        return {sid: info.replica_id for info in self.admission.replicas()
                for sid in self.admission.streams_on(info.replica_id)}

    def update(self, pool: str, stats: PipelineStats | None) -> None:
        """A report of one replica of `pool` (None: the pool's pull failed). Registers a new replica, takes
        its profile, health and draining state, and confirms or expires its reservations."""
        if pool not in self.pools:
            raise ValueError(f"unknown pipeline {pool!r}; pipelines: {sorted(self.pools)}")
        now = self.clock()
        key = stats.replica_id if stats is not None and stats.replica_id else pool
        if key not in self.pool_of:
            if stats is None:
                return
            self._add_replica(pool, key, stats.max_streams or self.pools[pool].max_streams)
        if key != pool:
            self.reported_s[key] = now
            self._retire_stand_in(pool)
        if stats is not None and stats.report_seq:
            if stats.report_seq <= self.report_seq.get(key, 0):
                return  # older than one already taken (a pull answered after a newer push)
            self.report_seq[key] = stats.report_seq
        takes_streams = stats is not None and stats.healthy and not stats.draining
        self.admission.set_draining(key, not takes_streams)
        if stats is None:
            return
        # streams admitted there that this report predates keep the start-up they were admitted with
        reported = set(stats.active_stream_ids)
        unseen = [sid for sid, (owner, _) in self.reserved.items() if owner == key and sid not in reported]
        self.admission.set_warming(key, stats.warming, keep=unseen)
        if stats.warm_shapes or stats.warming_shapes:
            self.admission.set_warm_shapes(key, stats.warm_shapes, warming=stats.warming_shapes, now=now)
        if stats.profile is not None:
            snap = stats.profile
            self.book.put(StageProfile(snap.gpu_class, snap.shape, encode=snap.encode,
                                       dit_block=snap.dit_block, decode=snap.decode, startup=snap.startup))
        for sid, (owner, t) in list(self.reserved.items()):
            if owner != key:
                continue
            if sid in reported:
                del self.reserved[sid]  # confirmed: it now lives until release
            elif now - t > RESERVATION_GRACE_S:
                self.release(sid)
        for sid, t in list(self.released_s.items()):
            if now - t > RESERVATION_GRACE_S:
                del self.released_s[sid]
        placed = self.placement()
        # released here, still running there (closing): their slots are not free yet
        self.admission.set_closing(key, sum(1 for sid in reported if sid in self.released_s and sid not in placed))
        for sid, req in stats.active_requests.items():
            if sid not in placed and sid not in self.reserved and sid not in self.released_s:
                # running there but unknown here: this router restarted (or lost a reservation).
                # Count it, so new streams are admitted against the real load and quota.
                if self.admission.adopt(key, sid, stream_spec(req, self.pools[pool].model, self.pools[pool].vae)):
                    self.quota.adopt(req.tenant, sid)
                    log.info("adopted stream %s running on %s", sid, key)
        for sid in self.admission.streams_on(key):
            if sid not in reported and sid not in self.reserved:
                # confirmed once, gone from its replica now: the stream ended but its release never
                # came (an ingress that died, a cancelled cleanup). Free the slot and the quota.
                log.info("stream %s is gone from %s: releasing its slot", sid, key)
                self.release(sid)

    def expire(self) -> None:
        """Replicas that stopped reporting: no new stream after STALE_AFTER_S, forgotten (once they carry
        no stream) after FORGET_AFTER_S."""
        now = self.clock()
        for key, t in list(self.reported_s.items()):
            if now - t > STALE_AFTER_S:
                self.admission.set_draining(key)
            if now - t > FORGET_AFTER_S and not self.admission.streams_on(key):
                self._remove_replica(key)
        for key in {self.pool_of[k] for k in self.reported_s}:
            self._retire_stand_in(key)

    def _retire_stand_in(self, pool: str) -> None:
        """The pool's real replicas report now: its stand-in (keyed by the pool's name) takes no new
        stream and goes once empty."""
        if pool in self.pool_of:
            if self.admission.streams_on(pool):
                self.admission.set_draining(pool)
            else:
                self._remove_replica(pool)

    def unreported_pools(self) -> list[str]:
        """Pools none of whose replicas has reported within STALE_AFTER_S (the router pulls one report)."""
        now = self.clock()
        fresh = {self.pool_of[k] for k, t in self.reported_s.items() if now - t <= STALE_AFTER_S}
        return [p for p in self.pools if p not in fresh]

    def admit(self, stream_id: str, req: OpenRequest) -> AdmissionGrant:
        """Count the tenant's stream and place it on the replica the admission controller picks, or raise
        (module docstring)."""
        self.expire()
        model = req.model or self.service.pipelines[0].model
        if model not in self.models.values():
            models = sorted(set(self.models.values()))
            raise BadRequestError(f"model {model!r} is not served here; choose one of {models}", field="model")
        if stream_id in self.reserved or stream_id in self.placement():
            raise StreamExistsError(f"stream {stream_id!r} is already admitted", stream_id=stream_id)
        self.quota.acquire(req.tenant, stream_id)
        shape = self._nominal_shape(model, req.vae)
        request = StreamRequest(stream_id, shape, stream_spec(req, model, shape.vae), resolution=(req.height, req.width),
                                vae=req.vae)
        try:
            decision = self.admission.admit(request, self.clock(), retry_after_s=self.service.retry_after_s)
        except BaseException:
            self.quota.release(stream_id)
            raise
        self.reserved[stream_id] = (decision.replica_id, self.clock())
        pool = self.pool_of[decision.replica_id]
        return AdmissionGrant(
            stream_id=stream_id, pipeline=pool, replica="" if decision.replica_id == pool else decision.replica_id,
            predicted_ttff_ms=decision.predicted_ttff_s * 1000 * self.service.scheduler_ttff_margin,
            first_chunk_frames=FIRST_CHUNK_FRAMES, chunk_frames=CHUNK_FRAMES,
        )

    def _nominal_shape(self, model: str, vae: str = ""):
        """The profile key a stream of `model` with VAE `vae` ('' = default) is priced by: that of the
        pools serving the model with that VAE as their default, else of the first pool serving the
        model (every stream of a pool feeds that pool's one profile, scheduling.priors)."""
        specs = [s for s in self.pools.values() if s.model == model]
        spec = next((s for s in specs if s.vae == vae), specs[0])
        return prior_of(model, spec.vae).shape

    def release(self, stream_id: str) -> None:
        """The stream ended (or never opened): free its slot and its tenant's quota. Unknown ids are ignored."""
        self.released_s[stream_id] = self.clock()
        self.reserved.pop(stream_id, None)
        self.quota.release(stream_id)
        try:
            self.admission.finish_stream(stream_id)
        except StreamNotFoundError:
            pass

    def replicas(self) -> list[dict]:
        """One row per known replica: pool, replica key, live streams, slots, free slots, draining."""
        rows = []
        for r in self.admission.stats().replicas:
            free = 0 if r.draining else max(0, r.max_streams - r.live_streams)
            rows.append({"pool": self.pool_of[r.replica_id], "replica": r.replica_id, "live_streams": r.live_streams,
                         "max_streams": r.max_streams, "free_stream_slots": free, "draining": r.draining,
                         "row_load": r.row_load})
        return rows

    def free_slots(self, pool: str) -> int:
        """Free stream slots on the pool's replicas that take streams."""
        return sum(r["free_stream_slots"] for r in self.replicas() if r["pool"] == pool)

    def capacity(self) -> dict:
        st = self.admission.stats()
        rows = self.replicas()
        return {
            "pipelines": len(rows),
            "healthy_pipelines": sum(1 for r in rows if not r["draining"]),
            "active_streams": st.live_streams,
            "free_stream_slots": sum(r["free_stream_slots"] for r in rows),
            "admitted_total": st.admitted,
            "refused_total": st.refused,
            "unattainable_total": st.unattainable,
            "row_load": {r["replica"]: r["row_load"] for r in rows},
            "replicas": rows,
        }


@serve.deployment(max_ongoing_requests=1024)
class Router:
    """Serve shim over RouterAdmission, holding a handle per pipeline pool. One replica: it is the one
    owner of admission state and of the tenants' stream counts."""

    def __init__(self, service: ServiceConfig, pipelines: dict, metrics=None) -> None:
        self.service = service
        self.pipelines = pipelines
        self.control = RouterAdmission(service)
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._warm_ups: set[asyncio.Task] = set()
        """Warm-up requests in flight (`_ask_warm_up`)."""

    async def report(self, pool: str, stats: PipelineStats) -> None:
        """A pipeline replica's periodic load report."""
        self.control.update(pool, stats)

    async def _discover(self) -> None:
        """Pull one report from each pool none of whose replicas has reported lately (start-up)."""
        async def pull(name: str) -> None:
            try:
                stats = await asyncio.wait_for(self.pipelines[name].load.remote(), timeout=5.0)
            except Exception:  # noqa: BLE001 - an unreachable pool simply has no candidate
                log.warning("pipeline %s did not report its load", name, exc_info=True)
                stats = None
            self.control.update(name, stats)

        await asyncio.gather(*(pull(n) for n in self.control.unreported_pools()))

    async def admit(self, stream_id: str, req: OpenRequest) -> AdmissionGrant:
        async with self._lock:  # one decision at a time: reservations must see each other
            await self._discover()
            try:
                return self.control.admit(stream_id, req)
            except AdmissionRefusedError as exc:
                if "warm_up_replica" in exc.details:
                    self._ask_warm_up(str(exc.details["warm_up_replica"]), exc.details["warm_up_shape"])
                if "quota" not in exc.details:
                    self._note_refused(req.model or self.service.pipelines[0].model)
                raise
            finally:
                self._report()

    def _ask_warm_up(self, replica_id: str, shape: tuple[int, int, str]) -> None:
        """Have the replica admission chose warm a shape up for a refused stream (scheduling.admission,
        "Warm-ups on demand"), in a task: the warm-up takes as long as the compiles, and the replica's
        reports say when it is done. A warm-up that fails, or that reached another replica, is cancelled
        (the next such stream asks again)."""
        pool = self.control.pool_of[replica_id]
        height, width, vae = shape

        async def ask() -> None:
            try:
                done = await self.pipelines[pool].warm_shape.remote(
                    height, width, vae, replica="" if replica_id == pool else replica_id)
            except Exception:  # noqa: BLE001 - the stream was refused anyway; a later one asks again
                log.warning("warm-up of %dx%d (%s) on %s failed", height, width, vae, replica_id, exc_info=True)
                done = False
            if not done:
                self.control.admission.cancel_warm_up(replica_id, shape)

        log.info("asking %s of %s to warm %dx%d (%s VAE) up", replica_id, pool, height, width, vae)
        task = asyncio.get_running_loop().create_task(ask())
        self._warm_ups.add(task)
        task.add_done_callback(self._warm_ups.discard)

    def _note_refused(self, model: str) -> None:
        """Tell the model's pools a stream found no slot (their autoscaling policy's admission-wait signal)."""
        for name, pool_model in self.control.models.items():
            if pool_model == model:
                try:
                    self.pipelines[name].note_refused.remote()
                except Exception:  # noqa: BLE001 - a signal, never a failure
                    log.debug("note_refused to %s failed", name, exc_info=True)

    async def release(self, stream_id: str) -> None:
        self.control.release(stream_id)
        self._report()

    async def locate(self, stream_id: str) -> str | None:
        """The pool (deployment) name of an admitted stream."""
        return self.control.owner.get(stream_id)

    async def placement(self) -> dict[str, tuple[str, str]]:
        """stream id -> (pool, replica) of every admitted stream."""
        return {sid: (self.control.pool_of[rid], rid) for sid, rid in self.control.placement().items()}

    async def capacity(self) -> dict:
        await self._discover()
        self.control.expire()
        return self.control.capacity()

    async def models(self) -> list[dict]:
        await self._discover()
        self.control.expire()
        out: dict[str, dict] = {}
        for name, spec in self.control.pools.items():
            row = out.setdefault(spec.model, {"model": spec.model, "vaes": ["wan", "taehv"], "device": spec.device,
                                              "gpu_type": spec.gpu_type, "pipelines": 0, "free_stream_slots": 0})
            row["pipelines"] += sum(1 for r in self.control.replicas() if r["pool"] == name)
            row["free_stream_slots"] += self.control.free_slots(name)
        return list(out.values())

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.record_router.remote(self.control.capacity())
