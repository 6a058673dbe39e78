"""The pipeline: one engine (one GPU, or the CPU) serving many streams, and its Serve deployment.

Three layers, each replaceable:

    Executor          the engine API as coroutines. InProcessExecutor runs a StreamEngine on one worker
                      thread (calls stay ordered, the event loop stays free); a compiled graph of stage
                      actors implements the same protocol.
    PipelineCore      plain asyncio, no Ray: cuts each stream's frames into chunks, drives the SLO-aware
                      `scheduling.batching.BatchingScheduler`, runs its plans on the executor, and keeps
                      per-stream output queues and stats. Unit-testable with a real tiny engine.
    Pipeline          the Serve deployment: a thin shim that owns a PipelineCore and exposes it to the
                      ingress (open / push / control / events / close) and the router (load).

One tick of the loop (the scheduler's module docstring, "Driving it"):

    1. cut queued frames into chunks (1 frame first, then 4; a partial last chunk at the end of input) and
       `add_chunk(Chunk(seq, arrivals))` with each frame's arrival on the scheduler's clock
    2. plan = schedule(now). plan.skipped: chunks that could no longer meet their deadline (or overflowed
       the stream's queue) are dropped, never run; their frames are counted per stream, per tier and per
       reason, and the client gets a StreamStats message at once
    3. run the plan (`_run_plan`): encode + DiT + decode of the admitted chunks in ONE executor.step (the
       engine prefills first chunks, stream-batches the rest, and runs a step-by-step stream's n steps back
       to back); a stream with work but no new chunk (a stream batch that must drain, or chunks left in
       flight by a mode switch) is flushed. The engine's mode of a stream follows the plan's mode (switched
       before its next chunk, nothing in flight, no frame lost). Where a step per stream costs the same
       (`forwards_per_stream`), the streams are stepped one at a time, back to back in the engine's
       thread (`InProcessExecutor.step_each`): the GPU does not wait for the event loop between them
    4. frames go to their stream's bounded queue as soon as the engine returns them; update_from_output
       gets the measured times and, per emitted chunk, when its frames really left

Timing fed back (so the seeded profile, scheduling.priors, converges on this machine): the whole tick
always (the scheduler's tick estimate and utilization); the DiT time only for plans whose engine work
was one shared stream-batch forward, estimated as the tick minus the profile's encode and decode
predictions (the engine does not time its stages separately).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Protocol

from ray import serve

from deployments.affinity import ROUTING_STATS_PERIOD_S, request_router_config
from deployments.autoscaling import MAX_STREAM_S, AutoscalingStatsRecorder
from deployments.config import PipelineSpec, ServiceConfig
from deployments.messages import (
    InFrame,
    OpenRequest,
    OutFrame,
    PipelineStats,
    PromptChange,
    StreamEvent,
    StreamStatsSnapshot,
)
from scheduling.admission import STARTUP_CHUNKS, Warming
from scheduling.batching import (
    BatchingConfig,
    BatchingScheduler,
    BatchMode,
    BatchOutput,
    BatchPlan,
    Chunk,
    SkippedChunk,
    SkipReason,
    StreamSpec,
)
from scheduling.priors import VAE_KINDS, prior_of, seed_profile, vae_kind_ratio, work_scales
from scheduling.profile import Stage, StageProfile
from scheduling.slo import MAX_FRAME_DEADLINE_S, MAX_TTFF_S, LatencyWindow, StreamSLO, percentile
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
FIRST_CHUNK_FRAMES = 1
"""Frames of a stream's first chunk (Weir starts from frame 0 alone; see stages.engine)."""
TICK_EMA = 0.2
"""Smoothing of the measured tick time per batch size (reported, informational)."""
HEARTBEAT_S = 1.0
"""The loop wakes at least this often (idle streams are reaped on wake-ups)."""
ROUTER_DEPLOYMENT = "Router"
"""Name of the Router deployment each pipeline replica reports its load to."""
DRAIN_AFTER_S = 5 * ROUTING_STATS_PERIOD_S
"""A replica whose routing stats Serve has not pulled for this long says it is draining (class Pipeline)."""
SLOW_TICK_FACTOR = 3.0
SLOW_TICK_MIN_S = 0.25
"""A tick slower than SLOW_TICK_FACTOR times its plan's prediction and than SLOW_TICK_MIN_S is a stall
(a compile, a capture, a collection, a host hiccup): counted (`weir_slow_ticks`) and logged with what
the tick held (`PipelineCore._note_slow_tick`)."""
SLOW_TICK_LOG_EVERY_S = 10.0
"""At most one slow-tick warning per this many seconds; the ones between are counted in the next."""


def now_us() -> int:
    return time.time_ns() // 1000


# ---- executor ------------------------------------------------------------------------------------------


class Executor(Protocol):
    """The engine API the batching loop drives (see stages.engine.StreamEngine), as coroutines.

    An executor whose `forwards_per_stream` is True also offers `step_each` (InProcessExecutor.step_each):
    the streams stepped one at a time without a return to the event loop in between."""

    async def open_stream(self, stream_id: str, params: object) -> None: ...
    async def add_frames(self, stream_id: str, frames: list[tuple[int, object]]) -> None: ...
    async def ready_streams(self) -> list[str]: ...
    def pending_frames(self, stream_id: str) -> int: ...
    async def step(self, stream_ids: list[str]) -> dict[str, list]: ...
    async def set_step_mode(self, stream_id: str, step_by_step: bool) -> list: ...
    async def set_prompt(self, stream_id: str, prompt: object, *, blend_chunks: int = 0) -> None: ...
    async def set_steps(self, stream_id: str, num_steps: int) -> list: ...
    async def flush(self, stream_id: str) -> list: ...
    async def close_stream(self, stream_id: str) -> None: ...
    def memory_bytes(self) -> int: ...

    tick_times: object
    """The latest step's stage times (stages.engine.TickTimes) when the executor measures them, else None."""
    forwards_per_stream: bool
    """True when stepping streams one at a time costs what one step over all of them costs:
    PipelineCore then steps them one by one (`step_each`)."""


