"""The multi-GPU pipeline: stage actors wired by ONE Ray compiled graph, driven as an Executor.

    driver (the Pipeline replica)                     stage actors (cluster.stage_actor.StageWorker)
    -----------------------------                     ----------------------------------------------
    CompiledGraphExecutor                             actor 0: encode [+ blocks 0..a)   GPU 0
      per stream: pending frames, seqs in flight,  ->  actor 1: blocks a..b             GPU 1  (NCCL)
      the stream-batch buffer between ticks           ...
      step(ids) -> one StageMessage per tick          actor K-1: blocks ..L [+ decode]  GPU K-1
                <- frames (uint8, CPU) + buffers  <-

The graph is a chain: InputNode -> actor_0.run -> actor_1.run -> ... -> actor_{K-1}.run -> driver.
Edges between GPU actors use `with_tensor_transport("nccl")` (CUDA tensors inside the message go
over NCCL, the rest over shared memory); on the CPU every edge is shared memory. One graph per
pipeline: an actor can be in only one live compiled graph.

What each tick computes is exactly the single-process engine's (stages.engine.StreamEngine), split
by role (see cluster.stage_actor): same seeds -> bit-identical frames in fp32.

The cycle. A stream-batch tick ends on the last shard with the re-noised buffer, which the stream's
NEXT tick needs on the first actor. A DAG has no cycles, so the tail returns the buffer (CPU,
[n, 16, 1, h, w], 200 KiB per slot at 480x832 bf16) to the driver, which sends it back with the
stream's next tick. With one chain (StreamParams.chains = 1) one stream's consecutive ticks are
therefore dependent (at most one in flight); ticks of DIFFERENT streams are independent and are
pipelined through the chain.

Ring (one stream over W GPUs; stages.stream_batch, "Ring"). With chains = W a stream's tick k reads
the buffer of tick k - W only, so up to W ticks of ONE stream are in the graph at once: the driver
keeps one buffer per chain and submits tick k as soon as tick k - W is back. Everything else a tick
touches is updated in tick order without any wait, because the driver submits a stream's ticks in
order (under the stream's lock, each one once it is written to the graph's input) and every actor
runs the graph's executions in submission order over FIFO channels: the head's motion controller and
noise draws, the shards' KV caches (slot i of tick k holds the chunk of tick k - i*W), the tail's
re-noise draws and the decoder's conv caches. So the frames are the single-process engine's with the
same chains, bit for bit; at n = 1 no tick reads another's buffer at all (the chain limit is then
the only wait). A chunk leaves (n-1)*W ticks after it entered; in time, n ticks of W stages each, the
reference's n*W micro-steps. Each tick returns its frames after the stream's earlier ticks, so
frames come back in input order. Worked example, 2 GPUs (W = 2), one stream, n = 2, ticks t0, t1, ...:

    time          0-1     1-2     2-3     3-4     4-5
    GPU 0 (head)  t0      t1      t2      t3      t4        t2 needs t0's buffer: back at time 2
    GPU 1 (tail)  -       t0      t1      t2      t3        t2 emits t0's chunk, t3 t1's, ...

With one chain the same stream would run t0 on GPU 0, t0 on GPU 1, t1 on GPU 0, ...: half the rate.
The default comes from the executor's `ring` option (on for GPU plans of several shards, W = the
number of DiT shard actors); a stream's StreamParams.chains overrides it. The ring only pays when
the caller keeps W `step` calls of the stream in flight (the pipeline bench's single-stream rows do).

Schedule. `step(ids)` is a coroutine: concurrent `step` calls on disjoint stream groups each submit
one execution; up to `max_inflight` executions are in the graph at once (a semaphore, below Ray's
in-flight cap), so every GPU works on a different group's tick. Worked example, 2 GPUs
(plan "enc+0-15|15-30+dec"), streams in 2 groups G1 = {a, b}, G2 = {c, d}, each stage ~1 unit:

    time          0-1          1-2          2-3          3-4
    GPU 0   G1 tick 1    G2 tick 1    G1 tick 2    G2 tick 2      encode + blocks 0..14
    GPU 1        -       G1 tick 1    G2 tick 1    G1 tick 2      blocks 15..29 + re-noise + decode

G1's tick 2 can start at time 2 because G1's tick 1 left GPU 1 at time 2 (its buffer came back to
the driver); with one group only, GPU 0 would idle every other unit. A prefill (the first chunk of
a stream: n steps back to back, batch 1) is n dependent executions of its own, overlapped the same
way with other streams' ticks. In-order delivery per stream follows from the per-stream dependency
(one chain) or from each tick waiting for the stream's earlier ticks before it returns (ring).

Control operations (open / close / prompt / steps / block moves) are normal actor calls on the
actors' main threads, outside the graph; each worker serialises them against graph tasks with a
lock, and the driver never sends one for a stream that has a tick in flight: a control takes the
stream's lock and first waits for every tick of the stream in flight (a steps change then drains
the stream batch, its drain ticks back to back, W in flight). A blended prompt change
is one control call too: every shard worker gets the target embedding once and steps the blend
itself on each item marked `new_chunk` (no per-chunk control traffic).

Failure. If an actor dies (or a tick exceeds `tick_timeout_s`), the graph is torn down (teardown
with a bounded timeout, then kill), dead actors are replaced by new ones with the same placement
(they rebuild their weights), and the graph is recompiled. The live streams' state on the dead actor
is lost: with failure_policy 'fail' (default) every live stream gets a PipelineFailedError on its
next call and must reconnect; with 'restart' every live stream is re-opened on the rebuilt chain
and restarts at its next chunk with a prefill (frames that were in flight are lost, the output
resumes with a new first frame). New streams work as soon as the graph is rebuilt; if rebuilding
fails, `check_health()` raises.

Block rebalancing (`apply_moves`): the graph is drained and torn down, each moved block's weights
and every live stream's KV caches go from the old shard to the new one (object store), the shards
adopt their new ranges and the graph is recompiled; live streams continue bit-identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from cluster.plan import PipelinePlan
from cluster.stage_actor import (
    StageMessage,
    StageWorker,
    StreamOpen,
    WorkerOptions,
    WorkItem,
    stage_actor_class,
)
from scheduling.block_scheduler import BlockMove, BlockPlan, BlockRebalancer, StageTiming
from stages.engine import CHUNK_FRAMES, OutputFrame, StreamParams, exit_lag
from stages.errors import (
    BadFrameError,
    BadRequestError,
    PipelineFailedError,
    StreamExistsError,
    StreamNotFoundError,
    WeirError,
)
from stages.prompts import PromptMix, check_blend_chunks
from stages.vae_stage import stack_frames

log = logging.getLogger("weir.graph")

FAILURE_POLICIES = ("fail", "restart")
DEFAULT_ENV = {"NCCL_NVLS_ENABLE": "0"}
"""Environment every stage actor gets (NVLink multicast must stay off on the shared H200 hosts)."""


class ChainBrokenError(Exception):
    """The transport lost the chain (an actor died, a tick timed out); the chain needs a rebuild."""


# ---- transports: how a message runs through the chain -----------------------------------------------


class LocalChain:
    """The workers chained in this process, one thread (the `--no-ray` bench mode and unit tests).

    No pipelining: each message runs through every worker before the next starts.
    """

    def __init__(self, plan: PipelinePlan, workers: Sequence[StageWorker]) -> None:
        self.plan = plan
        self.workers = list(workers)
        self.generation = 0
        self.broken: BaseException | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weir-chain")

    @classmethod
    def build(cls, plan: PipelinePlan, options: WorkerOptions | None = None) -> LocalChain:
        """Build every worker of `plan` in this process (GPU placements on cuda:<gpu>)."""
        options = options or WorkerOptions()
        workers = [
            StageWorker(
                plan, s.actor, device=None if s.gpu is None else f"cuda:{s.gpu}",
                num_threads=options.num_threads, sync_timing=options.sync_timing,
                deterministic=options.deterministic, cuda_graphs=options.cuda_graphs,
                spare_streams=options.spare_streams,
            )
            for s in plan.stages
        ]
        return cls(plan, workers)

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def run(self, msg: StageMessage, submitted: asyncio.Event | None = None) -> StageMessage:
        """Run the message through every worker, in order, on the chain's thread (messages queue up
        in submission order). `submitted` is set once the message is queued."""
        def chain() -> StageMessage:
            out = msg
            for worker in self.workers:
                out = worker.run(out)
            return out

        fut = asyncio.get_running_loop().run_in_executor(self._thread, chain)
        if submitted is not None:
            submitted.set()
        return await fut

    async def call(self, actor: int, method: str, *args):
        """Call `method` on one worker (on the chain's thread, ordered with `run`)."""
        return await self._in_thread(lambda: getattr(self.workers[actor], method)(*args))

    async def transfer_blocks(self, src: int, dst: int, blocks: list[int]) -> None:
        """Move blocks (weights + live caches) from worker src to worker dst."""
        payload = await self.call(src, "export_blocks", blocks)
        await self.call(dst, "import_blocks", payload)
        await self.call(src, "drop_blocks", blocks)

    async def recover(self, generation: int, cause: BaseException) -> list[int]:
        """An in-process chain has nothing to rebuild: always raises PipelineFailedError."""
        raise PipelineFailedError(f"an in-process chain cannot recover from {type(cause).__name__}: {cause}")

    async def pause(self) -> None:
        """Nothing to tear down in process."""

    async def resume(self, plan: PipelinePlan) -> None:
        """Adopt the plan after a reconfiguration."""
        self.plan = plan

    async def close(self) -> None:
        """Stop the chain's thread."""
        self._thread.shutdown(wait=True)


class CompiledGraphChain:
    """The stage actors and their compiled graph (asyncio mode: build and run it on one event loop).

    Args:
        plan: the pipeline plan (one actor per stage).
        placement_group: reserve and pin the actors: actor i -> bundle `bundle_offset + gpu index`
            (GPU plans) or `bundle_offset + i` (CPU plans). None: Ray places them.
        options: worker options and the actors' environment (DEFAULT_ENV is always added).
        actor_num_cpus: CPUs each actor reserves (default: 1 on GPU, 0 on CPU; a live graph actor
            busy-polls a core).
        max_inflight: executions in the graph at once (default 2 per actor, at most 8).
        transport: 'nccl' (alias of 'accelerator') or 'auto' between GPU actors.
        static_shape: `_static_shape=True` on GPU edges. Only when every execution has the same
            tensor shapes (fixed stream set, no prefill after warm-up): a benchmark option.
        tick_timeout_s: an execution slower than this counts as a hung chain (full rebuild).
        liveness_poll_s: while an execution is late by this much, probe the actors for deaths.
        teardown_timeout_s: bound of a graph teardown before its actors are killed.
        actor_start_timeout_s: bound of actor construction (model build / load).
    """

    def __init__(
        self,
        plan: PipelinePlan,
        *,
        placement_group=None,
        bundle_offset: int = 0,
        options: WorkerOptions | None = None,
        actor_num_cpus: float | None = None,
        max_inflight: int | None = None,
        transport: str = "nccl",
        static_shape: bool = False,
        tick_timeout_s: float = 120.0,
        liveness_poll_s: float = 2.0,
        teardown_timeout_s: float = 20.0,
        actor_start_timeout_s: float = 600.0,
        control_timeout_s: float = 300.0,
    ) -> None:
        if transport not in ("nccl", "auto", "accelerator"):
            raise ValueError(f"transport={transport!r}: choose 'nccl' or 'auto'")
        self.plan = plan
        self.placement_group = placement_group
        self.bundle_offset = bundle_offset
        self.options = options or WorkerOptions()
        self.actor_num_cpus = actor_num_cpus if actor_num_cpus is not None else (1.0 if plan.on_gpu else 0.0)
        self.max_inflight = max_inflight or min(8, 2 * plan.num_actors)
        if not 1 <= self.max_inflight <= 64:
            raise ValueError(f"max_inflight={self.max_inflight} must be in 1..64")
        self.transport = transport
        self.static_shape = static_shape
        self.tick_timeout_s = tick_timeout_s
        self.liveness_poll_s = liveness_poll_s
        self.teardown_timeout_s = teardown_timeout_s
        self.actor_start_timeout_s = actor_start_timeout_s
        self.control_timeout_s = control_timeout_s
        self.actors: list = []
        self.generation = 0
        self.broken: BaseException | None = None
        self._graph = None
        self._sem: asyncio.Semaphore | None = None
        self._open = asyncio.Event()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._recover_lock = asyncio.Lock()

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the actors, wait until every one has built its models, compile the graph."""
        self._sem = asyncio.Semaphore(self.max_inflight)
        self._idle.set()
        self.actors = [self._new_actor(i) for i in range(self.plan.num_actors)]
        try:
            await self._wait_ready(range(self.plan.num_actors))
            self._compile()
        except BaseException:
            self._kill(range(len(self.actors)))
            raise
        self._open.set()

    def _new_actor(self, i: int):
        placement = self.plan.stages[i]
        env = {**DEFAULT_ENV, **self.options.env_vars}
        pythonpath = os.environ.get("PYTHONPATH")
        if pythonpath and "PYTHONPATH" not in env:
            env["PYTHONPATH"] = pythonpath
        opts: dict = dict(
            num_gpus=1 if placement.gpu is not None else 0,
            num_cpus=self.actor_num_cpus,
            max_restarts=0,
            runtime_env={"env_vars": env},
            name=None,
        )
        if self.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundle = self.bundle_offset + (placement.gpu if placement.gpu is not None else i)
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=bundle
            )
        cls = stage_actor_class()
        return cls.options(**opts).remote(
            self.plan, i, num_threads=self.options.num_threads, sync_timing=self.options.sync_timing,
            deterministic=self.options.deterministic, cuda_graphs=self.options.cuda_graphs,
            spare_streams=self.options.spare_streams,
        )

    async def _wait_ready(self, indices) -> None:
        indices = list(indices)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self.actors[i].ping.remote() for i in indices)), self.actor_start_timeout_s
            )
        except asyncio.TimeoutError:
            raise PipelineFailedError(
                f"stage actors {indices} did not start within {self.actor_start_timeout_s:.0f} s: check that "
                f"the cluster (or placement group) has {self.plan.num_gpus} GPU(s) and "
                f"{self.actor_num_cpus} CPU per actor free, and the actors' logs for model build errors"
            ) from None
        except Exception as exc:  # noqa: BLE001 - constructor errors surface here
            raise PipelineFailedError(f"a stage actor failed to start: {type(exc).__name__}: {exc}") from exc

    def _compile(self) -> None:
        from ray.dag import DAGContext, InputNode

        ctx = DAGContext.get_current()
        ctx.teardown_timeout = int(max(1, self.teardown_timeout_s))
        ctx.submit_timeout = int(max(10, self.tick_timeout_s))
        ctx.get_timeout = int(max(10, self.tick_timeout_s))
        last = len(self.actors) - 1
        with InputNode() as inp:
            node = inp
            for i, actor in enumerate(self.actors):
                node = actor.run.bind(node)
                if i < last and self.plan.on_gpu:
                    node = node.with_tensor_transport(self.transport, _static_shape=self.static_shape)
        self._graph = node.experimental_compile(
            enable_asyncio=True, _max_inflight_executions=self.max_inflight
        )

    def _teardown(self) -> None:
        graph, self._graph = self._graph, None
        if graph is None:
            return
        t0 = time.monotonic()
        try:
            graph.teardown()
        except Exception:  # noqa: BLE001 - a broken graph may fail its own teardown
            log.warning("compiled graph teardown failed; killing the stage actors", exc_info=True)
            self._kill(range(len(self.actors)))
            return
        if time.monotonic() - t0 > self.teardown_timeout_s:
            log.warning("compiled graph teardown took %.1f s; killing the stage actors", time.monotonic() - t0)
            self._kill(range(len(self.actors)))

    def _kill(self, indices) -> None:
        import ray

        for i in indices:
            with contextlib.suppress(Exception):
                ray.kill(self.actors[i], no_restart=True)

    async def close(self) -> None:
        """Tear the graph down and kill every actor (idempotent)."""
        self._open.clear()
        self._teardown()
        self._kill(range(len(self.actors)))
        self.actors = []

    # ---- the hot path ------------------------------------------------------------------------------

    async def run(self, msg: StageMessage, submitted: asyncio.Event | None = None) -> StageMessage:
        """Run one message through the graph. Raises ChainBrokenError if the chain broke meanwhile.
        `submitted` is set once the message is written to the graph's input: messages submitted one
        after the other run in that order on every actor (each actor executes the graph's tasks in
        execution order, and the channels are FIFO)."""
        await self._open.wait()
        if self.broken is not None:
            raise PipelineFailedError(f"the pipeline could not be rebuilt: {self.broken}")
        assert self._sem is not None
        async with self._sem:
            await self._open.wait()
            generation = self.generation
            self._inflight += 1
            self._idle.clear()
            try:
                try:
                    fut = await asyncio.wait_for(self._graph.execute_async(msg), self.tick_timeout_s)
                    if submitted is not None:
                        submitted.set()
                    return await self._result(fut, generation)
                except asyncio.TimeoutError as exc:
                    raise ChainBrokenError(
                        f"a tick took longer than {self.tick_timeout_s:.0f} s (generation {generation})"
                    ) from exc
                except (asyncio.CancelledError, KeyboardInterrupt, ChainBrokenError):
                    raise
                except Exception as exc:  # noqa: BLE001 - RayChannelError, ActorDiedError, "DAG execution cancelled"
                    raise ChainBrokenError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()

    async def _result(self, fut, generation: int) -> StageMessage:
        """Await an execution's result. A killed actor does not always fail the pending result, so
        while it is late the actors are probed every `liveness_poll_s`: a dead one breaks the chain."""
        task = asyncio.ensure_future(_await(fut))
        deadline = time.monotonic() + self.tick_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.liveness_poll_s)
                if done:
                    return task.result()
                dead = await self._dead_actors()
                if dead:
                    raise ChainBrokenError(f"stage actor(s) {dead} died (generation {generation})")
                if time.monotonic() > deadline:
                    raise asyncio.TimeoutError
        finally:
            if not task.done():
                task.cancel()

    async def _dead_actors(self) -> list[int]:
        """Actors whose liveness probe fails with an actor error (a slow answer is not death)."""
        from ray.exceptions import RayActorError

        results = await asyncio.gather(
            *(asyncio.wait_for(a.ping.remote(), 5.0) for a in self.actors), return_exceptions=True
        )
        return [i for i, r in enumerate(results) if isinstance(r, RayActorError)]

    async def call(self, actor: int, method: str, *args):
        """A control call on one actor (its main thread), bounded by control_timeout_s."""
        ref = getattr(self.actors[actor], method).remote(*args)
        try:
            return await asyncio.wait_for(ref, self.control_timeout_s)
        except asyncio.TimeoutError:
            raise PipelineFailedError(f"actor {actor} did not answer {method} within {self.control_timeout_s} s") from None
        except WeirError:
            raise
        except Exception as exc:  # noqa: BLE001
            cause = getattr(exc, "cause", None)
            if isinstance(cause, WeirError | ValueError):
                raise cause from exc
            raise

    async def transfer_blocks(self, src: int, dst: int, blocks: list[int]) -> None:
        """Move blocks src -> dst through the object store (the payload never visits the driver)."""
        payload = self.actors[src].export_blocks.remote(blocks)
        await asyncio.wait_for(self.actors[dst].import_blocks.remote(payload), self.control_timeout_s)
        await asyncio.wait_for(self.actors[src].drop_blocks.remote(blocks), self.control_timeout_s)

    # ---- failure and reconfiguration -----------------------------------------------------------------

    async def recover(self, generation: int, cause: BaseException) -> list[int]:
        """Rebuild after a failure seen in `generation` (once, however many ticks saw it): tear down,
        replace dead actors (all of them after a timeout: a hung GPU cannot be trusted), recompile.
        Returns the replaced actor indices. Sets `broken` and raises PipelineFailedError on failure.
        """
        async with self._recover_lock:
            if generation != self.generation:
                return []  # another tick already rebuilt this generation
            self._open.clear()
            try:
                self._teardown()
                if isinstance(cause.__cause__, asyncio.TimeoutError):
                    dead = list(range(len(self.actors)))  # a hung chain: trust none of its actors
                else:
                    alive = await asyncio.gather(*(self._alive(i) for i in range(len(self.actors))))
                    dead = [i for i, ok in enumerate(alive) if not ok]
                log.warning("rebuilding the compiled graph (%s); replacing actors %s", cause, dead)
                self._kill(dead)
                for i in dead:
                    self.actors[i] = self._new_actor(i)
                await self._wait_ready(dead)
                self._compile()
            except BaseException as exc:
                self.broken = exc
                self._open.set()  # waiters see `broken`
                raise PipelineFailedError(f"rebuilding the pipeline failed: {type(exc).__name__}: {exc}") from exc
            self.generation += 1
            self._open.set()
            return dead

    async def _alive(self, i: int) -> bool:
        try:
            await asyncio.wait_for(self.actors[i].ping.remote(), 10.0)
            return True
        except Exception:  # noqa: BLE001
            return False

    async def pause(self) -> None:
        """Stop new executions, wait for the in-flight ones, tear the graph down (actors stay)."""
        self._open.clear()
        await self._idle.wait()
        self._teardown()

    async def resume(self, plan: PipelinePlan) -> None:
        """Recompile the graph over the same actors (after a reconfiguration) and reopen it."""
        self.plan = plan
        try:
            self._compile()
        except BaseException as exc:
            self.broken = exc
            self._open.set()
            raise
        self._open.set()


# ---- the executor ----------------------------------------------------------------------------------


@dataclass
class _Stream:
    """Driver-side state of one stream (the model state lives in the actors)."""

    stream_id: str
    params: StreamParams
    req: StreamOpen
    prompt: PromptMix
    """The prompt the stream is conditioned on (or blending to)."""
    num_steps: int
    chains: int = 1
    """W interleaved stream-batch chains (stages.stream_batch, "Ring")."""
    pending: deque = field(default_factory=deque)
    """(seq, uint8 HxWx3) not yet sent."""
    in_flight: deque = field(default_factory=deque)
    """Seq lists of the chunks inside the stream batch, one per submitted tick, oldest first ([] for a
    drain tick)."""
    started: bool = False
    ticks: int = 0
    """Ticks submitted since the last reset (prefill, steps change): tick k runs on chain k mod W."""
    buffers: list = field(default_factory=list)
    """Per chain, its stream-batch buffer after its last tick (CPU); None = the head's own (zeros
    after a reset)."""
    chain_free: list = field(default_factory=list)
    """Per chain, an asyncio.Event set while no tick of the chain is in flight (its buffer is back)."""
    last_tick: asyncio.Future | None = None
    """The newest tick's job; each tick returns its frames only after the stream's earlier ticks."""
    ticks_in_flight: int = 0
    failed: PipelineFailedError | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while taking chunks and submitting ticks, and by the controls (which wait for the ticks in
    flight): a stream's ticks enter the chain in order, and no control overtakes one."""
    frames_in: int = 0
    frames_out: int = 0

    def __post_init__(self) -> None:
        self.chain_free = [asyncio.Event() for _ in range(self.chains)]
        for free in self.chain_free:
            free.set()
        self.reset_ring()

    def reset_ring(self) -> None:
        """Every chain restarts from the head's zeros; the next tick is chain 0's (nothing in flight)."""
        self.ticks = 0
        self.buffers = [None] * self.chains


