"""The router: admission control across pipelines, stream affinity, and the service's view of its capacity.

A stream is admitted to one pipeline for its whole life (its KV caches live there), or refused at once
with a retry hint: a pipeline that would miss the SLOs of the streams it already serves is never
given one more. The decision is `scheduling.admission.AdmissionController`'s: for each pipeline it
predicts, from the pipeline's measured stage-time profile (encode, DiT block, decode; seeded by
`scheduling.priors`, replaced by the profile each pipeline reports with its load, pulled at most every
REFRESH_S) and the streams already placed there, the new stream's TTFF and per-frame latency in the
batching mode it would get, and whether every admitted stream still meets its deadline:

    refused, all pipelines of the model full or too loaded   AdmissionRefusedError (RESOURCE_EXHAUSTED,
                                                              retry hint ServiceConfig.retry_after_s)
    even an idle pipeline of any profiled GPU class misses    SLOUnattainableError (FAILED_PRECONDITION)
    no pipeline serves the model                              BadRequestError (INVALID_ARGUMENT)

Profiles are keyed by (GPU class = PipelineSpec.gpu_type, the model's nominal shape): every pipeline of
one class and model shares one profile, the latest one reported. A stream is placed on the shape of its
model whatever its resolution (see scheduling.priors).

Reservations: a stream admitted here but not reported active by its pipeline within
RESERVATION_GRACE_S (its client vanished before opening) is released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ray import serve

from deployments.autoscaling import gpu_class_of
from deployments.config import ServiceConfig
from deployments.messages import AdmissionGrant, OpenRequest, PipelineStats
from deployments.pipeline import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, stream_spec
from scheduling.admission import AdmissionController, ReplicaInfo, StreamRequest
from scheduling.priors import prior_of, seed_profile
from scheduling.profile import ProfileBook, StageProfile
from stages.errors import BadRequestError, StreamNotFoundError

log = logging.getLogger("weir.router")

REFRESH_S = 0.5
"""Pipeline load older than this is pulled again before an admission decision."""
RESERVATION_GRACE_S = 10.0
"""A reservation the pipeline does not report as active after this long is dropped (client never opened)."""


class RouterAdmission:
    """Admission over the service's pipelines: plain logic, no Ray, clock injected.

    Wraps a scheduling.admission.AdmissionController with one ReplicaInfo per pipeline (its GPU class,
    the model's shape and block count, its stream slots) and feeds it the pipelines' reported profiles
    and health (an unreachable or unhealthy pipeline is draining: it keeps its streams, takes no new one).
    """

    def __init__(self, service: ServiceConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.clock = clock
        self.book = ProfileBook()
        self.admission = AdmissionController(self.book)
        self.models: dict[str, str] = {}
        self.refreshed_s: dict[str, float] = {}
        self.reachable: dict[str, bool] = {}
        self.reserved: dict[str, tuple[str, float]] = {}
        """stream id -> (pipeline, admission time) until its pipeline reports it active."""
        for name, spec in zip(service.pipeline_names, service.pipelines):
            prior = prior_of(spec.model)
            if self.book.find(spec.gpu_type, prior.shape) is None:
                self.book.put(seed_profile(spec.model, spec.gpu_type))
            gpu_class = gpu_class_of(spec.gpu_type)
            cost = gpu_class.cost_per_hour if gpu_class is not None else 1.0
            self.admission.add_replica(ReplicaInfo(name, spec.gpu_type, prior.shape, prior.num_blocks,
                                                   spec.max_streams, cost_per_hour=cost))
            self.models[name] = spec.model
            self.refreshed_s[name] = -1e9
            self.reachable[name] = True

    @property
    def owner(self) -> dict[str, str]:
        """stream id -> pipeline name of every admitted stream."""
        return {sid: info.replica_id for info in self.admission.replicas()
                for sid in self.admission.streams_on(info.replica_id)}

    def update(self, name: str, stats: PipelineStats | None) -> None:
        """A pipeline's load (None: it did not answer). Takes its profile, health and confirmed streams."""
        now = self.clock()
        self.refreshed_s[name] = now
        healthy = stats is not None and stats.healthy
        self.reachable[name] = healthy
        self.admission.set_draining(name, not healthy)
        if stats is None:
            return
        if stats.profile is not None:
            snap = stats.profile
            self.book.put(StageProfile(snap.gpu_class, snap.shape, encode=snap.encode,
                                       dit_block=snap.dit_block, decode=snap.decode))
        reported = set(stats.active_stream_ids)
        for sid, (owner, t) in list(self.reserved.items()):
            if owner != name:
                continue
            if sid in reported:
                del self.reserved[sid]  # confirmed: it now lives until release
            elif now - t > RESERVATION_GRACE_S:
                self.release(sid)

    def stale(self) -> list[str]:
        now = self.clock()
        return [n for n, t in self.refreshed_s.items() if now - t > REFRESH_S]

    def admit(self, stream_id: str, req: OpenRequest) -> AdmissionGrant:
        """Place the stream on the pipeline the admission controller picks, or raise (module docstring)."""
        model = req.model or self.service.pipelines[0].model
        if model not in self.models.values():
            models = sorted(set(self.models.values()))
            raise BadRequestError(f"model {model!r} is not served here; choose one of {models}", field="model")
        request = StreamRequest(stream_id, prior_of(model).shape, stream_spec(req))
        decision = self.admission.admit(request, self.clock(), retry_after_s=self.service.retry_after_s)
        self.reserved[stream_id] = (decision.replica_id, self.clock())
        return AdmissionGrant(
            stream_id=stream_id, pipeline=decision.replica_id,
            predicted_ttff_ms=decision.predicted_ttff_s * 1000 * self.service.scheduler_ttff_margin,
            first_chunk_frames=FIRST_CHUNK_FRAMES, chunk_frames=CHUNK_FRAMES,
        )

    def release(self, stream_id: str) -> None:
        """The stream ended (or never opened): free its slot. Unknown ids are ignored."""
        self.reserved.pop(stream_id, None)
        try:
            self.admission.finish_stream(stream_id)
        except StreamNotFoundError:
            pass

    def free_slots(self, name: str) -> int:
        if not self.reachable[name]:
            return 0
        info = next(i for i in self.admission.replicas() if i.replica_id == name)
        return max(0, info.max_streams - len(self.admission.streams_on(name)))

    def capacity(self) -> dict:
        st = self.admission.stats()
        names = list(self.models)
        return {
            "pipelines": len(names),
            "healthy_pipelines": sum(1 for n in names if self.reachable[n]),
            "active_streams": st.live_streams,
            "free_stream_slots": sum(self.free_slots(n) for n in names),
            "admitted_total": st.admitted,
            "refused_total": st.refused,
            "unattainable_total": st.unattainable,
            "row_load": {r.replica_id: r.row_load for r in st.replicas},
        }


@serve.deployment(max_ongoing_requests=1024)
class Router:
    """Serve shim over RouterAdmission, holding a handle per pipeline deployment."""

    def __init__(self, service: ServiceConfig, pipelines: dict, metrics=None) -> None:
        self.service = service
        self.pipelines = pipelines
        self.control = RouterAdmission(service)
        self._metrics = metrics
        self._lock = asyncio.Lock()

    async def _refresh(self, names: list[str]) -> None:
        async def pull(name: str) -> None:
            try:
                stats = await asyncio.wait_for(self.pipelines[name].load.remote(), timeout=5.0)
            except Exception:  # noqa: BLE001 - an unreachable pipeline is simply not a candidate
                log.warning("pipeline %s did not report its load", name, exc_info=True)
                stats = None
            self.control.update(name, stats)

        await asyncio.gather(*(pull(n) for n in names))

    async def admit(self, stream_id: str, req: OpenRequest) -> AdmissionGrant:
        async with self._lock:  # one decision at a time: reservations must see each other
            await self._refresh(self.control.stale())
            try:
                return self.control.admit(stream_id, req)
            finally:
                self._report()

    async def release(self, stream_id: str) -> None:
        self.control.release(stream_id)
        self._report()

    async def locate(self, stream_id: str) -> str | None:
        return self.control.owner.get(stream_id)

    async def capacity(self) -> dict:
        await self._refresh(list(self.control.models))
        return self.control.capacity()

    async def models(self) -> list[dict]:
        await self._refresh(list(self.control.models))
        out: dict[str, dict] = {}
        for name, spec in zip(self.service.pipeline_names, self.service.pipelines):
            row = out.setdefault(spec.model, {"model": spec.model, "vaes": ["wan", "taehv"], "device": spec.device,
                                              "gpu_type": spec.gpu_type, "pipelines": 0, "free_stream_slots": 0})
            row["pipelines"] += 1
            row["free_stream_slots"] += self.control.free_slots(name)
        return list(out.values())

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.record_router.remote(self.control.capacity())