class InProcessExecutor:
    """A StreamEngine in this process, driven from one worker thread (calls run in submission order).

    Step-by-step mode uses the engine's own (`StreamEngine.set_step_mode`) when it has one; otherwise it
    is emulated: the chunk enters the stream batch in the shared step, then drain ticks push it through
    its remaining n-1 steps at once (n forwards back to back, emitted together).
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weir-engine")
        self._native_modes = hasattr(engine, "set_step_mode")
        self._emulated_sbs: set[str] = set()
        self.tick_times = None

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

    @property
    def forwards_per_stream(self) -> bool:
        """StreamEngine.forwards_per_stream (Executor.forwards_per_stream)."""
        return self.engine.forwards_per_stream

    def _step_now(self, stream_ids) -> dict[str, list]:
        """One engine step, in the engine's thread; sets tick_times."""
        out = self.engine.step(stream_ids)
        self.tick_times = self.engine.tick_times
        for sid in stream_ids:
            if sid in self._emulated_sbs:
                out[sid] = list(out.get(sid, [])) + self.engine.flush(sid)
                self.tick_times = None  # drain forwards ran after the timed stages
        return out

    async def step(self, stream_ids):
        return await self._call(self._step_now, stream_ids)

    async def step_each(self, stream_ids, on_done: Callable[[str, list, object, float], None],
                        clock: Callable[[], float] = time.monotonic) -> None:
        """Step each stream on its own, back to back in the engine's thread, so that the GPU does not
        wait for the event loop between them (it may be busy sending the last stream's frames).
        `on_done(stream_id, frames, tick_times, step_s)` runs on the event loop as each step ends, in
        order, all before this returns; step_s is the step's time on `clock`."""
        loop = asyncio.get_running_loop()

        def run() -> None:
            for sid in stream_ids:
                t = clock()
                out = self._step_now([sid])
                loop.call_soon_threadsafe(on_done, sid, out.get(sid, []), self.tick_times, clock() - t)

        await self._call(run)

    async def set_step_mode(self, stream_id, step_by_step):
        if self._native_modes:
            return await self._call(self.engine.set_step_mode, stream_id, step_by_step)
        if step_by_step:
            self._emulated_sbs.add(stream_id)
            return await self._call(self.engine.flush, stream_id)  # drain the stream batch first
        self._emulated_sbs.discard(stream_id)
        return []

    async def set_prompt(self, stream_id, prompt, *, blend_chunks: int = 0) -> None:
        await self._call(lambda: self.engine.set_prompt(stream_id, prompt, blend_chunks=blend_chunks))

    async def set_steps(self, stream_id, num_steps):
        return await self._call(self.engine.set_steps, stream_id, num_steps)

    async def flush(self, stream_id):
        return await self._call(self.engine.flush, stream_id)

    async def close_stream(self, stream_id) -> None:
        self._emulated_sbs.discard(stream_id)
        await self._call(self.engine.close_stream, stream_id)

    def graphs_disabled(self) -> int:
        """The engine's CUDA-graph runners (DiT shards, VAE stages) that run eager after failed captures."""
        c = self.engine.components
        stages = [*getattr(c.dit, "shards", ()), *c.encoders.values(), *c.decoders.values()]
        return sum(1 for st in stages if getattr(st, "graphs", None) is not None and not st.graphs.enabled)

    def has_room_for_spare(self) -> bool:
        """Whether the warm pool may hold one more stream state: more than SPARE_MEMORY_RESERVE of the
        GPU's memory is free (always on the CPU)."""
        import torch

        if self.engine.device.type != "cuda":
            return True
        free, total = torch.cuda.mem_get_info(self.engine.device)
        return free > SPARE_MEMORY_RESERVE * total

    def memory_bytes(self) -> int:
        try:
            import torch

            if self.engine.device.type == "cuda":
                return int(torch.cuda.memory_allocated(self.engine.device))
        except Exception:  # noqa: BLE001 - a metric, never a failure
            pass
        return 0


async def build_graph_executor(spec: PipelineSpec):
    """Production default on GPUs: stage actors on the replica's GPU bundles (bundle 0 holds the
    replica itself), wired by a compiled graph over NCCL; the DiT blocks split over spec.num_gpus."""
    import ray

    from cluster.graph import CompiledGraphExecutor
    from cluster.plan import build_plan
    from cluster.stage_actor import WorkerOptions

    plan = build_plan(spec.num_gpus, model=spec.model, device=spec.device, dtype=spec.dtype, vae=spec.vae,
                      checkpoint_dir=spec.checkpoint_dir)
    options = WorkerOptions(cuda_graphs=spec.device == "cuda", env_vars={"NCCL_NVLS_ENABLE": "0"},
                            spare_streams=spec.resolved_spare_streams)
    executor = await CompiledGraphExecutor.create(
        plan, placement_group=ray.util.get_current_placement_group(), bundle_offset=1, options=options,
        ring=spec.ring,
    )
    return executor


CALIBRATION_TICKS = 4
"""Steady warm-up ticks per step count that calibrate the profile (after the KV caches have filled)."""
STARTUP_PROBES = 3
"""Streams the warm-up opens on the warm pool to time a start-up (enough for the profile to fit one)."""
SPARE_MEMORY_RESERVE = 0.3
"""The warm pool grows only while more than this fraction of the GPU's memory is free."""


