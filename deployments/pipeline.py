"""The pipeline: one engine (one GPU, or the CPU) serving many streams, and its Serve deployment.

Three layers, each replaceable:

    Executor          the engine API as coroutines. InProcessExecutor runs a StreamEngine on one worker
                      thread (calls stay ordered, the event loop stays free); a compiled graph of stage
                      actors implements the same protocol.
    PipelineCore      plain asyncio, no Ray: per-stream input queues, the batching loop, deadline skipping,
                      per-stream output queues and stats. Unit-testable with a real tiny engine.
    Pipeline          the Serve deployment: a thin shim that owns a PipelineCore and exposes it to the
                      ingress (open / push / control / events / close) and the router (load).

One tick of the batching loop:

    1. move queued input frames into the engine; a frame that can no longer meet its deadline is
       skipped when a newer frame of the same stream is waiting (counted, reported in StreamStats)
    2. ask the batch policy which ready streams share this tick's DiT forward
    3. executor.step(ids) -> outputs; time it (the measured cost model the router admits from)
    4. put each stream's outputs on its own bounded queue; a slow or vanished client fills only its own
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ray import serve

from deployments.config import PipelineSpec, ServiceConfig
from deployments.messages import (
    InFrame,
    OpenRequest,
    OutFrame,
    PipelineStats,
    StreamEvent,
    StreamStatsSnapshot,
)
from scheduling.slo import LatencyWindow, percentile
from stages.errors import (
    AdmissionRefusedError,
    BadFrameError,
    PipelineFailedError,
    StreamExistsError,
    StreamNotFoundError,
    WeirError,
)

log = logging.getLogger("weir.pipeline")

CHUNK_FRAMES = 4
"""Input frames per chunk after the first (the VAE's temporal compression)."""
MAX_QUEUED_CHUNKS = 4
"""Input frames queued per stream beyond this many chunks are skipped, oldest first (backpressure)."""
TICK_EMA = 0.2
"""Smoothing of the measured tick time."""
HEARTBEAT_S = 1.0
"""The loop wakes at least this often (idle streams are reaped on wake-ups)."""


def now_us() -> int:
    return time.time_ns() // 1000


# ---- executor ------------------------------------------------------------------------------------------


class Executor(Protocol):
    """The engine API the batching loop drives (see stages.engine.StreamEngine), as coroutines."""

    async def open_stream(self, stream_id: str, params: object) -> None: ...
    async def add_frames(self, stream_id: str, frames: list[tuple[int, object]]) -> None: ...
    async def ready_streams(self) -> list[str]: ...
    def pending_frames(self, stream_id: str) -> int: ...
    async def step(self, stream_ids: list[str]) -> dict[str, list]: ...
    async def set_prompt(self, stream_id: str, prompt: str) -> None: ...
    async def set_steps(self, stream_id: str, num_steps: int) -> list: ...
    async def flush(self, stream_id: str) -> list: ...
    async def close_stream(self, stream_id: str) -> None: ...
    def memory_bytes(self) -> int: ...


class InProcessExecutor:
    """A StreamEngine in this process, driven from one worker thread (calls run in submission order)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weir-engine")

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def open_stream(self, stream_id, params) -> None:
        await self._call(self.engine.open_stream, stream_id, params)

    async def add_frames(self, stream_id, frames) -> None:
        def add() -> None:
            for seq, frame in frames:
                self.engine.add_frame(stream_id, seq, frame)

        await self._call(add)

    async def ready_streams(self) -> list[str]:
        return await self._call(self.engine.ready_streams)

    def pending_frames(self, stream_id) -> int:
        return self.engine.pending_frames(stream_id)

    async def step(self, stream_ids):
        return await self._call(self.engine.step, stream_ids)

    async def set_prompt(self, stream_id, prompt) -> None:
        await self._call(self.engine.set_prompt, stream_id, prompt)

    async def set_steps(self, stream_id, num_steps):
        return await self._call(self.engine.set_steps, stream_id, num_steps)

    async def flush(self, stream_id):
        return await self._call(self.engine.flush, stream_id)

    async def close_stream(self, stream_id) -> None:
        await self._call(self.engine.close_stream, stream_id)

    def memory_bytes(self) -> int:
        try:
            import torch

            if self.engine.device.type == "cuda":
                return int(torch.cuda.memory_allocated(self.engine.device))
        except Exception:  # noqa: BLE001 - a metric, never a failure
            pass
        return 0


def build_engine_executor(spec: PipelineSpec) -> InProcessExecutor:
    """Production default: a StreamEngine for the spec, in process."""
    import torch

    from stages.engine import EngineSpec, StreamEngine

    if spec.device == "cpu":
        torch.set_num_threads(max(1, round(spec.num_cpus)))
    engine = StreamEngine(
        EngineSpec(model=spec.model, vae=spec.vae, device=spec.device, dtype=spec.dtype,
                   checkpoint_dir=spec.checkpoint_dir)
    )
    return InProcessExecutor(engine)


def stream_params(req: OpenRequest):
    from stages.engine import StreamParams

    return StreamParams(
        prompt=req.prompt, num_steps=req.num_steps, noise_scale=req.noise_strength, seed=req.seed,
        height=req.height, width=req.width, vae=req.vae or None, first_chunk_frames=1,
    )


# ---- batch policy --------------------------------------------------------------------------------------


class BatchPolicy(Protocol):
    """Which ready streams share one tick's forward. `deadlines` maps stream id -> earliest queued deadline."""

    def choose(self, ready: list[str], deadlines: dict[str, float], now_s: float) -> list[str]: ...


@dataclass
class EarliestDeadlineFirst:
    """Default policy: every ready stream, earliest deadline first, at most `max_batch` per tick."""

    max_batch: int = 64

    def choose(self, ready: list[str], deadlines: dict[str, float], now_s: float) -> list[str]:
        ordered = sorted(ready, key=lambda sid: deadlines.get(sid, float("inf")))
        return ordered[: self.max_batch]


# ---- per-stream state ------------------------------------------------------------------------------------


@dataclass
class _StreamSlot:
    stream_id: str
    req: OpenRequest
    opened_us: int
    queue: deque = field(default_factory=deque)
    """InFrames not yet handed to the engine."""
    meta: dict[int, tuple[int, int]] = field(default_factory=dict)
    """seq -> (capture_ts_us, received_ts_us) of frames inside the engine."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    out_frames_queued: int = 0
    started: bool = False
    ending: bool = False
    closed: bool = False
    last_seq: int = -1
    last_activity_s: float = field(default_factory=time.monotonic)
    stats: StreamStatsSnapshot = None  # type: ignore[assignment]
    latencies: LatencyWindow = field(default_factory=lambda: LatencyWindow(1024))
    gaps_ms: deque = field(default_factory=lambda: deque(maxlen=256))
    first_out_us: int = 0
    last_out_us: int = 0

    def __post_init__(self) -> None:
        self.stats = StreamStatsSnapshot(stream_id=self.stream_id)

    @property
    def deadline_us(self) -> int:
        return int(self.req.frame_deadline_ms * 1000)

    @property
    def frames_out_span_s(self) -> float:
        return (self.last_out_us - self.first_out_us) / 1e6 if self.first_out_us else 0.0


# ---- the core ------------------------------------------------------------------------------------------


class PipelineCore:
    """The batching loop over one executor. All methods run on one asyncio loop."""

    def __init__(self, name: str, spec: PipelineSpec, executor: Executor, *, service: ServiceConfig | None = None,
                 policy: BatchPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.spec = spec
        self.service = service or ServiceConfig()
        self.executor = executor
        self.policy = policy or EarliestDeadlineFirst()
        self.clock = clock
        self.streams: dict[str, _StreamSlot] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._failure: BaseException | None = None
        self._tick_ms_ema = 0.0
        self._tick_by_batch: dict[int, float] = {}
        self._fps_window: deque = deque(maxlen=512)
        self._frames_out_total = 0
        self._skipped_total = 0
        self._misses_total = 0
        self._samples = PipelineStats(pipeline=name, model=spec.model, gpu_type=spec.gpu_type)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), name=f"weir-loop-{self.name}")
            self._heartbeat = loop.create_task(self._beat(), name=f"weir-heartbeat-{self.name}")

    async def stop(self) -> None:
        for task in (self._task, self._heartbeat):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001
                    pass
        for sid in list(self.streams):
            await self.close(sid)

    def check_health(self) -> None:
        if self._failure is not None:
            raise PipelineFailedError(f"pipeline {self.name} failed: {type(self._failure).__name__}")
        if self._task is not None and self._task.done():
            raise PipelineFailedError(f"pipeline {self.name}'s batching loop stopped")

    # -- stream API (called by the ingress) --------------------------------------------------------------------

    async def open(self, stream_id: str, req: OpenRequest, opened_us: int | None = None) -> None:
        self.start()
        self.check_health()
        if stream_id in self.streams:
            raise StreamExistsError(f"stream {stream_id!r} is already open", stream_id=stream_id)
        if len(self.streams) >= self.spec.max_streams:
            raise AdmissionRefusedError(
                f"pipeline {self.name} has all {self.spec.max_streams} stream slots in use",
                retry_after_s=self.service.retry_after_s, pipeline=self.name,
            )
        if req.model and req.model != self.spec.model:
            raise AdmissionRefusedError(f"pipeline {self.name} serves {self.spec.model}, not {req.model}",
                                        retry_after_s=self.service.retry_after_s)
        await self.executor.open_stream(stream_id, stream_params(req))
        self.streams[stream_id] = _StreamSlot(stream_id, req, opened_us or now_us(),
                                              events=asyncio.Queue())

    async def push(self, stream_id: str, frames: list[InFrame]) -> int:
        """Queue input frames; returns the stream's queue depth. Out-of-order seqs are BadFrameError."""
        s = self._slot(stream_id)
        for f in frames:
            if f.seq <= s.last_seq:
                raise BadFrameError(f"frame seq {f.seq} after {s.last_seq}: seqs must increase", seq=f.seq)
            if f.frame.shape != (s.req.height, s.req.width, 3):
                raise BadFrameError(f"frame {f.seq} has shape {f.frame.shape}", seq=f.seq)
            s.last_seq = f.seq
            s.queue.append(f)
            s.stats.frames_in += 1
        s.last_activity_s = self.clock()
        limit = MAX_QUEUED_CHUNKS * CHUNK_FRAMES
        while len(s.queue) > limit:  # the stream sends faster than we serve it: drop its oldest
            s.queue.popleft()
            self._skip(s, 1)
        self._wake.set()
        return len(s.queue)

    async def set_prompt(self, stream_id: str, prompt: str) -> None:
        self._slot(stream_id)
        await self.executor.set_prompt(stream_id, prompt)

    async def set_steps(self, stream_id: str, num_steps: int) -> None:
        s = self._slot(stream_id)
        out = await self.executor.set_steps(stream_id, num_steps)
        self._deliver(s, out)

    def count_paused(self, stream_id: str, num_frames: int) -> None:
        self._slot(stream_id).stats.frames_paused += num_frames

    async def end(self, stream_id: str) -> None:
        """Finish the stream: its queued frames are stepped, flushed, sent, then an `ended` event."""
        s = self._slot(stream_id)
        s.ending = True
        self._wake.set()

    async def close(self, stream_id: str) -> None:
        """Drop the stream now (vanished client, error). Idempotent."""
        s = self.streams.pop(stream_id, None)
        if s is None:
            return
        s.closed = True
        s.events.put_nowait(StreamEvent(ended=True))
        try:
            await self.executor.close_stream(stream_id)
        except WeirError:
            pass

    async def events(self, stream_id: str) -> AsyncIterator[StreamEvent]:
        """The stream's outputs, batched per wake-up, with a stats event every stats interval.

        Ends after the `ended` event. If the consumer goes away (cancellation) the stream is closed.
        """
        s = self._slot(stream_id)
        interval = self.service.stats_interval_s
        next_stats = self.clock() + interval
        try:
            while True:
                first = await _get_within(s.events, max(0.0, next_stats - self.clock()))
                batch = [] if first is None else [first]
                while not s.events.empty():
                    batch.append(s.events.get_nowait())
                frames = [f for ev in batch for f in ev.frames]
                s.out_frames_queued -= len(frames)
                if frames:
                    yield StreamEvent(frames=frames)
                for ev in batch:
                    if ev.error is not None:
                        yield StreamEvent(error=ev.error)
                        return
                if self.clock() >= next_stats:
                    next_stats = self.clock() + interval
                    yield StreamEvent(stats=self.stream_stats(stream_id, s))
                if any(ev.ended for ev in batch):
                    yield StreamEvent(stats=self.stream_stats(stream_id, s), ended=True)
                    return
        finally:
            if stream_id in self.streams and self.streams[stream_id] is s:
                await self.close(stream_id)

    def stream_stats(self, stream_id: str, s: _StreamSlot | None = None) -> StreamStatsSnapshot:
        s = s or self._slot(stream_id)
        values = s.latencies.values()
        st = s.stats
        st.latency_p50_ms = percentile(values, 50) * 1000 if values else 0.0
        st.latency_p99_ms = percentile(values, 99) * 1000 if values else 0.0
        gaps = list(s.gaps_ms)
        if len(gaps) >= 2:
            st.jitter_ms = sum(abs(b - a) for a, b in zip(gaps, gaps[1:])) / (len(gaps) - 1)
        if s.frames_out_span_s > 0:
            st.output_fps = max(0, st.frames_out - 1) / s.frames_out_span_s
        st.queue_depth = len(s.queue)
        return StreamStatsSnapshot(**vars(st))

    # -- load (called by the router and the metrics reporter) -------------------------------------------------

    def load(self, *, drain_samples: bool = False) -> PipelineStats:
        now = self.clock()
        recent = [t for t in self._fps_window if now - t[0] <= 5.0]
        fps = sum(n for _, n in recent) / 5.0 if recent else 0.0
        stats = PipelineStats(
            pipeline=self.name,
            model=self.spec.model,
            gpu_type=self.spec.gpu_type,
            healthy=self._failure is None,
            max_streams=self.spec.max_streams,
            active_streams=len(self.streams),
            queue_depth=sum(len(s.queue) for s in self.streams.values()),
            tick_ms_ema=self._tick_ms_ema,
            tick_ms_by_batch=dict(self._tick_by_batch),
            output_fps=fps,
            frames_out_total=self._frames_out_total,
            frames_skipped_total=self._skipped_total,
            deadline_misses_total=self._misses_total,
            gpu_memory_bytes=self.executor.memory_bytes(),
            active_stream_ids=sorted(self.streams),
        )
        if drain_samples:
            sm = self._samples
            stats.ttff_ms_samples, stats.latency_ms_samples = sm.ttff_ms_samples, sm.latency_ms_samples
            stats.jitter_ms_samples, stats.tick_ms_samples = sm.jitter_ms_samples, sm.tick_ms_samples
            stats.skipped_by_tier, stats.misses_by_tier = sm.skipped_by_tier, sm.misses_by_tier
            self._samples = PipelineStats(pipeline=self.name, model=self.spec.model, gpu_type=self.spec.gpu_type)
        return stats

    # -- the loop --------------------------------------------------------------------------------------------

    async def _beat(self) -> None:
        """Wake the loop every HEARTBEAT_S even without traffic (idle reaping)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()  # frames, controls, or the heartbeat
                self._wake.clear()
                await self._reap_idle()
                await self._feed()
                ready = await self.executor.ready_streams()
                if ready:
                    await self._tick(ready)
                    self._wake.set()  # more chunks may be ready; yield to the loop first
                    await asyncio.sleep(0)
                await self._finish_ending()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine broke: fail every stream, let check_health restart us
            log.exception("pipeline %s failed", self.name)
            self._failure = exc
            for s in list(self.streams.values()):
                s.events.put_nowait(StreamEvent(error=PipelineFailedError(
                    f"pipeline {self.name} failed ({type(exc).__name__}); reconnect")))

    def _predicted_latency_us(self, s: _StreamSlot) -> int:
        """Time from now until a frame entering the engine now leaves: its own tick, then n-1 more chunks
        of the stream batch, each at least a chunk interval apart (the stream's input paces them).

        Example: tick 100 ms, n = 2, 8 fps (chunk interval 500 ms) -> 100 + 500 = 600 ms.
        """
        tick_us = self._tick_ms_ema * 1000
        chunk_us = CHUNK_FRAMES / s.req.input_fps * 1e6
        return int(tick_us + (max(1, s.req.num_steps) - 1) * max(tick_us, chunk_us))

    async def _feed(self) -> None:
        """Hand each stream's next chunk to the engine, skipping frames that cannot meet their deadline.

        The backlog stays here, not in the engine, so a stream that fell behind skips its stale frames
        (oldest first, never its newest) instead of making every later frame late too.
        """
        now = now_us()
        for s in list(self.streams.values()):
            if not s.queue:
                continue
            room = (CHUNK_FRAMES if s.started else 1) - self.executor.pending_frames(s.stream_id)
            if s.ending:
                room = len(s.queue)
            take: list[InFrame] = []
            predicted = self._predicted_latency_us(s)
            while s.queue and len(take) < room:
                f = s.queue.popleft()
                late = now + predicted > f.received_ts_us + s.deadline_us
                if late and s.started and s.queue and not s.ending:  # a newer frame waits: skip this one
                    self._skip(s, 1)
                    continue
                take.append(f)
            if not take:
                continue
            for f in take:
                s.meta[f.seq] = (f.capture_ts_us, f.received_ts_us)
            s.started = True
            await self.executor.add_frames(s.stream_id, [(f.seq, f.frame) for f in take])

    async def _tick(self, ready: list[str]) -> None:
        deadlines = {}
        for sid in ready:
            s = self.streams.get(sid)
            if s is not None and s.meta:
                deadlines[sid] = (min(r for _, r in s.meta.values()) + s.deadline_us) / 1e6
        ids = [sid for sid in self.policy.choose(ready, deadlines, self.clock()) if sid in self.streams]
        if not ids:
            return
        t0 = time.perf_counter()
        outputs = await self.executor.step(ids)
        tick_ms = (time.perf_counter() - t0) * 1000
        self._record_tick(len(ids), tick_ms)
        for sid, frames in outputs.items():
            s = self.streams.get(sid)
            if s is not None:
                self._deliver(s, frames)

    async def _finish_ending(self) -> None:
        for s in list(self.streams.values()):
            if s.ending and not s.queue:
                out = await self.executor.flush(s.stream_id)
                self._deliver(s, out)
                s.events.put_nowait(StreamEvent(ended=True))
                self.streams.pop(s.stream_id, None)
                await self.executor.close_stream(s.stream_id)

    async def _reap_idle(self) -> None:
        now = self.clock()
        for s in list(self.streams.values()):
            if not s.ending and now - s.last_activity_s > self.service.idle_timeout_s:
                log.info("closing idle stream %s", s.stream_id)
                await self.close(s.stream_id)

    def _record_tick(self, batch: int, tick_ms: float) -> None:
        self._tick_ms_ema = tick_ms if self._tick_ms_ema == 0 else (1 - TICK_EMA) * self._tick_ms_ema + TICK_EMA * tick_ms
        prev = self._tick_by_batch.get(batch)
        self._tick_by_batch[batch] = tick_ms if prev is None else (1 - TICK_EMA) * prev + TICK_EMA * tick_ms
        self._samples.tick_ms_samples.append(tick_ms)

    def _skip(self, s: _StreamSlot, n: int) -> None:
        s.stats.frames_skipped += n
        self._skipped_total += n
        tiers = self._samples.skipped_by_tier
        tiers[s.req.tier] = tiers.get(s.req.tier, 0) + n

    def _deliver(self, s: _StreamSlot, frames: list) -> None:
        if not frames:
            return
        out_us = now_us()
        outs: list[OutFrame] = []
        tier = s.req.tier
        for f in frames:
            capture_us, received_us = s.meta.pop(f.seq, (0, out_us))
            outs.append(OutFrame(seq=f.seq, frame=f.frame, capture_ts_us=capture_us,
                                 received_ts_us=received_us, output_ts_us=out_us))
            latency_s = (out_us - received_us) / 1e6
            s.latencies.record(latency_s)
            self._samples.latency_ms_samples.append((tier, latency_s * 1000))
            if out_us - received_us > s.deadline_us:
                s.stats.deadline_misses += 1
                self._misses_total += 1
                self._samples.misses_by_tier[tier] = self._samples.misses_by_tier.get(tier, 0) + 1
        if s.first_out_us == 0:
            s.first_out_us = out_us
            s.stats.ttff_ms = (out_us - s.opened_us) / 1000
            self._samples.ttff_ms_samples.append((tier, s.stats.ttff_ms))
        elif s.last_out_us:
            gap = (out_us - s.last_out_us) / 1000
            if s.gaps_ms:  # jitter: |change| of consecutive output intervals
                self._samples.jitter_ms_samples.append((tier, abs(gap - s.gaps_ms[-1])))
            s.gaps_ms.append(gap)
        s.last_out_us = out_us
        s.stats.frames_out += len(outs)
        self._frames_out_total += len(outs)
        self._fps_window.append((self.clock(), len(outs)))
        # bounded per-client buffer: a client that does not read loses its own oldest frames only
        s.out_frames_queued += len(outs)
        overflow = s.out_frames_queued - self.service.output_queue_frames
        if overflow > 0:
            outs = outs[overflow:]
            s.out_frames_queued -= overflow
            self._skip(s, overflow)
        s.events.put_nowait(StreamEvent(frames=outs))

    def _slot(self, stream_id: str) -> _StreamSlot:
        s = self.streams.get(stream_id)
        if s is None:
            self.check_health()
            raise StreamNotFoundError(f"stream {stream_id!r} is not open on {self.name}", stream_id=stream_id)
        return s


async def _get_within(queue: asyncio.Queue, timeout_s: float):
    """queue.get() or None after timeout_s. (Not asyncio.wait_for: on Python 3.11 it can swallow a
    cancellation that races with the result, and a vanished client's cancellation must never be lost.)"""
    getter = asyncio.ensure_future(queue.get())
    try:
        done, _ = await asyncio.wait({getter}, timeout=timeout_s)
    finally:
        if not getter.done():
            getter.cancel()
    return getter.result() if getter in done else None


# ---- the Serve deployment ------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=5, graceful_shutdown_timeout_s=5)
class Pipeline:
    """Serve shim over PipelineCore. One replica per pipeline deployment (stream affinity by name).

    `executor_factory` builds the executor from the spec (default: an in-process StreamEngine);
    `metrics` is an optional handle of the exporter deployment, fed a PipelineStats every stats interval.
    """

    def __init__(self, name: str, spec: PipelineSpec, service: ServiceConfig, metrics=None,
                 executor_factory: Callable[[PipelineSpec], Executor] | None = None) -> None:
        executor = (executor_factory or build_engine_executor)(spec)
        self.core = PipelineCore(name, spec, executor, service=service)
        self._metrics = metrics
        self._reporter: asyncio.Task | None = None

    def _ensure_started(self) -> None:
        self.core.start()
        if self._reporter is None and self._metrics is not None:
            self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.core.service.stats_interval_s)
            try:
                await self._metrics.record_pipeline.remote(self.core.load(drain_samples=True))
            except Exception:  # noqa: BLE001 - metrics must never take a pipeline down
                log.warning("metrics report from %s failed", self.core.name, exc_info=True)

    async def open(self, stream_id: str, req: OpenRequest, opened_us: int) -> None:
        self._ensure_started()
        await self.core.open(stream_id, req, opened_us)

    async def push(self, stream_id: str, frames: list[InFrame]) -> int:
        return await self.core.push(stream_id, frames)

    async def control(self, stream_id: str, op: str, value: object = None) -> None:
        if op == "prompt":
            await self.core.set_prompt(stream_id, str(value))
        elif op == "steps":
            await self.core.set_steps(stream_id, int(value))
        elif op == "paused":
            self.core.count_paused(stream_id, int(value))
        elif op == "end":
            await self.core.end(stream_id)
        else:
            raise ValueError(f"unknown control op {op!r}")

    async def events(self, stream_id: str) -> AsyncIterator[StreamEvent]:
        async for ev in self.core.events(stream_id):
            yield ev

    async def close(self, stream_id: str) -> None:
        await self.core.close(stream_id)

    async def stream_stats(self, stream_id: str) -> StreamStatsSnapshot:
        return self.core.stream_stats(stream_id)

    async def load(self) -> PipelineStats:
        self._ensure_started()
        return self.core.load()

    def check_health(self) -> None:
        self.core.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.core.load()
        return {"active_streams": float(load.active_streams), "queue_depth": float(load.queue_depth)}