class ChainExecutor:
    """The Executor protocol (deployments.pipeline.Executor) over a chain of stage workers.

    Same API and the same frames as an InProcessExecutor(StreamEngine) for the same call sequence
    (and the same StreamParams.chains). Every coroutine must run on the event loop the chain was built on.

    Args:
        ring: the default of streams that leave StreamParams.chains unset: True = W chains, W = the
            number of DiT shard actors; False = one chain. None: on for GPU plans of several shards.
            A stream's own chains setting always wins.
    """

    def __init__(self, plan: PipelinePlan, chain, *, failure_policy: str = "fail", ring: bool | None = None) -> None:
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy={failure_policy!r}: choose one of {FAILURE_POLICIES}")
        self.plan = plan
        self.chain = chain
        self.failure_policy = failure_policy
        num_shards = len(plan.shard_actors)
        self.ring = (plan.on_gpu and num_shards > 1) if ring is None else ring
        self.default_chains = num_shards if self.ring else 1
        """Chains of a stream whose StreamParams.chains is None."""
        self._peak_ticks_in_flight = 0
        self._streams: dict[str, _Stream] = {}
        self._tick_id = 0
        self._failure_lock = asyncio.Lock()
        self._handled_generation = 0
        self._memory_bytes = 0
        self._stats_task: asyncio.Task | None = None
        self._stats_at = 0.0
        self.rebuilds = 0
        self.tick_times = None
        """Stage times of one step (deployments.pipeline.Executor): not measured across actors."""
        self.forwards_per_stream = False
        """Concurrent steps on disjoint streams are pipelined over the actors: one shared step it is."""
        self.tick_latencies_s: deque = deque(maxlen=100_000)

    # ---- stream lifecycle ----------------------------------------------------------------------------

    async def open_stream(self, stream_id: str, params: StreamParams) -> None:
        """Open the stream on every actor and set its prompt. BadRequestError, StreamExistsError."""
        self.check_health()
        params.validate()
        if stream_id in self._streams:
            raise StreamExistsError(f"stream {stream_id!r} is already open", stream_id=stream_id)
        chains = params.chains or self.default_chains
        req = StreamOpen(
            stream_id=stream_id, height=params.height, width=params.width, num_steps=params.num_steps,
            noise_scale=params.noise_scale, seed=params.seed, vae=params.vae or self.plan.vae,
            first_chunk_frames=params.first_chunk_frames, motion_aware_noise=params.motion_aware_noise,
            chains=chains,
        )
        s = _Stream(stream_id, params, req, PromptMix.of(params.prompt), params.num_steps, chains=chains)
        self._streams[stream_id] = s
        try:
            async with s.lock:
                await self._open_on_actors(s)
        except BaseException:
            self._streams.pop(stream_id, None)
            raise

    async def _open_on_actors(self, s: _Stream) -> None:
        actors = range(self.plan.num_actors)
        results = await asyncio.gather(
            *(self.chain.call(i, "open_stream", s.req) for i in actors), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            try:
                await self._set_prompt_on_actors(s.stream_id, s.prompt)
            except BaseException as exc:
                errors.append(exc)
        if errors:
            await asyncio.gather(
                *(self.chain.call(i, "close_stream", s.stream_id) for i in actors), return_exceptions=True
            )
            raise errors[0]

    async def _set_prompt_on_actors(self, stream_id: str, prompt: PromptMix, blend_chunks: int = 0) -> None:
        embeds = await self.chain.call(0, "encode_prompts", prompt)
        shard_actors = self.plan.shard_actors
        await asyncio.gather(*(self.chain.call(i, "set_text", stream_id, embeds, blend_chunks, prompt.mode)
                               for i in shard_actors))

    async def freeze_heap(self) -> None:
        """Every stage actor's `freeze_heap` (stages.engine.freeze_heap), after a warm-up."""
        await asyncio.gather(*(self.chain.call(i, "freeze_heap") for i in range(self.plan.num_actors)))

    async def close_stream(self, stream_id: str) -> None:
        """Free the stream everywhere. Unknown ids are a no-op (a client may vanish twice)."""
        s = self._streams.pop(stream_id, None)
        if s is None:
            return
        async with s.lock:
            await self._quiesce(s)
            await asyncio.gather(
                *(self.chain.call(i, "close_stream", stream_id) for i in range(self.plan.num_actors)),
                return_exceptions=True,
            )

    # ---- frames ------------------------------------------------------------------------------------

    async def add_frames(self, stream_id: str, frames: list[tuple[int, np.ndarray]]) -> None:
        """Buffer frames (StreamEngine.add_frame for each). BadFrameError leaves the stream unchanged."""
        s = self._get(stream_id)
        h, w = s.params.height, s.params.width
        for seq, frame in frames:
            if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (h, w, 3):
                got = (getattr(frame, "shape", None), str(getattr(frame, "dtype", type(frame).__name__)))
                raise BadFrameError(
                    f"frame {seq} of stream {stream_id!r} must be uint8 [{h}, {w}, 3], got shape {got[0]} {got[1]}",
                    stream_id=stream_id, seq=seq, expected=(h, w, 3), got=got[0],
                )
        for seq, frame in frames:
            s.pending.append((int(seq), frame))
            s.frames_in += 1

    async def ready_streams(self) -> list[str]:
        """Streams with a chunk ready whose next tick can enter the chain now (its chain's previous
        tick is back: with one chain, no tick of the stream in flight)."""
        return [sid for sid, s in self._streams.items()
                if self._chunk_ready(s) and not s.lock.locked() and s.chain_free[s.ticks % s.chains].is_set()]

    async def step(self, stream_ids: list[str]) -> dict[str, list[OutputFrame]]:
        """One tick for the listed streams (one shared DiT forward; first chunks are prefilled on their
        own). Concurrent calls on disjoint streams are pipelined. Concurrent calls on one stream enter
        the chain in call order, each as soon as its chain is free (with W chains, W at once: module
        docstring, "Ring"), and return in that order."""
        self._maybe_refresh_stats()
        if len(set(stream_ids)) != len(stream_ids):
            raise BadRequestError(f"a stream may appear once per step, got {stream_ids}")
        streams = [self._get(sid) for sid in stream_ids]
        async with contextlib.AsyncExitStack() as stack:
            for s in sorted(streams, key=lambda s: s.stream_id):
                await stack.enter_async_context(s.lock)
            jobs = await self._submit(streams)
        return await self._collect(streams, jobs)

    async def _submit(self, streams: list[_Stream]) -> list[asyncio.Future]:
        """Under the streams' locks: take each ready stream's next chunk, run the first chunks' prefills
        to their end, and submit one shared tick for the others. Returns the jobs ({sid: frames} each)."""
        for s in streams:  # first wait for the chains (a tick in flight may fail meanwhile), then check
            if s.started and self._chunk_ready(s):
                await s.chain_free[s.ticks % s.chains].wait()
        for s in streams:
            self._check_stream(s)
        prefills, ticks = [], []
        for s in streams:
            if not self._chunk_ready(s):
                continue
            if not s.started:
                prefills.append((s, *self._take(s, s.params.first_chunk_frames)))
            else:
                ticks.append((s, *self._take(s, CHUNK_FRAMES)))
        jobs = [asyncio.ensure_future(self._prefill(s, seqs, frames)) for s, seqs, frames in prefills]
        if ticks:  # no wait: every chain is free and no stream failed since the check
            jobs.append(await self._submit_tick(ticks))
        if prefills:  # the prefilled streams' next ticks may not start before their prefill ends
            await asyncio.wait(jobs[: len(prefills)])
        return jobs

    @staticmethod
    async def _collect(streams: list[_Stream], jobs: list[asyncio.Future]) -> dict[str, list[OutputFrame]]:
        """Await every job (all of them, even after a failure); the first error is raised."""
        out: dict[str, list[OutputFrame]] = {s.stream_id: [] for s in streams}
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for result in results:
            if isinstance(result, dict):
                for sid, frames in result.items():
                    out.setdefault(sid, []).extend(frames)
        if errors:
            raise errors[0]
        return out

    async def flush(self, stream_id: str) -> list[OutputFrame]:
        """StreamEngine.flush: pad a partial chunk with its last frame, step, drain; padding not returned.
        The ticks are submitted back to back (W in flight with W chains) and collected at the end."""
        s = self._get(stream_id)
        async with s.lock:
            self._check_stream(s)
            await self._quiesce(s)
            jobs: list[asyncio.Future] = []
            try:
                if s.pending and not s.started:
                    while len(s.pending) < s.params.first_chunk_frames:
                        s.pending.append((-1, s.pending[-1][1]))
                    jobs += await self._submit([s])
                if s.pending:
                    while len(s.pending) % CHUNK_FRAMES:
                        s.pending.append((-1, s.pending[-1][1]))
                    while s.pending:
                        jobs += await self._submit([s])
                jobs += await self._submit_drain(s)
            finally:
                out = await self._collect([s], jobs)
            return [f for f in out[stream_id] if f.seq >= 0]

    # ---- live controls -------------------------------------------------------------------------------

    async def set_prompt(self, stream_id: str, prompt: str | PromptMix, *, blend_chunks: int = 0) -> None:
        """StreamEngine.set_prompt: at once, or blended over the stream's next `blend_chunks` chunks."""
        mix = PromptMix.of(prompt)
        check_blend_chunks(blend_chunks)
        s = self._get(stream_id)
        async with s.lock:
            self._check_stream(s)
            await self._quiesce(s)
            await self._set_prompt_on_actors(stream_id, mix, blend_chunks)
            s.prompt = mix

    async def set_steps(self, stream_id: str, num_steps: int) -> list[OutputFrame]:
        """Change the number of denoising steps; frames in flight are finished first (returned)."""
        if not 1 <= num_steps <= 4:
            raise BadRequestError(f"num_steps={num_steps} must be 1..4", field="num_steps")
        s = self._get(stream_id)
        async with s.lock:
            self._check_stream(s)
            await self._quiesce(s)
            out = []
            if s.started:
                out = (await self._collect([s], await self._submit_drain(s)))[stream_id]
            await asyncio.gather(
                *(self.chain.call(i, "set_num_steps", stream_id, num_steps) for i in range(self.plan.num_actors))
            )
            s.num_steps = num_steps
            s.req = dataclasses.replace(s.req, num_steps=num_steps)
            s.in_flight.clear()
            s.reset_ring()
            return out

    # ---- health, stats, teardown ---------------------------------------------------------------------

    def check_health(self) -> None:
        """Raise PipelineFailedError when the chain is broken beyond repair (Serve then replaces us)."""
        if self.chain.broken is not None:
            raise PipelineFailedError(
                f"pipeline {self.plan.spec} is broken: {type(self.chain.broken).__name__}: {self.chain.broken}"
            )

    def memory_bytes(self) -> int:
        """Device memory allocated by the stage actors (summed; refreshed every few seconds)."""
        return self._memory_bytes

    def peak_ticks_in_flight(self, reset: bool = False) -> int:
        """The most ticks of ONE stream that were in the chain at once (counted once a tick is
        submitted, until its result is back): 1 without the ring, up to W with W chains."""
        peak = self._peak_ticks_in_flight
        if reset:
            self._peak_ticks_in_flight = 0
        return peak

    async def stats(self, reset: bool = False, reset_peak: bool = False) -> list[dict]:
        """Every worker's stats (cluster.stage_actor.StageWorker.stats)."""
        results = await asyncio.gather(
            *(self.chain.call(i, "stats", reset, reset_peak) for i in range(self.plan.num_actors)),
            return_exceptions=True,
        )
        out = [r for r in results if isinstance(r, dict)]
        self._memory_bytes = sum(r["memory_bytes"] for r in out)
        return out

    def _maybe_refresh_stats(self) -> None:
        now = time.monotonic()
        if now - self._stats_at < 5.0 or (self._stats_task is not None and not self._stats_task.done()):
            return
        self._stats_at = now
        self._stats_task = asyncio.get_running_loop().create_task(self.stats())

    async def stage_timings(self) -> list[StageTiming]:
        """One StageTiming per DiT shard (medians of the recent runs): feed BlockRebalancer.observe."""
        stats = {r["actor"]: r for r in await self.stats()}
        out = []
        for stage, actor in enumerate(self.plan.shard_actors):
            t = stats.get(actor, {}).get("timings_s", {})
            dit = float(np.median(t["dit"])) if t.get("dit") else 0.0
            extra = sum(float(np.median(t[r])) for r in ("encode", "tail", "decode") if t.get(r))
            out.append(StageTiming(stage=stage, dit_s=dit, extra_s=extra))
        return out

    async def close(self) -> None:
        """Close every stream and release the chain (tear the graph down, kill the actors)."""
        if self._stats_task is not None:
            self._stats_task.cancel()
        self._streams.clear()
        await self.chain.close()

    # ---- block rebalancing ---------------------------------------------------------------------------

    async def maybe_rebalance(self, rebalancer: BlockRebalancer, now: float) -> PipelinePlan | None:
        """Feed the shards' measured times to `rebalancer`; when it proposes a re-split (drift past its
        threshold, no sooner than its minimum interval), execute the moves. Returns the new plan or None.
        The pipeline deployment calls this periodically on multi-GPU plans."""
        for timing in await self.stage_timings():
            if timing.dit_s > 0.0:
                rebalancer.observe(timing)
        proposal = rebalancer.propose(now)
        if proposal is None or not proposal.moves:
            return None
        log.info("rebalancing %s -> %s (%d block moves)", self.plan.spec, proposal.plan.ranges, len(proposal.moves))
        return await self.apply_moves(proposal.moves)

    async def apply_moves(self, moves: Sequence[BlockMove]) -> PipelinePlan:
        """Execute a BlockRebalancer's moves (stage index = shard index): drain and tear down the graph,
        move each block's weights and live KV caches, adopt the new ranges, recompile. Returns the new plan.
        """
        if not moves:
            return self.plan
        old = self.plan.block_plan
        owner = [old.owner(b) for b in range(old.num_blocks)]
        for m in moves:
            if owner[m.block] != m.src:
                raise ValueError(f"{m}: block {m.block} is on shard {owner[m.block]}, not {m.src}")
            owner[m.block] = m.dst
        ranges = []
        for shard in range(old.num_stages):
            blocks = [b for b, o in enumerate(owner) if o == shard]
            if not blocks or blocks != list(range(blocks[0], blocks[-1] + 1)):
                raise ValueError(f"moves {list(moves)} leave shard {shard} with non-contiguous blocks {blocks}")
            ranges.append((blocks[0], blocks[-1] + 1))
        new_plan = self.plan.with_ranges(BlockPlan(tuple(ranges)).ranges)
        actors = self.plan.shard_actors
        groups: dict[tuple[int, int], list[int]] = {}
        for m in moves:
            groups.setdefault((actors[m.src], actors[m.dst]), []).append(m.block)
        await self.chain.pause()
        try:
            for (src, dst), blocks in groups.items():
                await self.chain.transfer_blocks(src, dst, blocks)
            for actor, block_range in zip(actors, ranges):
                await self.chain.call(actor, "set_block_range", block_range)
        finally:
            self.plan = new_plan if await self._ranges_adopted(new_plan) else self.plan
            await self.chain.resume(self.plan)
        if self.plan is not new_plan:
            raise PipelineFailedError(f"block moves {list(moves)} failed; the plan stays {self.plan.spec}")
        return new_plan

    async def _ranges_adopted(self, plan: PipelinePlan) -> bool:
        try:
            stats = await asyncio.gather(*(self.chain.call(i, "stats") for i in plan.shard_actors))
        except Exception:  # noqa: BLE001
            return False
        return [r["roles"] for r in stats] == [plan.stages[i].roles for i in plan.shard_actors]

    # ---- internals -----------------------------------------------------------------------------------

    def _get(self, stream_id: str) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open", stream_id=stream_id)
        return s

    def _check_stream(self, s: _Stream) -> None:
        if s.failed is not None:
            raise s.failed

    @staticmethod
    def _chunk_ready(s: _Stream) -> bool:
        need = CHUNK_FRAMES if s.started else s.params.first_chunk_frames
        return s.failed is None and len(s.pending) >= need

    @staticmethod
    def _take(s: _Stream, count: int) -> tuple[list[int], torch.Tensor]:
        items = [s.pending.popleft() for _ in range(count)]
        return [seq for seq, _ in items], stack_frames([f for _, f in items])

    def _next_tick_id(self) -> int:
        self._tick_id += 1
        return self._tick_id

    async def _run(self, msg: StageMessage, streams: list[_Stream], submitted: asyncio.Event | None = None
                   ) -> StageMessage:
        """Run a message; map transport failures to a rebuild + the failure policy, stage errors to
        the streams of the message. Raises PipelineFailedError (or the stage's WeirError)."""
        generation = self.chain.generation
        t0 = time.perf_counter()
        try:
            out = await self.chain.run(msg, submitted)
        except ChainBrokenError as exc:
            await self._on_chain_broken(generation, exc)
            raise PipelineFailedError(
                f"pipeline {self.plan.spec}: a stage failed during a tick ({exc}); stream state was lost",
                stream_ids=[s.stream_id for s in streams],
            ) from exc
        self.tick_latencies_s.append(time.perf_counter() - t0)
        if out.failure is not None:
            f = out.failure
            err = PipelineFailedError(
                f"stream(s) {[s.stream_id for s in streams]} failed on actor {f.actor}: {f.error_type}: {f.message}",
                actor=f.actor, error_type=f.error_type, traceback=f.traceback,
            )
            for s in streams:  # their state may be half-advanced: they cannot continue
                s.failed = err
            if isinstance(f.error, WeirError) and not isinstance(f.error, PipelineFailedError):
                raise f.error from err
            raise err
        return out

    async def _on_chain_broken(self, generation: int, cause: BaseException) -> None:
        async with self._failure_lock:
            if generation < self._handled_generation:
                return
            self._handled_generation = generation + 1
            log.warning("pipeline %s: chain broken (%s); rebuilding", self.plan.spec, cause)
            err = PipelineFailedError(
                f"pipeline {self.plan.spec} lost a stage ({cause}); the stream's state is gone: reconnect"
            )
            try:
                await self.chain.recover(generation, cause)
            except BaseException:
                for s in self._streams.values():
                    s.failed = err
                raise
            self.rebuilds += 1
            await asyncio.gather(
                *(self.chain.call(i, "reset_streams") for i in range(self.plan.num_actors)), return_exceptions=True
            )
            for s in list(self._streams.values()):
                if self.failure_policy == "fail":
                    s.failed = err
                    continue
                # restart: fresh state everywhere, the next chunk is a first chunk (prefill)
                s.started = False
                s.reset_ring()
                s.in_flight.clear()
                try:
                    await self._open_on_actors(s)
                except BaseException as exc:  # noqa: BLE001
                    s.failed = PipelineFailedError(f"stream {s.stream_id!r} could not be restarted: {exc}")

    async def _prefill(self, s: _Stream, seqs: list[int], frames_THWC: torch.Tensor) -> dict[str, list[OutputFrame]]:
        """The first chunk: n dependent executions (LatentStreamer.prefill), then its frames."""
        x_BCFHW = None
        out: StageMessage | None = None
        for step in range(s.num_steps):
            item = WorkItem(
                s.stream_id, "prefill", frames_THWC=frames_THWC if step == 0 else None, step=step,
                latents_BCFHW=x_BCFHW, decode=step == s.num_steps - 1, new_chunk=step == 0,
            )
            out = await self._run(StageMessage(self._next_tick_id(), [item], sink_check=False), [s])
            x_BCFHW = _own(out.items[0].latents_BCFHW)
        s.started = True
        s.reset_ring()
        return {s.stream_id: self._frames(s, out.items[0], seqs)}

    async def _submit_tick(self, work: list[tuple[_Stream, list[int] | None, torch.Tensor | None]]) -> asyncio.Future:
        """Submit one shared micro-step (frames None = a drain tick) once every stream's chain is free;
        returns, once it is in the chain, the job that finishes it. The emission rule is
        StreamEngine._emit's, decided here at submission: tick k emits the chunk of tick k - (n-1)*W."""
        for s, _, _ in work:  # the chain's buffer is the result of its previous tick, W ticks ago
            await s.chain_free[s.ticks % s.chains].wait()
            self._check_stream(s)
        items, emits, chains = [], [], []
        for s, seqs, frames in work:
            chain = s.ticks % s.chains
            s.ticks += 1
            s.in_flight.append(seqs if seqs is not None else [])
            emit = None
            if len(s.in_flight) > exit_lag(s.num_steps, s.chains):
                emit = s.in_flight.popleft() or None
            emits.append(emit)
            chains.append(chain)
            s.chain_free[chain].clear()
            s.ticks_in_flight += 1
            items.append(WorkItem(s.stream_id, "tick", frames_THWC=frames, buffer_BCFHW=s.buffers[chain],
                                  chain=chain, decode=emit is not None, new_chunk=frames is not None))
        earlier = {s.last_tick for s, _, _ in work if s.last_tick is not None}
        submitted = asyncio.Event()
        msg = StageMessage(self._next_tick_id(), items)
        job = asyncio.ensure_future(self._finish_tick(msg, work, chains, emits, submitted, earlier))
        for s, _, _ in work:
            s.last_tick = job
        await submitted.wait()
        for s, _, _ in work:
            self._peak_ticks_in_flight = max(self._peak_ticks_in_flight, s.ticks_in_flight)
        return job

    async def _finish_tick(self, msg: StageMessage, work, chains: list[int], emits: list, submitted: asyncio.Event,
                           earlier: set[asyncio.Future]) -> dict[str, list[OutputFrame]]:
        """Run a submitted tick; keep each chain's returned buffer; return the frames after the streams'
        earlier ticks have returned theirs."""
        streams = [s for s, _, _ in work]
        try:
            out = await self._run(msg, streams, submitted=submitted)
            result: dict[str, list[OutputFrame]] = {}
            for s, chain, item, emit in zip(streams, chains, out.items, emits):
                s.buffers[chain] = _own(item.buffer_BCFHW)
                result[s.stream_id] = self._frames(s, item, emit) if emit is not None else []
        except asyncio.CancelledError:
            for s in streams:  # the actors may have advanced past the buffer kept here
                s.failed = s.failed or PipelineFailedError(
                    f"a tick of stream {s.stream_id!r} was cancelled; its state is unknown: reconnect")
            raise
        finally:
            submitted.set()
            for s, chain in zip(streams, chains):
                s.ticks_in_flight -= 1
                s.chain_free[chain].set()
        if earlier:
            await asyncio.wait(earlier)
        return result

    async def _submit_drain(self, s: _Stream) -> list[asyncio.Future]:
        """Submit drain ticks until every chunk in flight is on its way out (exit_lag ticks after the
        last one); returns their jobs."""
        jobs = []
        while any(s.in_flight):
            jobs.append(await self._submit_tick([(s, None, None)]))
        return jobs

    @staticmethod
    async def _quiesce(s: _Stream) -> None:
        """Wait until no tick of the stream is in flight and every one has returned its frames (under
        the stream's lock, so none starts meanwhile): controls never overtake a tick."""
        for free in s.chain_free:
            await free.wait()
        if s.last_tick is not None:
            await asyncio.wait({s.last_tick})

    def _frames(self, s: _Stream, item: WorkItem, seqs: list[int]) -> list[OutputFrame]:
        frames = item.frames_out_THWC
        if frames is None:
            raise AssertionError(f"stream {s.stream_id!r}: frames {seqs} came back undecoded")
        frames = frames.numpy().copy()
        if frames.shape[0] != len(seqs):
            raise AssertionError(f"decoded {frames.shape[0]} frames for {len(seqs)} inputs")
        s.frames_out += len(seqs)
        return [OutputFrame(seq=q, frame=f) for q, f in zip(seqs, frames)]


async def _await(fut):
    return await fut


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """A private copy of a tensor received from a channel (it may alias a reused shared-memory buffer)."""
    return None if t is None else t.clone()


class CompiledGraphExecutor(ChainExecutor):
    """The Executor over stage actors in a Ray compiled graph. Build it with `await create(...)`
    inside a running event loop (e.g. the Serve replica's async __init__)."""

    @classmethod
    async def create(
        cls,
        plan: PipelinePlan,
        *,
        placement_group=None,
        bundle_offset: int = 0,
        options: WorkerOptions | None = None,
        failure_policy: str = "fail",
        ring: bool | None = None,
        **chain_kwargs,
    ) -> CompiledGraphExecutor:
        """Create the actors (in `placement_group` from bundle `bundle_offset` when given), wait for
        their models, compile the graph. `ring`: see ChainExecutor; `chain_kwargs` go to CompiledGraphChain."""
        chain = CompiledGraphChain(
            plan, placement_group=placement_group, bundle_offset=bundle_offset, options=options, **chain_kwargs
        )
        await chain.start()
        return cls(plan, chain, failure_policy=failure_policy, ring=ring)

    @property
    def actors(self) -> list:
        """The stage actor handles, in chain order (tests kill one to check failure handling)."""
        return self.chain.actors


async def create_local_executor(plan: PipelinePlan, options: WorkerOptions | None = None, *,
                                ring: bool | None = None) -> ChainExecutor:
    """The same plan's workers chained in this process (the bench's --no-ray mode)."""
    return ChainExecutor(plan, LocalChain.build(plan, options), ring=ring)