async def warm_up_executor(executor: Executor, height: int, width: int, *, steps: tuple[int, ...] = (1, 2),
                           vae: str = "wan", chunks: int | None = None,
                           ticks: list[tuple[int, float, object]] | None = None, streams: int = 1,
                           startups: list[float] | None = None,
                           failures: list[BaseException] | None = None) -> float:
    """Run throwaway streams through any executor before clients arrive (the graph executor's
    counterpart of StreamEngine.warm_up). Returns seconds; a failure is logged, not raised: a cold
    pipeline still serves, only slower at first.

    Per step count, `streams` streams are run one after another, all kept open, then closed: their
    states stay on the DiT as spares with their CUDA graphs (stages.dit_stage, "Spare states"), so up
    to `streams` clients start without eager DiT calls or DiT captures. The pool stops growing while
    the executor says its memory is short (`has_room_for_spare`, when it has one).

    Each stream runs `chunks` chunks after its first frame (default: until its KV caches are full, so
    the full-cache attention is compiled and captured too, plus CALIBRATION_TICKS steady ones).
    `ticks`, when given, receives (rows, seconds, stage times or None; Executor.tick_times) of the last
    CALIBRATION_TICKS frame-emitting ticks of each step count's first stream (one chunk encoded, one
    forward over n rows for an n-step stream, one chunk decoded): PipelineCore.calibrate turns them
    into the profile. `startups`, when given, receives the start-up cost (seconds beyond steady
    ticks over a stream's first STARTUP_CHUNKS steps) of STARTUP_PROBES streams opened on the pool of
    the first step count: what the next clients' start-ups cost. `failures`, when given, receives
    each exception the warm-up logged."""
    import numpy as np

    from scheduling.admission import STARTUP_CHUNKS
    from stages.config import StreamConfig
    from stages.engine import StreamParams

    t0 = time.monotonic()
    frame = np.full((height, width, 3), 128, np.uint8)
    full_chunks = StreamConfig().num_kv_cache_frames + 2

    async def run(sid: str, n: int, num_chunks: int) -> list[tuple[int, float, object, bool]]:
        """Open and run one stream (left open); per step (rows, seconds, stage times, emitted frames)."""
        await executor.open_stream(sid, StreamParams(prompt="warm up", num_steps=n, height=height,
                                                     width=width, vae=vae))
        timed = []
        for seq in range(1 + 4 * num_chunks):
            await executor.add_frames(sid, [(seq, frame)])
            if sid in await executor.ready_streams():
                t = time.monotonic()
                out = await executor.step([sid])
                timed.append((n, time.monotonic() - t, executor.tick_times, bool(out.get(sid))))
        await executor.flush(sid)
        return timed

    async def close(sid: str) -> None:
        try:
            await executor.close_stream(sid)
        except Exception:  # noqa: BLE001 - see docstring
            log.warning("closing warm-up stream %s failed", sid, exc_info=True)

    room = getattr(executor, "has_room_for_spare", lambda: True)
    for k, n in enumerate(steps):
        opened: list[str] = []
        steady_s: list[float] = []
        try:
            for i in range(max(1, streams)):
                if i and not room():
                    log.info("warm pool of %d-step streams stops at %d: GPU memory is short", n, i)
                    break
                sid = f"__warm_up_{n}_{i}"
                opened.append(sid)
                num_chunks = chunks if chunks is not None else n + full_chunks + (CALIBRATION_TICKS if i == 0 else 0)
                timed = await run(sid, n, num_chunks)
                if i == 0:
                    steady = [(rows, sec, times) for rows, sec, times, emitted in timed if emitted][-CALIBRATION_TICKS:]
                    steady_s = [sec for _, sec, _ in steady]
                    if ticks is not None:
                        ticks.extend(steady)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("warm-up of %d-step streams failed", n, exc_info=True)
            if failures is not None:
                failures.append(exc)
        finally:
            for sid in opened:
                await close(sid)
        if startups is None or k or not steady_s:
            continue
        steady = sorted(steady_s)[len(steady_s) // 2]
        for i in range(STARTUP_PROBES):
            sid = f"__warm_up_probe_{n}_{i}"
            try:
                timed = await run(sid, n, max(STARTUP_CHUNKS, 1 if chunks is None else chunks))
                startups.append(sum(max(0.0, sec - steady) for _, sec, _, _ in timed[:STARTUP_CHUNKS]))
            except Exception:  # noqa: BLE001 - see docstring
                log.warning("start-up probe of %d-step streams failed", n, exc_info=True)
            finally:
                await close(sid)
    return time.monotonic() - t0


REBALANCE_PERIOD_S = 10.0
"""How often a multi-GPU pipeline offers its measured stage times to the block rebalancer."""


def build_engine_executor(spec: PipelineSpec) -> InProcessExecutor:
    """Production default: a StreamEngine for the spec, in process."""
    import torch

    from stages.engine import EngineSpec, StreamEngine

    if spec.device == "cpu":
        torch.set_num_threads(max(1, round(spec.num_cpus)))
    engine = StreamEngine(
        EngineSpec(model=spec.model, vae=spec.vae, device=spec.device, dtype=spec.dtype,
                   checkpoint_dir=spec.checkpoint_dir, spare_streams=spec.resolved_spare_streams)
    )
    return InProcessExecutor(engine)


def split_tick(profile: StageProfile, tick_s: float, times, *, chunks_in: int, rows: int,
               chunks_out: int) -> tuple[float, float, float]:
    """(encode, DiT, decode) seconds of a tick that was one shared forward, as the profile should learn
    them; 0 means "not measured".

    With the engine's measured stage times (stages.engine.TickTimes, its counts matching the tick's)
    the tick's wall time is split in their proportions, so the profile prices what a tick really costs,
    host work around the stages (frame hand-over, the loop) included. Example: stages 3 + 18 + 5 ms in
    a 32 ms tick -> 3.7, 22.2, 6.2 ms. Without them the DiT is the tick minus the profile's encode and
    decode predictions, and the VAE curves learn nothing.
    """
    if (times is not None and (times.encode_chunks, times.rows, times.decode_chunks) == (chunks_in, rows, chunks_out)):
        measured = times.encode_s + times.dit_s + times.decode_s
        if measured > 0.0:
            scale = max(1.0, tick_s / measured)
            return times.encode_s * scale, times.dit_s * scale, times.decode_s * scale
    dit_s = tick_s - profile.encode_s(chunks_in) - profile.decode_s(chunks_out)
    return 0.0, max(0.0, dit_s), 0.0


def total_tick_times(times: list):
    """Stage times (stages.engine.TickTimes) of several steps added up; None when any is None."""
    if not times or any(t is None for t in times):
        return None
    return replace(times[0], **{f.name: sum(getattr(t, f.name) for t in times) for f in fields(times[0])})


def stream_params(req: OpenRequest):
    from stages.engine import StreamParams

    return StreamParams(
        prompt=req.prompt_mix, num_steps=req.num_steps, noise_scale=req.noise_strength, seed=req.seed,
        height=req.height, width=req.width, vae=req.vae or None, first_chunk_frames=FIRST_CHUNK_FRAMES,
    )


def stream_spec(req: OpenRequest, model: str, profile_vae: str) -> StreamSpec:
    """The scheduler's view of a stream of `model` on a pipeline whose profile measures VAE kind
    `profile_vae`. SLOs beyond the scheduler's bounds (TTFF 60 s, deadline 10 s) are clamped to them:
    such a stream is never skipped for lateness short of that. Its work is scaled from the model's
    nominal shape to its resolution (scheduling.priors `work_scales`), and its chunks to its VAE kind
    (`vae_kind_ratio`).

    Example: OpenRequest(num_steps=2, input_fps=8, ttff_ms=3000, frame_deadline_ms=60000, height=64,
    width=64) of "tiny" -> StreamSpec(2, 8.0, StreamSLO(3.0, 10.0), first_chunk_frames=1) (64x64 is
    the tiny model's nominal shape: both scales 1).
    """
    slo = StreamSLO(ttff_s=min(req.ttff_ms / 1000, MAX_TTFF_S),
                    frame_deadline_s=min(req.frame_deadline_ms / 1000, MAX_FRAME_DEADLINE_S))
    dit_scale, vae_scale = work_scales(model, req.height, req.width)
    vae_scale *= vae_kind_ratio(model, req.vae, profile_vae)
    return StreamSpec(num_steps=req.num_steps, input_fps=min(req.input_fps, 120.0), slo=slo,
                      first_chunk_frames=FIRST_CHUNK_FRAMES, dit_scale=dit_scale, vae_scale=vae_scale)


def build_scheduler(spec: PipelineSpec, profile: StageProfile | None = None) -> BatchingScheduler:
    """The pipeline's batching scheduler, its profile seeded from scheduling.priors for the spec's model
    and GPU class (corrected online by the pipeline's measurements)."""
    prior = prior_of(spec.model, spec.vae)
    profile = profile or seed_profile(spec.model, spec.gpu_type, spec.vae)
    return BatchingScheduler(BatchingConfig(num_blocks=prior.num_blocks), profile)


# ---- per-stream state ------------------------------------------------------------------------------------


async def warm_up_pipeline(core: PipelineCore) -> None:
    """Before a replica takes clients: on a GPU, warm up and calibrate at 480x832 (the first client's
    TTFF must not pay for kernels, cuDNN tuning and graph captures, and the router's first admissions
    should see this GPU's own times, not only the priors); then warm up each of the spec's
    `warm_resolutions` (their compiles, on any device; one stream, no calibration: the profile is the
    nominal shape's); the other VAE kind at 480x832 after the spec's. Every shape warmed joins the
    replica's warm shapes, (height, width, VAE kind)."""
    spec, executor = core.spec, core.executor
    if spec.device == "cuda":
        ticks: list[tuple[int, float, object]] = []
        startups: list[float] = []
        await warm_up_executor(executor, 480, 832, steps=(1, 2), vae=spec.vae, ticks=ticks,
                               streams=spec.resolved_warm_streams, startups=startups)
        core.calibrate(ticks, startups)
        core.warm_shapes.add((480, 832, spec.vae))
        for vae in VAE_KINDS:
            await core.warm_shape(480, 832, vae)
    for height, width in spec.warm_resolutions:
        await core.warm_shape(height, width, spec.vae)


@dataclass
class _StreamSlot:
    stream_id: str
    req: OpenRequest
    opened_us: int
    queue: deque = field(default_factory=deque)
    """(InFrame, arrival on the scheduler clock) not yet cut into a chunk."""
    chunks: dict[int, list[InFrame]] = field(default_factory=dict)
    """chunk seq -> frames of chunks queued in the scheduler (not yet in the engine)."""
    arrivals: dict[int, tuple[float, ...]] = field(default_factory=dict)
    """chunk seq -> its frames' arrivals on the scheduler clock (while queued)."""
    next_chunk: int = 0
    in_engine: dict[int, int] = field(default_factory=dict)
    """chunk seq -> frames of it still inside the engine."""
    frame_chunk: dict[int, int] = field(default_factory=dict)
    """frame seq -> chunk seq, for frames inside the engine."""
    delivered_s: dict[int, float] = field(default_factory=dict)
    """chunk seq -> when its last frame left (scheduler clock), until the scheduler emits it."""
    engine_step_by_step: bool = False
    meta: dict[int, tuple[int, int]] = field(default_factory=dict)
    """seq -> (capture_ts_us, received_ts_us) of frames inside the engine."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    out_frames_queued: int = 0
    ending: bool = False
    input_ended: bool = False
    closed: bool = False
    last_seq: int = -1
    last_activity_s: float = field(default_factory=time.monotonic)
    stats: StreamStatsSnapshot = None  # type: ignore[assignment]
    latencies: LatencyWindow = field(default_factory=lambda: LatencyWindow(1024))
    gaps_ms: deque = field(default_factory=lambda: deque(maxlen=256))
    first_out_us: int = 0
    last_out_us: int = 0
    startup_left: int = STARTUP_CHUNKS
    """Chunks of the stream's start-up still to run (scheduling.admission.STARTUP_CHUNKS)."""
    startup_excess_s: float = 0.0
    """Time its start-up chunks took beyond steady chunks, so far."""
    startup_timed: bool = True
    """False once a start-up chunk ran in a step shared with other streams (its time is not its own)."""

    def __post_init__(self) -> None:
        self.stats = StreamStatsSnapshot(stream_id=self.stream_id)

    @property
    def deadline_us(self) -> int:
        return int(self.req.frame_deadline_ms * 1000)

    @property
    def frames_out_span_s(self) -> float:
        return (self.last_out_us - self.first_out_us) / 1e6 if self.first_out_us else 0.0

    @property
    def queued_frames(self) -> int:
        return len(self.queue) + sum(len(c) for c in self.chunks.values())


# ---- the core ------------------------------------------------------------------------------------------


class PipelineCore:
    """The batching loop over one executor. All methods run on one asyncio loop.

    `scheduler` defaults to `build_scheduler(spec)`; `clock` is the scheduler's clock (seconds).
    """

    def __init__(self, name: str, spec: PipelineSpec, executor: Executor, *, service: ServiceConfig | None = None,
                 scheduler: BatchingScheduler | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.spec = spec
        self.service = service or ServiceConfig()
        self.executor = executor
        self.scheduler = scheduler or build_scheduler(spec)
        self.clock = clock
        self.streams: dict[str, _StreamSlot] = {}
        self.warm_shapes: set[tuple[int, int, str]] = set()
        """(height, width, VAE kind) this pipeline has run: the warm-ups' and every opened stream's."""
        self.warming_shapes: set[tuple[int, int, str]] = set()
        """Shapes a warm-up is compiling now (`warm_shape`)."""
        self._wake = asyncio.Event()
        self._engine_lock = asyncio.Lock()
        """Held while a plan runs and by controls that reshape a stream (one engine user at a time)."""
        self._task: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._failure: BaseException | None = None
        self._tick_ms_ema = 0.0
        self._tick_by_batch: dict[int, float] = {}
        self._fps_window: deque = deque(maxlen=512)
        self._frames_out_total = 0
        self._skipped_total = 0
        self._skipped_by_reason: dict[str, int] = {}
        self._misses_total = 0
        self._slow_ticks_total = 0
        self._shape_warmups_total = 0
        self._slow_ticks_unlogged = 0
        self._slow_tick_logged_s: float | None = None
        self._samples = PipelineStats(pipeline=name, model=spec.model, gpu_type=spec.gpu_type)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def calibrate(self, ticks: Sequence[tuple[int, float, object]], startups: Sequence[float] = ()) -> int:
        """Feed measured single-stream warm-up ticks (rows, seconds, stage times or None;
        warm_up_executor) into the profile, split into stages by split_tick. Returns how many ticks
        were used. Example: (1, 0.040, None) with encode + decode priced 0.016 s -> dit_block(1) =
        0.024 / 30.

        Every tick teaches the VAE curves (one chunk in, one out) when its stages were measured; only
        one-row ticks teach the DiT: the n rows of ONE stream's stream batch share their attention calls
        and cost less per row than rows of different streams (BENCHMARKS.md, "Serving"), which is what
        the profile prices; a one-size window keeps the prior's per-row shape, scaled to this GPU.
        `startups` (seconds; warm_up_executor's probes) teach the start-up curve; they are not counted."""
        profile = self.scheduler.profile
        for seconds in startups:
            profile.observe(Stage.STARTUP, 1, seconds)
        used = 0
        for rows, seconds, times in ticks:
            encode_s, dit_s, decode_s = split_tick(profile, seconds, times, chunks_in=1, rows=rows, chunks_out=1)
            taught = encode_s > 0.0
            if taught:
                profile.observe(Stage.ENCODE, 1, encode_s)
                profile.observe(Stage.DECODE, 1, decode_s)
            if rows == 1 and dit_s > 0.0:
                profile.observe_dit(rows, self.scheduler.config.num_blocks, dit_s)
                taught = True
            used += taught
        if used:
            snap = profile.snapshot()
            log.info("%s: profile calibrated from %d warm-up ticks: encode %.1f ms, DiT block %.2f ms + %.2f ms "
                     "per row, decode %.1f ms per chunk", self.name, used, snap.encode(1) * 1e3,
                     snap.dit_block.fixed_s * 1e3, snap.dit_block.per_item_s * 1e3, snap.decode(1) * 1e3)
        return used

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

    async def warm_shape(self, height: int, width: int, vae: str) -> bool:
        """Compile a shape (height, width, VAE kind) before a stream needs it: throwaway 1- and 2-step
        streams through the executor (`warm_up_executor`), holding the engine the while, so that no
        plan runs in between (the router sends streams here meanwhile only if their TTFF allows the
        wait: scheduling.admission, "Warm-ups on demand"). Returns whether the shape is warm now (False:
        it failed, logged; the shape stays cold). A shape already warm, or warming, is not warmed again
        (a second caller waits for the first)."""
        key = (int(height), int(width), str(vae))
        if key in self.warm_shapes:
            return True
        if key in self.warming_shapes:
            async with self._engine_lock:
                return key in self.warm_shapes
        self.warming_shapes.add(key)
        try:
            async with self._engine_lock:
                failures: list[BaseException] = []
                seconds = await warm_up_executor(self.executor, height, width, steps=(1, 2), vae=vae,
                                                 failures=failures)
            if failures:
                return False
            self.warm_shapes.add(key)
            self._shape_warmups_total += 1
            log.info("pipeline %s warmed %dx%d (%s VAE) up in %.1f s", self.name, height, width, vae, seconds)
            return True
        finally:
            self.warming_shapes.discard(key)

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
        spec = stream_spec(req, self.spec.model, self.spec.vae)
        await self.executor.open_stream(stream_id, stream_params(req))
        opened_us = opened_us or now_us()
        self.scheduler.add_stream(stream_id, spec, self._to_clock(opened_us))
        self.streams[stream_id] = _StreamSlot(stream_id, req, opened_us, events=asyncio.Queue())
        self.warm_shapes.add((req.height, req.width, req.vae or self.spec.vae))

    async def push(self, stream_id: str, frames: list[InFrame]) -> int:
        """Queue input frames; returns the stream's queued frames. Out-of-order seqs are BadFrameError."""
        s = self._slot(stream_id)
        for f in frames:
            if f.seq <= s.last_seq:
                raise BadFrameError(f"frame seq {f.seq} after {s.last_seq}: seqs must increase", seq=f.seq)
            if f.frame.shape != (s.req.height, s.req.width, 3):
                raise BadFrameError(f"frame {f.seq} has shape {f.frame.shape}", seq=f.seq)
            if s.ending:
                raise BadFrameError(f"frame {f.seq} arrived after the stream's end", seq=f.seq)
            s.last_seq = f.seq
            s.queue.append((f, self._to_clock(f.received_ts_us)))
            s.stats.frames_in += 1
        s.last_activity_s = self.clock()
        self._wake.set()
        return s.queued_frames

    async def set_prompt(self, stream_id: str, prompt, blend_chunks: int = 0) -> None:
        """A prompt or a stages.prompts.PromptMix, at once or blended over the next `blend_chunks`
        chunks (StreamEngine.set_prompt). BadRequestError changes nothing."""
        self._slot(stream_id)
        await self.executor.set_prompt(stream_id, prompt, blend_chunks=blend_chunks)

    async def set_steps(self, stream_id: str, num_steps: int) -> None:
        """Change n: the engine finishes the frames in flight with the old n (sent now); the scheduler
        restarts the stream with the new n, keeping its queued chunks."""
        s = self._slot(stream_id)
        async with self._engine_lock:
            out = await self.executor.set_steps(stream_id, num_steps)
            s.engine_step_by_step = False
            self._deliver(s, out)
            self.scheduler.finish_stream(stream_id)  # queued chunks are re-queued below, not skipped
            s.req = _replace_steps(s.req, num_steps)
            self.scheduler.add_stream(stream_id, stream_spec(s.req, self.spec.model, self.spec.vae), self.clock())
            for seq in sorted(s.chunks):
                self.scheduler.add_chunk(stream_id, Chunk(seq, s.arrivals[seq]))
            if s.input_ended:
                self.scheduler.end_input(stream_id)
        self._wake.set()

    def count_paused(self, stream_id: str, num_frames: int) -> None:
        self._slot(stream_id).stats.frames_paused += num_frames

    async def end(self, stream_id: str) -> None:
        """Finish the stream: its queued frames are run, flushed, sent, then an `ended` event."""
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
            self.scheduler.finish_stream(stream_id)
        except StreamNotFoundError:
            pass
        try:
            await self.executor.close_stream(stream_id)
        except WeirError:
            pass

    async def events(self, stream_id: str) -> AsyncIterator[StreamEvent]:
        """The stream's outputs, batched per wake-up, with a stats event every stats interval and right
        after frames of the stream were skipped.

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
                ended = any(ev.ended for ev in batch)
                if not ended and (self.clock() >= next_stats or any(ev.stats is not None for ev in batch)):
                    next_stats = self.clock() + interval
                    yield StreamEvent(stats=self.stream_stats(stream_id, s))
                if ended:
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
        st.queue_depth = s.queued_frames
        return StreamStatsSnapshot(**vars(st))

    def mode_of(self, stream_id: str) -> BatchMode:
        """The batching mode the scheduler currently gives the stream."""
        self._slot(stream_id)
        return self.scheduler.mode_of(stream_id)

    # -- load (called by the router and the metrics reporter) -------------------------------------------------

    def load(self, *, drain_samples: bool = False) -> PipelineStats:
        now = self.clock()
        recent = [t for t in self._fps_window if now - t[0] <= 5.0]
        fps = sum(n for _, n in recent) / 5.0 if recent else 0.0
        modes: dict[str, int] = {}
        for sid in self.streams:
            mode = self.scheduler.mode_of(sid).value
            modes[mode] = modes.get(mode, 0) + 1
        stats = PipelineStats(
            pipeline=self.name,
            model=self.spec.model,
            gpu_type=self.spec.gpu_type,
            healthy=self._failure is None,
            max_streams=self.spec.max_streams,
            active_streams=len(self.streams),
            queue_depth=sum(s.queued_frames for s in self.streams.values()),
            tick_ms_ema=self._tick_ms_ema,
            tick_ms_by_batch=dict(self._tick_by_batch),
            output_fps=fps,
            frames_out_total=self._frames_out_total,
            frames_skipped_total=self._skipped_total,
            deadline_misses_total=self._misses_total,
            slow_ticks_total=self._slow_ticks_total,
            shape_warmups_total=self._shape_warmups_total,
            gpu_memory_bytes=self.executor.memory_bytes(),
            cuda_graphs_disabled=getattr(self.executor, "graphs_disabled", lambda: 0)(),
            active_stream_ids=sorted(self.streams),
            active_requests={sid: s.req for sid, s in self.streams.items()},
            skipped_by_reason=dict(self._skipped_by_reason),
            streams_by_mode=modes,
            num_blocks=self.scheduler.config.num_blocks,
            profile=self.scheduler.profile.snapshot(),
            warming=self._warming(),
            warm_shapes=sorted(self.warm_shapes),
            warming_shapes=sorted(self.warming_shapes),
        )
        if drain_samples:
            sm = self._samples
            stats.ttff_ms_samples, stats.latency_ms_samples = sm.ttff_ms_samples, sm.latency_ms_samples
            stats.jitter_ms_samples, stats.tick_ms_samples = sm.jitter_ms_samples, sm.tick_ms_samples
            stats.executor_step_ms_samples = sm.executor_step_ms_samples
            stats.skipped_by_tier, stats.misses_by_tier = sm.skipped_by_tier, sm.misses_by_tier
            self._samples = PipelineStats(pipeline=self.name, model=self.spec.model, gpu_type=self.spec.gpu_type)
        return stats

    def _warming(self) -> dict[str, Warming]:
        """The streams still in their start-up: the profile's start-up cost less what they have paid,
        and their start-up chunks left at their input rate."""
        startup_s = self.scheduler.profile.startup_s()
        return {sid: Warming(max(0.0, startup_s * self.scheduler.spec_of(sid).dit_scale - s.startup_excess_s),
                             s.startup_left * CHUNK_FRAMES / s.req.input_fps)
                for sid, s in self.streams.items() if s.startup_left > 0}

    # -- the loop --------------------------------------------------------------------------------------------

    async def _beat(self) -> None:
        """Wake the loop every HEARTBEAT_S even without traffic (idle reaping)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                await self._reap_idle()
                self._cut_chunks()
                async with self._engine_lock:
                    plan = self.scheduler.schedule(self.clock())
                    self._report_skips(plan.skipped)
                    if not plan.is_empty:
                        await self._run_plan(plan)
                await self._finish_ending()
                if plan.is_empty:
                    wake = self.scheduler.next_wakeup_s(self.clock())
                    timeout = None if wake is None else max(0.001, wake - self.clock())
                    await _wait_event(self._wake, timeout)
                else:
                    await asyncio.sleep(0)  # let pushes and controls in before the next plan
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine broke: fail every stream, let check_health restart us
            log.exception("pipeline %s failed", self.name)
            self._failure = exc
            for s in list(self.streams.values()):
                s.events.put_nowait(StreamEvent(error=PipelineFailedError(
                    f"pipeline {self.name} failed ({type(exc).__name__}); reconnect")))

    def _cut_chunks(self) -> None:
        """Queued frames -> scheduler chunks: 1 frame first, then 4; at the end a partial last chunk."""
        for s in self.streams.values():
            while s.queue:
                need = FIRST_CHUNK_FRAMES if s.next_chunk == 0 else CHUNK_FRAMES
                if len(s.queue) < need and not s.ending:
                    break
                items = [s.queue.popleft() for _ in range(min(need, len(s.queue)))]
                seq = s.next_chunk
                s.next_chunk += 1
                s.chunks[seq] = [f for f, _ in items]
                s.arrivals[seq] = tuple(itertools.accumulate((a for _, a in items), max))  # clock jitter
                self.scheduler.add_chunk(s.stream_id, Chunk(seq, s.arrivals[seq]))
            if s.ending and not s.queue and not s.input_ended:
                s.input_ended = True
                self.scheduler.end_input(s.stream_id)

    async def _run_plan(self, plan: BatchPlan) -> None:
        """Execute one plan on the executor (module docstring, step 3) and report it to the scheduler."""
        started = self.clock()
        step_ids: list[str] = []
        flush_ids: list[str] = []
        shared_forward_only = True
        for work in plan.work:
            s = self.streams.get(work.stream_id)
            if s is None:
                continue
            if work.admitted is None:
                if s.in_engine:  # a stream batch that must drain, or chunks left in flight by a mode switch
                    flush_ids.append(s.stream_id)
                continue
            frames = s.chunks.pop(work.admitted.seq)
            s.arrivals.pop(work.admitted.seq, None)
            step_by_step = work.mode is BatchMode.STEP_BY_STEP
            if not work.prefill and step_by_step != s.engine_step_by_step:
                self._deliver(s, await self.executor.set_step_mode(s.stream_id, step_by_step))
                s.engine_step_by_step = step_by_step
            for f in frames:
                s.meta[f.seq] = (f.capture_ts_us, f.received_ts_us)
                s.frame_chunk[f.seq] = work.admitted.seq
            s.in_engine[work.admitted.seq] = len(frames)
            await self.executor.add_frames(s.stream_id, [(f.seq, f.frame) for f in frames])
            full = len(frames) == (FIRST_CHUNK_FRAMES if work.prefill else CHUNK_FRAMES)
            (step_ids if full else flush_ids).append(s.stream_id)
            # a stream's first chunks cost extra (eager calls, captures): the start-up curve prices that
            # (_time_startups), the steady curves must not learn it
            shared_forward_only &= full and not work.prefill and not step_by_step and s.startup_left <= 0
        times = None
        if step_ids:
            t_step = self.clock()
            # one step per stream where that costs the same (each stream's frames leave as soon as its
            # chunk is done, not when the last stream's is), else one shared step
            one_by_one = self.executor.forwards_per_stream
            measured = []
            errors: list[BaseException] = []

            def stepped(sid: str, frames: list, tick_times, step_s: float) -> None:
                try:
                    measured.append(tick_times)
                    self._time_startups([sid], step_s)
                    if sid in self.streams:
                        self._deliver(self.streams[sid], frames)
                except BaseException as exc:  # noqa: BLE001 - raised below, in the loop's task
                    errors.append(exc)

            if one_by_one:
                await self.executor.step_each(step_ids, stepped, clock=self.clock)
                if errors:
                    raise errors[0]
            else:
                t_ids = self.clock()
                outputs = await self.executor.step(step_ids)
                measured.append(self.executor.tick_times)
                self._time_startups(step_ids, self.clock() - t_ids)
                for sid, frames in outputs.items():
                    if sid in self.streams:
                        self._deliver(self.streams[sid], frames)
            times = total_tick_times(measured)
            self._samples.executor_step_ms_samples.append((self.clock() - t_step) * 1000)
        for sid in flush_ids:
            if sid in self.streams:
                self._deliver(self.streams[sid], await self.executor.flush(sid))
        finished = self.clock()
        emitted_s = {}
        for work in plan.work:
            s = self.streams.get(work.stream_id)
            for seq in work.emitted:
                if s is not None and seq in s.delivered_s:
                    emitted_s[(work.stream_id, seq)] = s.delivered_s.pop(seq)
        stages = (0.0, 0.0, 0.0)
        if shared_forward_only and step_ids and not flush_ids:
            stages = split_tick(self.scheduler.profile, finished - started, times, chunks_in=plan.num_admitted,
                                rows=plan.num_rows, chunks_out=plan.num_emitted)
        self.scheduler.update_from_output(plan, BatchOutput(
            plan.plan_id, started, finished, *stages, emitted_s=emitted_s))
        if step_ids or flush_ids:
            self._record_tick(plan.num_rows, (finished - started) * 1000)
            self._note_slow_tick(plan, finished - started, times, step_ids, flush_ids)

    def _note_slow_tick(self, plan: BatchPlan, tick_s: float, times, step_ids: list[str],
                        flush_ids: list[str]) -> None:
        """Count and log a stall: a tick slower than SLOW_TICK_FACTOR x its prediction and SLOW_TICK_MIN_S.
        The warning names what the tick held (streams, rows, first chunks, flushes, the measured stage
        times), so that a stall seen by clients as a late first frame can be traced to its tick."""
        if tick_s <= max(SLOW_TICK_MIN_S, SLOW_TICK_FACTOR * plan.predicted_s):
            return
        self._slow_ticks_total += 1
        now = self.clock()
        if self._slow_tick_logged_s is not None and now - self._slow_tick_logged_s < SLOW_TICK_LOG_EVERY_S:
            self._slow_ticks_unlogged += 1
            return
        stages = "not measured"
        if times is not None:
            stages = (f"encode {times.encode_s * 1000:.0f} ms, DiT {times.dit_s * 1000:.0f} ms, "
                      f"decode {times.decode_s * 1000:.0f} ms")
        first = sum(1 for w in plan.work if w.prefill)
        log.warning("%s: a tick took %.0f ms, predicted %.0f (%d stepped streams, %d rows, %d first chunks, "
                    "%d flushes; stages: %s); %d more slow ticks since the last warning", self.name,
                    tick_s * 1000, plan.predicted_s * 1000, len(step_ids), plan.num_rows, first, len(flush_ids),
                    stages, self._slow_ticks_unlogged)
        self._slow_tick_logged_s = now
        self._slow_ticks_unlogged = 0

    def _time_startups(self, stepped: list[str], step_s: float) -> None:
        """Count a step against the start-up of the streams in it still starting: a one-stream step's
        time beyond a steady chunk's (the profile's one-row, one-chunk tick, times n rows) is start-up
        work. When a stream's start-up is over, its total teaches the profile's start-up curve, unless
        one of its chunks shared a step with other streams (then nothing is learned from it).

        Example: steps of 110, 245, 35, 30, 30, 230, 30, 27, 27 ms against 26 ms steady: 0.53 s."""
        profile = self.scheduler.profile
        num_blocks = self.scheduler.config.num_blocks
        for sid in stepped:
            s = self.streams.get(sid)
            if s is None or s.startup_left <= 0:
                continue
            s.startup_left -= 1
            if len(stepped) > 1:
                s.startup_timed = False
            steady = profile.tick_s(rows=s.req.num_steps, admitted=1, emitted=1, num_blocks=num_blocks)
            s.startup_excess_s += max(0.0, step_s - steady)
            if s.startup_left == 0 and s.startup_timed:
                profile.observe(Stage.STARTUP, 1, s.startup_excess_s)

    def _report_skips(self, skipped: tuple[SkippedChunk, ...]) -> None:
        """Drop skipped chunks' frames, count them, and tell each client at once (a stats message)."""
        told: set[str] = set()
        for sk in skipped:
            s = self.streams.get(sk.stream_id)
            if s is None or sk.reason is SkipReason.STREAM_FINISHED:
                continue
            frames = s.chunks.pop(sk.chunk_seq, [])
            s.arrivals.pop(sk.chunk_seq, None)
            self._skip(s, len(frames), sk.reason.value)
            if s.stream_id not in told:
                told.add(s.stream_id)
                s.events.put_nowait(StreamEvent(stats=s.stats))

    async def _finish_ending(self) -> None:
        for s in list(self.streams.values()):
            if not (s.input_ended and not s.chunks) or self.scheduler.has_work(s.stream_id):
                continue
            async with self._engine_lock:
                out = await self.executor.flush(s.stream_id)
            self._deliver(s, out)
            self.streams.pop(s.stream_id, None)
            self.scheduler.finish_stream(s.stream_id)
            # closed in the engine before the client hears "ended": a client that reopens the same id
            # at once, or a pipeline stopped right then, finds no half-closed stream
            await self.executor.close_stream(s.stream_id)
            s.events.put_nowait(StreamEvent(ended=True))

    async def _reap_idle(self) -> None:
        now = self.clock()
        for s in list(self.streams.values()):
            if not s.ending and now - s.last_activity_s > self.service.idle_timeout_s:
                log.info("closing idle stream %s", s.stream_id)
                await self.close(s.stream_id)

    def _to_clock(self, wall_us: int) -> float:
        """A wall-clock timestamp (µs since the epoch) on the scheduler's clock."""
        return self.clock() - max(0, now_us() - wall_us) / 1e6

    def _record_tick(self, rows: int, tick_ms: float) -> None:
        self._tick_ms_ema = tick_ms if self._tick_ms_ema == 0 else (1 - TICK_EMA) * self._tick_ms_ema + TICK_EMA * tick_ms
        prev = self._tick_by_batch.get(rows)
        self._tick_by_batch[rows] = tick_ms if prev is None else (1 - TICK_EMA) * prev + TICK_EMA * tick_ms
        self._samples.tick_ms_samples.append(tick_ms)

    def _skip(self, s: _StreamSlot, n: int, reason: str) -> None:
        if n <= 0:
            return
        s.stats.frames_skipped += n
        self._skipped_total += n
        self._skipped_by_reason[reason] = self._skipped_by_reason.get(reason, 0) + n
        tiers = self._samples.skipped_by_tier
        tiers[s.req.tier] = tiers.get(s.req.tier, 0) + n

    def _deliver(self, s: _StreamSlot, frames: list) -> None:
        if not frames:
            return
        out_us = now_us()
        left_s = self.clock()
        outs: list[OutFrame] = []
        tier = s.req.tier
        for f in frames:
            capture_us, received_us = s.meta.pop(f.seq, (0, out_us))
            chunk = s.frame_chunk.pop(f.seq, None)
            if chunk is not None and chunk in s.in_engine:
                s.in_engine[chunk] -= 1
                if s.in_engine[chunk] <= 0:
                    del s.in_engine[chunk]
                    s.delivered_s[chunk] = left_s
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
            self._skip(s, overflow, "output_overflow")
        s.events.put_nowait(StreamEvent(frames=outs))

    def _slot(self, stream_id: str) -> _StreamSlot:
        s = self.streams.get(stream_id)
        if s is None:
            self.check_health()
            raise StreamNotFoundError(f"stream {stream_id!r} is not open on {self.name}", stream_id=stream_id)
        return s


def _replace_steps(req: OpenRequest, num_steps: int) -> OpenRequest:
    return replace(req, num_steps=num_steps)


async def _wait_event(event: asyncio.Event, timeout_s: float | None) -> None:
    """event.wait() for at most timeout_s (None: no limit); returns either way."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        if not waiter.done():
            waiter.cancel()


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


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=5, request_router_config=request_router_config(),
                  graceful_shutdown_timeout_s=MAX_STREAM_S, graceful_shutdown_wait_loop_s=0.5)
class Pipeline:
    """Serve shim over PipelineCore. A pipeline deployment is a pool of such replicas (one GPU class); each
    stream lives on one replica, and deployments.affinity routes every call for it there.

    `executor_factory` builds the executor from the spec (default: an in-process StreamEngine);
    `metrics` is an optional handle of the exporter deployment, fed a PipelineStats every stats interval.
    Every stats interval the replica also reports its load to the Router deployment (`Router.report`), which
    admits streams per replica. It says it is draining (takes no new stream) once Serve, having pulled its
    routing stats, has not pulled them for DRAIN_AFTER_S: Serve pulls them only from replicas it routes
    to, so a replica it is stopping stops being pulled. (Before the first pull it takes streams: an open
    addressed to it waits at the handle until Serve advertises it, deployments.affinity.OPEN_WAIT_S.)
    """

    async def __init__(self, name: str, spec: PipelineSpec, service: ServiceConfig, metrics=None,
                       executor_factory: Callable[[PipelineSpec], Executor] | None = None) -> None:
        if executor_factory is not None:
            executor = executor_factory(spec)
        elif spec.resolved_executor == "graph":
            executor = await build_graph_executor(spec)
        else:
            executor = build_engine_executor(spec)
        self.executor = executor
        self.core = PipelineCore(name, spec, executor, service=service)
        if executor_factory is None:
            await warm_up_pipeline(self.core)
        # the long-lived heap (models, compiled pieces, graphs) out of the collector's way: a full
        # collection over it is a stall every stream waits through (stages.engine.freeze_heap)
        from stages.engine import freeze_heap

        freeze_heap()
        if hasattr(executor, "freeze_heap"):  # stage actors, each a process of its own
            await executor.freeze_heap()
        self._autoscaling = AutoscalingStatsRecorder(spec.max_streams)
        self._metrics = metrics
        self._reporter: asyncio.Task | None = None
        self._rebalancer: asyncio.Task | None = None
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._routing_pulled_s: float | None = None
        self._first_pull = asyncio.Event()
        self._report_seq = 0  # numbers the router reports (PipelineStats.report_seq)
        self._router_reporter = asyncio.get_running_loop().create_task(self._report_to_router())

    def _ensure_started(self) -> None:
        self.core.start()
        if self._reporter is None and self._metrics is not None:
            self._reporter = asyncio.get_running_loop().create_task(self._report())
        plan = getattr(self.executor, "plan", None)
        if self._rebalancer is None and plan is not None and len(plan.shard_ranges) > 1:
            self._rebalancer = asyncio.get_running_loop().create_task(self._rebalance(plan))

    async def _rebalance(self, plan) -> None:
        """Multi-GPU plans: re-split the DiT blocks when the shards' measured times drift apart
        (scheduling.block_scheduler.BlockRebalancer: threshold, hysteresis, minimum interval)."""
        from scheduling.block_scheduler import BlockRebalancer

        rebalancer = BlockRebalancer(plan.block_plan, time.monotonic())
        while True:
            await asyncio.sleep(REBALANCE_PERIOD_S)
            try:
                await self.executor.maybe_rebalance(rebalancer, time.monotonic())
            except Exception:  # noqa: BLE001 - a failed re-split leaves the old plan serving
                log.warning("block rebalance of %s failed", self.core.name, exc_info=True)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.core.service.stats_interval_s)
            try:
                stats = self.core.load(drain_samples=True)
                stats.replica_id = self.replica_id
                await self._metrics.record_pipeline.remote(stats)
            except Exception:  # noqa: BLE001 - metrics must never take a pipeline down
                log.warning("metrics report from %s failed", self.core.name, exc_info=True)

    async def open(self, stream_id: str, req: OpenRequest, opened_us: int, replica: str = "") -> None:
        """Open a stream here. `replica` names the replica admission chose ('' = any): a call that reached
        another one (its replica stopped, deployments.affinity) is refused, retryable."""
        if replica and replica != self.replica_id:
            raise AdmissionRefusedError(
                f"stream {stream_id!r} was admitted to replica {replica} of {self.core.name}, which no longer "
                f"takes streams; retry", retry_after_s=self.core.service.retry_after_s, pipeline=self.core.name)
        self._ensure_started()
        await self.core.open(stream_id, req, opened_us)

    async def push(self, stream_id: str, frames: list[InFrame]) -> int:
        return await self.core.push(stream_id, frames)

    async def warm_shape(self, height: int, width: int, vae: str, replica: str = "") -> bool:
        """The router's request to warm a shape up for a refused stream (PipelineCore.warm_shape).
        `replica` names the replica admission chose ('' = any); another one does nothing and returns
        False (the router drops the warm-up when no report names it)."""
        if replica and replica != self.replica_id:
            return False
        self._ensure_started()
        return await self.core.warm_shape(height, width, vae)

    async def control(self, stream_id: str, op: str, value: object = None) -> None:
        if op == "prompt":  # a PromptChange (deployments.messages), or a plain prompt
            if isinstance(value, PromptChange):
                await self.core.set_prompt(stream_id, value.mix, value.blend_chunks)
            else:
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
        return self._load()

    def _load(self) -> PipelineStats:
        stats = self.core.load()
        stats.replica_id = self.replica_id
        self._report_seq += 1
        stats.report_seq = self._report_seq
        pulled = self._routing_pulled_s
        stats.draining = pulled is not None and time.monotonic() - pulled > DRAIN_AFTER_S
        return stats

    async def record_routing_stats(self) -> dict:
        """What deployments.affinity routes by: the streams held here and the free stream slots."""
        self._routing_pulled_s = time.monotonic()
        self._first_pull.set()
        return {"streams": sorted(self.core.streams),
                "free_slots": max(0, self.core.spec.max_streams - len(self.core.streams))}

    async def _report_to_router(self) -> None:
        """Push this replica's load to the Router every stats interval (and at once on Serve's first pull)."""
        router = None
        while True:
            try:
                await asyncio.wait_for(self._first_pull.wait(), self.core.service.stats_interval_s)
            except asyncio.TimeoutError:
                pass
            self._first_pull.clear()
            try:
                router = router or serve.get_deployment_handle(ROUTER_DEPLOYMENT, self.core.service.app_name)
                await router.report.remote(self.core.name, self._load())
            except Exception:  # noqa: BLE001 - the router may be starting; the next report retries
                log.debug("load report of %s to the router failed", self.core.name, exc_info=True)

    def check_health(self) -> None:
        self.core.check_health()
        executor_health = getattr(self.executor, "check_health", None)
        if executor_health is not None:
            executor_health()  # a graph that could not be rebuilt fails the replica; Serve replaces it

    def record_autoscaling_stats(self) -> dict[str, float]:
        """SLO-slack signals for deployments.autoscaling.slo_policy (free slots, live streams, misses)."""
        return self._autoscaling.stats(self._load())

    def note_refused(self) -> None:
        """The router refused a stream this pipeline's model could have served (admission wait signal)."""
        self._autoscaling.note_refused()
