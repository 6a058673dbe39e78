"""The router: admission control across pipelines, stream affinity, and the service's view of its capacity.

A stream is admitted to one pipeline for its whole life (its KV caches live there), or refused at once
with a retry hint: a pipeline that would miss the SLOs of the streams it already serves is never
given one more. The decision uses each pipeline's measured tick times, pulled from the pipelines
(at most every REFRESH_S) and the reservations made since.

Latency model of one stream (fps f, n denoising steps, chunk of 4 frames, tick time T(b) at batch b):

    TTFF                 ~ 1/f + T(b_now) + n * T(1)          the first frame is prefilled alone
    frame latency floor  = 3/f + (n - 1) * 4/f + T(b)         the first frame of a chunk waits for the
                                                              other 3, then n-1 more chunks go by
    keeping up           T(b + 1) <= 4/f                      one tick per chunk interval

Worked example: f = 16 fps, n = 2, T(1) = 40 ms, T(4) = 100 ms: TTFF ~ 62 + 100 + 80 = 242 ms;
frame latency floor = 187.5 + 250 + 100 = 537.5 ms; a 5th stream is admitted while T(5) <= 250 ms.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ray import serve

from deployments.config import ServiceConfig
from deployments.messages import AdmissionGrant, OpenRequest, PipelineStats
from stages.errors import AdmissionRefusedError, BadRequestError, SLOUnattainableError

log = logging.getLogger("weir.router")

CHUNK_FRAMES = 4
REFRESH_S = 0.5
"""Pipeline load older than this is pulled again before an admission decision."""
RESERVATION_GRACE_S = 10.0
"""A reservation the pipeline does not report as active after this long is dropped (client never opened)."""


def tick_ms(stats: PipelineStats, batch: int) -> float:
    """T(batch) in ms from the measured points: exact if measured, else affine through the two nearest.

    Example: measured {1: 40, 4: 100} -> T(2) = 60, T(5) = 120 (slope 20 ms per stream); {} -> 0.
    """
    pts = sorted(stats.tick_ms_by_batch.items())
    if not pts:
        return 0.0
    for b, t in pts:
        if b == batch:
            return t
    if len(pts) == 1:
        b0, t0 = pts[0]
        return t0 * batch / b0  # one point: assume cost proportional to batch (conservative)
    lo = [p for p in pts if p[0] < batch]
    hi = [p for p in pts if p[0] > batch]
    (b0, t0), (b1, t1) = (lo[-1], hi[0]) if lo and hi else (pts[-2], pts[-1]) if lo else (pts[0], pts[1])
    return max(0.0, t0 + (t1 - t0) * (batch - b0) / (b1 - b0))


@dataclass
class _PipelineView:
    name: str
    model: str
    max_streams: int
    stats: PipelineStats | None = None
    refreshed_s: float = -1e9
    reachable: bool = True
    reserved: dict[str, float] = field(default_factory=dict)
    """stream id -> admission time."""

    def active(self) -> set[str]:
        reported = set(self.stats.active_stream_ids) if self.stats else set()
        return reported | set(self.reserved)


class AdmissionController:
    """Plain admission logic over pipeline views; no Ray, clock injected."""

    def __init__(self, service: ServiceConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.clock = clock
        self.views = {
            name: _PipelineView(name=name, model=spec.model, max_streams=spec.max_streams)
            for name, spec in zip(service.pipeline_names, service.pipelines)
        }
        self.owner: dict[str, str] = {}
        self.refused_total = 0
        self.admitted_total = 0

    def update(self, name: str, stats: PipelineStats | None) -> None:
        v = self.views[name]
        now = self.clock()
        v.refreshed_s = now
        v.reachable = stats is not None and stats.healthy
        if stats is None:
            return
        v.stats = stats
        reported = set(stats.active_stream_ids)
        for sid, t in list(v.reserved.items()):
            if sid in reported:
                continue
            if now - t > RESERVATION_GRACE_S:
                v.reserved.pop(sid)
                if self.owner.get(sid) == name:
                    self.owner.pop(sid)

    def stale(self) -> list[str]:
        now = self.clock()
        return [n for n, v in self.views.items() if now - v.refreshed_s > REFRESH_S]

    def admit(self, stream_id: str, req: OpenRequest) -> AdmissionGrant:
        """Pick the pipeline with the most headroom that meets the stream's SLOs, or raise.

        Raises BadRequestError (no pipeline serves the model), SLOUnattainableError (even an idle pipeline
        cannot meet the SLO), AdmissionRefusedError (every suitable pipeline is full; retry later).
        """
        model = req.model or self.service.pipelines[0].model
        candidates = [v for v in self.views.values() if v.model == model]
        if not candidates:
            models = sorted({v.model for v in self.views.values()})
            raise BadRequestError(f"model {model!r} is not served here; choose one of {models}", field="model")
        f, n = req.input_fps, req.num_steps
        chunk_s = CHUNK_FRAMES / f
        best: tuple[float, _PipelineView, float] | None = None
        floor_violations: list[str] = []
        for v in candidates:
            if not v.reachable:
                continue
            active = len(v.active())
            if active >= v.max_streams:
                continue
            st = v.stats or PipelineStats(pipeline=v.name, model=v.model, gpu_type="")
            t_next = tick_ms(st, active + 1) / 1000
            t_one = tick_ms(st, 1) / 1000
            floor_s = (CHUNK_FRAMES - 1) / f + (n - 1) * chunk_s + t_one
            if floor_s * 1000 > req.frame_deadline_ms:
                floor_violations.append(f"{v.name}: latency floor {floor_s * 1000:.0f} ms")
                continue
            ttff_s = (1 / f + t_next + n * t_one) * self.service.scheduler_ttff_margin
            if t_next > chunk_s or ttff_s * 1000 > req.ttff_ms:
                continue  # would slow the streams already here, or miss this one's TTFF
            headroom = 1.0 - active / v.max_streams
            if best is None or headroom > best[2]:
                best = (ttff_s, v, headroom)
        if best is None:
            if floor_violations and len(floor_violations) == len([v for v in candidates if v.reachable]):
                raise SLOUnattainableError(
                    f"frame deadline {req.frame_deadline_ms:.0f} ms is below what {n} steps at {f:g} fps allow "
                    f"({'; '.join(floor_violations)}); raise the deadline, the fps, or lower the steps",
                    frame_deadline_ms=req.frame_deadline_ms,
                )
            self.refused_total += 1
            raise AdmissionRefusedError(
                f"no {model} pipeline can take another stream within its SLO now "
                f"({sum(len(v.active()) for v in candidates)} streams on {len(candidates)} pipelines)",
                retry_after_s=self.service.retry_after_s, model=model,
            )
        ttff_s, v, _ = best
        v.reserved[stream_id] = self.clock()
        self.owner[stream_id] = v.name
        self.admitted_total += 1
        return AdmissionGrant(stream_id=stream_id, pipeline=v.name, predicted_ttff_ms=ttff_s * 1000,
                              chunk_frames=CHUNK_FRAMES)

    def release(self, stream_id: str) -> None:
        name = self.owner.pop(stream_id, None)
        if name is not None:
            self.views[name].reserved.pop(stream_id, None)
            if self.views[name].stats is not None:
                ids = self.views[name].stats.active_stream_ids
                if stream_id in ids:
                    ids.remove(stream_id)

    def capacity(self) -> dict:
        views = list(self.views.values())
        return {
            "pipelines": len(views),
            "healthy_pipelines": sum(1 for v in views if v.reachable),
            "active_streams": sum(len(v.active()) for v in views),
            "free_stream_slots": sum(max(0, v.max_streams - len(v.active())) for v in views if v.reachable),
            "admitted_total": self.admitted_total,
            "refused_total": self.refused_total,
        }


@serve.deployment(max_ongoing_requests=1024)
class Router:
    """Serve shim over AdmissionController, holding a handle per pipeline deployment."""

    def __init__(self, service: ServiceConfig, pipelines: dict, metrics=None) -> None:
        self.service = service
        self.pipelines = pipelines
        self.control = AdmissionController(service)
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
        await self._refresh(list(self.control.views))
        return self.control.capacity()

    async def models(self) -> list[dict]:
        await self._refresh(list(self.control.views))
        out: dict[str, dict] = {}
        for spec, v in zip(self.service.pipelines, self.control.views.values()):
            row = out.setdefault(spec.model, {"model": spec.model, "vaes": ["wan", "taehv"], "device": spec.device,
                                              "gpu_type": spec.gpu_type, "pipelines": 0, "free_stream_slots": 0})
            row["pipelines"] += 1
            if v.reachable:
                row["free_stream_slots"] += max(0, v.max_streams - len(v.active()))
        return list(out.values())

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.record_router.remote(self.control.capacity())
