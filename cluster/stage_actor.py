"""A stage actor: the real stage objects of its roles (encode / DiT shard / decode), one device, many
streams. `StageWorker` is a plain class (the `--no-ray` bench chains it in one process, unit tests
drive it directly); `StageActor` is the same class as a Ray actor, a node of the compiled graph.

Legend: n denoising steps (slots) of a stream, C latent channels (16), F latent frames, h/w latent
height / width, T/H/W pixel frames / height / width, B rows of a shared DiT forward.

Roles, from cluster.plan.StagePlacement (one worker may hold several, in this order):

    head    (encode role) frames -> VAE encode -> motion-aware noise -> noisy latent; the stream-batch
            bookkeeping (StreamBatchState.begin_tick: shift, place the new chunk, pick the rows);
            assembles the DiTMicroBatch. Also hosts the text encoder.
    shard   (block range) DiTShard.forward over its blocks only: it builds / loads ONLY its blocks'
            weights and keeps only their KV caches. Each stream's prompt blend (stages.prompt_blend)
            advances on every shard worker when an item carries a new chunk (`WorkItem.new_chunk`),
            before the forward, exactly where the single-process LatentStreamer advances it.
    tail    (the shard that owns the last block) x0 -> StreamBatchState.end_tick: store x0, re-noise
            slots 0..n-2 with the stream's own noise source; in a prefill, re-noise between steps.
    decode  (decode role) x0 of the chunk leaving the stream batch -> VAE decode -> uint8 frames.

Every message crossing the chain is a `StageMessage` (picklable dataclasses of tensors and Python
values; CUDA tensors ride NCCL channels, everything else shared memory). The driver (cluster.graph)
keeps what must cycle between ticks: the stream-batch buffer [n, C, 1, h, w] that the tail returns
(CPU) is sent back to the head with the stream's next tick on the same chain (the next tick with one
chain, tick k + W with W chains: stages.stream_batch, "Ring"), so the graph stays acyclic.

The computation is the single-process engine's (stages.engine.StreamEngine + LatentStreamer), op for
op and draw for draw, split across workers: same seeds give bit-identical frames in fp32.

Threads: compiled-graph tasks (`run`) execute on a background thread of the actor, control calls
(`open_stream`, `set_text`, ...) on its main thread; one lock per worker serialises them. The driver
never sends a control call for a stream while a tick of that stream is in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch

from cluster.plan import PipelinePlan, StagePlacement
from scheduling.noise import NoiseController
from stages.config import DIT_PRESETS, StreamConfig
from stages.dit import WanBlock, WanDiT
from stages.dit_stage import DiTMicroBatch, DiTShard
from stages.engine import encode_noisy
from stages.errors import BadRequestError, StreamExistsError, StreamNotFoundError, WeirError
from stages.flow_match import FlowMatchSchedule, denoising_steps
from stages.kv_cache import BlockKVCache, upload_long
from stages.loading import (
    _default_dtype,
    build_dit_shard,
    build_vae_models,
    random_init_,
    use_cudnn_autotuning,
)
from stages.prompt_blend import PromptBlend, encode_mix
from stages.prompts import PromptMix, check_blend_chunks
from stages.stream_batch import GeneratorNoise, StreamBatchState
from stages.vae_stage import (
    VAEDecodeStage,
    VAEEncodeStage,
    frames_model_to_uint8,
    frames_uint8_to_model,
    to_host,
)

KV_FIELDS = BlockKVCache.TENSOR_FIELDS
"""The tensors of a BlockKVCache (moved whole by a block rebalance)."""


# ---- the wire protocol -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOpen:
    """What every worker needs to open a stream (from stages.engine.StreamParams)."""

    stream_id: str
    height: int
    width: int
    num_steps: int
    noise_scale: float
    seed: int
    vae: str
    first_chunk_frames: int = 1
    motion_aware_noise: bool = True
    chains: int = 1
    """W interleaved stream-batch chains (stages.stream_batch, "Ring"): the head keeps W chains' slot
    positions and statuses; their buffers travel through the driver, one per chain."""

    def stream_config(self) -> StreamConfig:
        """The StreamConfig the single-process engine builds for the same params."""
        return StreamConfig(
            num_steps=self.num_steps,
            noise_scale=self.noise_scale,
            first_chunk_frames=self.first_chunk_frames,
            motion_aware_noise=self.motion_aware_noise,
        )


@dataclass
class WorkItem:
    """One stream's part of a message. The driver fills the inputs; workers fill the rest on the way.

    kind 'tick': one stream-batch micro-step (frames_THWC = the new 4-frame chunk, or None for a drain
    tick); kind 'prefill': step `step` of the first chunk's n back-to-back steps (frames on step 0,
    latents_BCFHW = the re-noised x_t from the previous step otherwise).
    """

    stream_id: str
    kind: str
    frames_THWC: torch.Tensor | None = None
    """uint8 [T, H, W, 3] CPU: the chunk to encode."""
    buffer_BCFHW: torch.Tensor | None = None
    """tick: driver -> head, the stream's buffer after its previous tick (None: the head's own, zeros
    after a reset); head -> tail, the shifted buffer with the new chunk in slot 0."""
    step: int = 0
    """prefill: which of the n steps."""
    latents_BCFHW: torch.Tensor | None = None
    """prefill step > 0: x_t (CPU) from the driver; tail -> driver: the next step's x_t (CPU)."""
    decode: bool = False
    """Decode this item's x0 at the end of the chain (the driver's emission bookkeeping decides)."""
    new_chunk: bool = False
    """Set by the driver: a new chunk enters the DiT with this item (a tick with frames, or prefill
    step 0), so the stream's prompt blend moves one chunk on before the forward."""
    chain: int = 0
    """tick: the stream-batch chain it runs on (ticks since the reset mod W), set by the driver with
    that chain's buffer; the head checks that its own count agrees."""
    slots: tuple[int, ...] | None = None
    """Set by the head: the forwarded slots (None: nothing forwarded)."""
    statuses: list | None = None
    """Set by the head: the slot statuses after begin_tick (the tail's emission rule reads them)."""
    x0_BCFHW: torch.Tensor | None = None
    """Set by the tail: the x0 leaving the stream batch (decoded by the decode role, then dropped)."""
    frames_out_THWC: torch.Tensor | None = None
    """Set by the decode role: uint8 [T, H, W, 3] CPU."""


@dataclass
class StageFailure:
    """An exception raised inside a worker during `run`, carried to the driver in the message."""

    actor: int
    error_type: str
    message: str
    traceback: str
    error: BaseException | None = None
    """The exception itself when it is a (picklable) WeirError."""


@dataclass
class StageMessage:
    """What flows through the chain for one execution: the work items and the DiT micro-batch."""

    tick_id: int
    items: list[WorkItem]
    sink_check: bool = True
    """False for prefill messages (spec I.1: the prefill never runs the sink check)."""
    batch: DiTMicroBatch | None = None
    prefill_timesteps: tuple[int, ...] | None = None
    """Set by the head in a prefill message: the stream's n timesteps (every shard resizes its caches
    to n slots after the last step)."""
    failure: StageFailure | None = None
    """Set by the first worker that failed; later workers pass the message on untouched."""

    @property
    def is_prefill(self) -> bool:
        """True for a prefill step's message (one item, kind 'prefill')."""
        return bool(self.items) and self.items[0].kind == "prefill"


# ---- per-stream state ------------------------------------------------------------------------------


@dataclass
class _HeadStream:
    """The head's state of one stream (the engine's _Stream front half + the stream-batch bookkeeping)."""

    params: StreamOpen
    noise: NoiseController
    generator: torch.Generator
    batch: StreamBatchState
    last_frame_BC1HW: torch.Tensor | None = None


def _no_noise(shape: tuple[int, ...]) -> torch.Tensor:
    raise AssertionError("the head's stream-batch state never draws noise (the tail re-noises)")


class _ReplayView:
    """The whole model's parameter list with this shard's own parameters in place and a scratch
    tensor (same shape, dtype and device, one at a time) for each of the others: `random_init_` over
    it draws the whole model's sequence from the same generator and keeps the shard's values."""

    def __init__(self, shard_model: WanDiT, device: torch.device, dtype: torch.dtype) -> None:
        with torch.device("meta"), _default_dtype(dtype):
            self._full = WanDiT(shard_model.cfg)
        self._own = dict(shard_model.named_parameters())
        self._device = device
        missing = set(self._own) - {name for name, _ in self._full.named_parameters()}
        assert not missing, f"shard parameters {sorted(missing)[:3]} are not in the full model"

    def named_parameters(self):
        for name, p in self._full.named_parameters():
            own = self._own.get(name)
            yield name, own if own is not None else torch.empty_like(p, device=self._device)


def build_shard(
    plan: PipelinePlan, block_range: tuple[int, int], device: torch.device, *, cuda_graphs: bool = False,
    spare_streams: int = 8,
) -> DiTShard:
    """The DiT shard of `block_range`: its slice of the checkpoint, or seeded random weights
    (plan.weights_init 'replay': exactly the single-process engine's on the same device type;
    'shard': seeded per shard). `spare_streams`: closed streams' states kept (DiTShard)."""
    cuda_graphs = cuda_graphs and device.type == "cuda"
    cfg = DIT_PRESETS[plan.model]
    dtype = getattr(torch, plan.dtype)
    if plan.checkpoint_dir is not None:
        from stages.checkpoints import find_checkpoints

        layout = find_checkpoints(plan.checkpoint_dir, dit=plan.model)
        return build_dit_shard(
            cfg, block_range, device=device, dtype=dtype, checkpoint=str(layout.dit_checkpoint(plan.model)),
            cuda_graphs=cuda_graphs, spare_streams=spare_streams,
        )
    if plan.weights_init == "shard":
        return build_dit_shard(
            cfg, block_range, device=device, dtype=dtype, seed=plan.weights_seed + block_range[0],
            cuda_graphs=cuda_graphs, spare_streams=spare_streams,
        )
    with torch.device(device), _default_dtype(dtype):
        model = WanDiT(cfg, block_range)
    random_init_(_ReplayView(model, device, dtype), plan.weights_seed)  # type: ignore[arg-type]
    return DiTShard(model, device=device, dtype=dtype, cuda_graphs=cuda_graphs, spare_streams=spare_streams)


def _build_vaes(plan: PipelinePlan, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The Wan VAE and TAEHV models, exactly as the single-process engine builds them."""
    return build_vae_models(plan.model, device, dtype, checkpoint_dir=plan.checkpoint_dir,
                            weights_seed=plan.weights_seed)


# ---- the worker -------------------------------------------------------------------------------------


class StageWorker:
    """Hosts the stage objects of one StagePlacement of `plan` on one device, for many streams.

    Args:
        plan: the whole pipeline plan (the worker reads its own placement and the model settings).
        actor: this worker's index in plan.stages.
        device: torch device; default 'cuda' for a GPU placement (Ray sets CUDA_VISIBLE_DEVICES to the
            actor's GPU), 'cpu' otherwise. The no-Ray chain passes 'cuda:<gpu>'.
        num_threads: torch intra-op threads (CPU tests pin 1).
        sync_timing: synchronise the device around each role so `stats()` times are device times
            (benchmarks); off in serving.
        deterministic: cuDNN deterministic kernels (exactness tests on GPU); otherwise cuDNN
            benchmark mode, as the single-process engine.
        cuda_graphs: the DiT shard replays steady-state micro-steps from CUDA graphs, and so do both
            VAEs' encode and decode of steady stream calls (CUDA only; stages.vae_stage).
    """

    def __init__(
        self,
        plan: PipelinePlan,
        actor: int,
        *,
        device: str | None = None,
        num_threads: int | None = None,
        sync_timing: bool = False,
        deterministic: bool = False,
        cuda_graphs: bool = False,
        spare_streams: int = 8,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.plan = plan
        self.placement: StagePlacement = plan.stages[actor]
        self.index = actor
        self.device = torch.device(device or ("cpu" if self.placement.gpu is None else "cuda"))
        self.dtype: torch.dtype = getattr(torch, plan.dtype)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = deterministic
            use_cudnn_autotuning(not deterministic)
        self.sync_timing = sync_timing and self.device.type == "cuda"
        self._lock = threading.RLock()
        self._timings: dict[str, deque] = {}
        self.num_layers = DIT_PRESETS[plan.model].num_layers
        p = self.placement

        self.shard: DiTShard | None = (
            build_shard(plan, p.blocks, self.device, cuda_graphs=cuda_graphs, spare_streams=spare_streams)
            if p.blocks else None
        )
        self.schedule = self.shard.schedule if self.shard is not None else FlowMatchSchedule().to(self.device)
        self.encoders: dict[str, VAEEncodeStage] = {}
        self.decoders: dict[str, VAEDecodeStage] = {}
        self.text = None
        if p.encode or p.decode:
            scaling = StreamConfig().latent_scaling
            for kind, model in _build_vaes(plan, self.device, self.dtype).items():
                kind_dtype = torch.float16 if kind == "taehv" and self.device.type == "cuda" else self.dtype
                spares = dict(cuda_graphs=cuda_graphs, spare_streams=spare_streams)
                if p.encode:
                    self.encoders[kind] = VAEEncodeStage(kind, model, self.device, kind_dtype, scaling, **spares)
                if p.decode:
                    self.decoders[kind] = VAEDecodeStage(kind, model, self.device, kind_dtype, scaling, **spares)
        if p.encode:
            from stages.t5 import build_text_encoder

            text_device = torch.device("cpu") if plan.text_on_cpu else self.device
            self.text = build_text_encoder(
                plan.checkpoint_dir,
                device=text_device,
                dtype=self.dtype if text_device.type == "cuda" else torch.float32,
                seed=plan.weights_seed,
            )
        self._heads: dict[str, _HeadStream] = {}
        self._tails: dict[str, StreamBatchState] = {}
        self._params: dict[str, StreamOpen] = {}
        self._prompts: dict[str, PromptBlend] = {}
        """Shard workers: each stream's conditioning and running blend."""

    # ---- roles ----------------------------------------------------------------------------------------

    @property
    def is_head(self) -> bool:
        """Encodes (and assembles the micro-batch)."""
        return self.placement.encode

    @property
    def is_tail(self) -> bool:
        """Holds the last block: re-noises and emits."""
        return self.shard is not None and self.shard.block_range[1] == self.num_layers

    @property
    def block_range(self) -> tuple[int, int] | None:
        """The DiT blocks held, or None."""
        return None if self.shard is None else self.shard.block_range

    def ping(self) -> int:
        """Liveness probe: the worker's process id."""
        return os.getpid()

    # ---- stream lifecycle (control calls, main thread) --------------------------------------------------

    def open_stream(self, req: StreamOpen) -> None:
        """Allocate the stream's state for every role of this worker (all or nothing)."""
        sid = req.stream_id
        with self._lock:
            if sid in self._params:
                raise StreamExistsError(f"stream {sid!r} is already open on actor {self.index}", stream_id=sid)
            cfg = req.stream_config()
            opened: list = []
            try:
                if self.is_head:
                    self.encoders[req.vae].open_stream(sid)
                    opened.append(lambda: self.encoders[req.vae].close_stream(sid))
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed(req.seed)
                    self._heads[sid] = _HeadStream(
                        params=req,
                        noise=NoiseController(req.noise_scale, enabled=req.motion_aware_noise),
                        generator=gen,
                        batch=self._new_batch_state(req, req.num_steps, _no_noise, chains=req.chains),
                    )
                    opened.append(lambda: self._heads.pop(sid, None))
                if self.shard is not None:
                    self.shard.open_stream(
                        sid, num_slots=req.num_steps, height=req.height, width=req.width, stream_cfg=cfg
                    )
                    opened.append(lambda: self.shard.close_stream(sid))
                if self.is_tail:  # one chain: each tick's item brings its chain's buffer and statuses
                    noise = GeneratorNoise(req.seed, device=self.device, dtype=self.dtype)
                    self._tails[sid] = self._new_batch_state(req, req.num_steps, noise)
                if self.placement.decode:
                    self.decoders[req.vae].open_stream(sid)
            except BaseException:
                for undo in reversed(opened):
                    with contextlib.suppress(Exception):
                        undo()
                self._tails.pop(sid, None)
                raise
            self._params[sid] = req

    def _new_batch_state(self, req: StreamOpen, num_steps: int, noise, *, chains: int = 1) -> StreamBatchState:
        return StreamBatchState(
            req.stream_id,
            stream_cfg=req.stream_config(),
            num_steps=num_steps,
            latent_hw=(req.height // 8, req.width // 8),
            noise=noise,
            schedule=self.schedule,
            device=self.device,
            dtype=self.dtype,
            in_channels=DIT_PRESETS[self.plan.model].in_dim,
            chains=chains,
        )

    def freeze_heap(self) -> int:
        """stages.engine.freeze_heap in this actor's process; returns the objects frozen."""
        from stages.engine import freeze_heap

        return freeze_heap()

    def close_stream(self, stream_id: str) -> None:
        """Free every state of the stream on this worker. Unknown ids are ignored (idempotent)."""
        with self._lock:
            params = self._params.pop(stream_id, None)
            if params is None:
                return
            vae = params.vae
            self._heads.pop(stream_id, None)
            self._tails.pop(stream_id, None)
            self._prompts.pop(stream_id, None)
            for registry in (self.encoders.get(vae), self.decoders.get(vae)):
                if registry is not None and registry.has_stream(stream_id):
                    registry.close_stream(stream_id)
            if self.shard is not None and stream_id in self.shard.stream_ids:
                self.shard.close_stream(stream_id)

    def reset_streams(self) -> list[str]:
        """Drop every stream (after a failure elsewhere in the chain lost their state). Returns the ids."""
        with self._lock:
            ids = list(self._params)
            for sid in ids:
                self.close_stream(sid)
            return ids

    def stream_ids(self) -> list[str]:
        """Open streams on this worker."""
        with self._lock:
            return list(self._params)

    def encode_prompts(self, prompt: str | PromptMix) -> torch.Tensor:
        """Head only: the text embeddings [1, 512, 4096] of a prompt or a weighted mix (mixed on this
        worker's device, as the single-process engine mixes), in the model dtype, on the CPU."""
        if self.text is None:
            raise BadRequestError(f"actor {self.index} has no text encoder (it is not the encode actor)")
        with self._lock:
            return encode_mix(self.text, PromptMix.of(prompt), self.device, self.dtype).cpu()

    def set_text(self, stream_id: str, text_embeds_BST: torch.Tensor, blend_chunks: int = 0,
                 mode: str = "linear") -> None:
        """Set or swap the stream's prompt on this worker's shard (no-op without a shard): at once, or
        blended over the stream's next `blend_chunks` chunks (LatentStreamer.set_prompt_context)."""
        check_blend_chunks(blend_chunks)
        with self._lock:
            self._require(stream_id)
            if self.shard is None:
                return
            target = text_embeds_BST.to(self.device, self.dtype)
            now = self._prompts.setdefault(stream_id, PromptBlend()).retarget(target, blend_chunks, mode)
            if now is not None:
                self.shard.set_text_context(stream_id, now)

    def prompt_context(self, stream_id: str) -> torch.Tensor | None:
        """Shard workers: the text embedding the stream is conditioned on now (CPU), else None."""
        with self._lock:
            self._require(stream_id)
            blend = self._prompts.get(stream_id)
            return None if blend is None or blend.current is None else blend.current.cpu()

    def _advance_prompts(self, msg: StageMessage) -> None:
        """The items carrying a new chunk move their stream's prompt blend on (LatentStreamer order)."""
        for item in msg.items:
            blend = self._prompts.get(item.stream_id) if item.new_chunk else None
            now = None if blend is None else blend.advance()
            if now is not None:
                self.shard.set_text_context(item.stream_id, now)

    def set_num_steps(self, stream_id: str, num_steps: int) -> None:
        """Resize the stream to n slots (LatentStreamer.set_num_steps, split by role)."""
        with self._lock:
            self._require(stream_id)
            if self.shard is not None:
                self.shard.set_num_slots(stream_id, num_steps)
            head = self._heads.get(stream_id)
            if head is not None:
                denoising_steps(head.batch.stream_cfg.step_list, num_steps)
                new = self._new_batch_state(head.params, num_steps, _no_noise, chains=head.params.chains)
                new.reset(next_frame=head.batch.next_frame)
                head.batch = new
            tail = self._tails.get(stream_id)
            if tail is not None:
                new = self._new_batch_state(self._params[stream_id], num_steps, tail.noise)
                new.reset(next_frame=tail.next_frame)
                self._tails[stream_id] = new

    def _require(self, stream_id: str) -> None:
        if stream_id not in self._params:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open on actor {self.index}", stream_id=stream_id)

    # ---- the compiled-graph node ------------------------------------------------------------------------

    def _settle(self, msg: StageMessage) -> None:
        """Make the message's CUDA tensors contiguous and wait for the device: the channel's NCCL
        send/recv run on their own stream, so nothing may still be pending on ours at a hand-off."""
        if self.device.type != "cuda":
            return
        batch = msg.batch
        if batch is not None:
            for f in dataclasses.fields(batch):
                value = getattr(batch, f.name)
                if isinstance(value, torch.Tensor) and value.is_cuda and not value.is_contiguous():
                    setattr(batch, f.name, value.contiguous())
        torch.cuda.synchronize(self.device)

    def run(self, msg: StageMessage) -> StageMessage:
        """Do this worker's roles for one message and pass it on (the graph node of this actor)."""
        if msg.failure is not None:
            return msg
        with self._lock:
            try:
                self._settle(msg)  # tensors received over NCCL are complete before any kernel reads them
                if self.is_head:
                    with self._timed("encode"):
                        self._run_head(msg)
                if self.shard is not None and msg.batch is not None:
                    with self._timed("dit"):
                        self._advance_prompts(msg)
                        msg.batch = self.shard.forward(msg.batch)
                        steps = msg.prefill_timesteps
                        if steps is not None and msg.items[0].step == len(steps) - 1:
                            self.shard.set_num_slots(msg.items[0].stream_id, len(steps))
                if self.is_tail:
                    with self._timed("tail"):
                        self._run_tail(msg)
                if self.placement.decode:
                    with self._timed("decode"):
                        self._run_decode(msg)
                self._settle(msg)  # every tensor sent on is dense and fully written before NCCL reads it
            except Exception as exc:  # noqa: BLE001 - reported to the driver in the message
                msg.batch = None
                msg.failure = StageFailure(
                    actor=self.index,
                    error_type=type(exc).__name__,
                    message=str(exc),
                    traceback=traceback.format_exc(),
                    error=exc if isinstance(exc, WeirError) else None,
                )
        return msg

    def _encode_noisy(self, st: _HeadStream, frames_THWC: torch.Tensor, *, first: bool) -> tuple[torch.Tensor, int | None]:
        frames_BCTHW = frames_uint8_to_model(frames_THWC, device=self.device, dtype=self.dtype)
        noisy, current_step = encode_noisy(
            self.encoders[st.params.vae], st.params.stream_id, frames_BCTHW, st.noise, st.generator,
            None if first else st.last_frame_BC1HW, dtype=self.dtype,
        )
        st.last_frame_BC1HW = frames_BCTHW[:, :, -1:]
        return noisy, current_step

    def _head(self, stream_id: str) -> _HeadStream:
        st = self._heads.get(stream_id)
        if st is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open on actor {self.index}", stream_id=stream_id)
        return st

    def _run_head(self, msg: StageMessage) -> None:
        long = dict(dtype=torch.long, device=self.device)
        if msg.is_prefill:
            (item,) = msg.items
            st = self._head(item.stream_id)
            timesteps = st.batch.timesteps
            if item.step == 0:
                x_1CFHW, _ = self._encode_noisy(st, item.frames_THWC, first=True)
            else:
                x_1CFHW = item.latents_BCFHW
            x_1CFHW = x_1CFHW.to(self.device, self.dtype)
            item.frames_THWC = item.latents_BCFHW = None
            batch = DiTMicroBatch(
                segments=[(item.stream_id, (0,))],
                noisy_latents_BCFHW=x_1CFHW,
                timesteps_B=torch.full((1,), timesteps[item.step], **long),
                start_frames_B=torch.zeros(1, **long),
                sink_check=False,
                start_frames=(0,),
            )
            msg.prefill_timesteps = tuple(timesteps)
            msg.batch = batch
            if item.step == len(timesteps) - 1:
                st.batch.reset(next_frame=x_1CFHW.shape[2])
            return
        ticks = []
        for item in msg.items:
            st = self._head(item.stream_id)
            if item.chain != st.batch.next_chain:
                raise AssertionError(
                    f"stream {item.stream_id!r}: the driver sent chain {item.chain}'s buffer for a tick of "
                    f"chain {st.batch.next_chain}"
                )
            noisy, current_step = None, None
            if item.frames_THWC is not None:
                noisy, current_step = self._encode_noisy(st, item.frames_THWC, first=False)
            tick = st.batch.begin_tick(noisy, current_step, item.buffer_BCFHW)
            item.frames_THWC = None
            item.slots = None if tick is None else tick.slots
            item.statuses = list(st.batch.status)
            item.buffer_BCFHW = st.batch.buffer_BCFHW
            if tick is not None:
                ticks.append(tick)
        if ticks:  # exactly LatentStreamer.step's micro-batch
            msg.batch = DiTMicroBatch(
                segments=[(t.stream_id, t.slots) for t in ticks],
                noisy_latents_BCFHW=torch.cat([t.noisy_latents_BCFHW for t in ticks]),
                timesteps_B=upload_long([x for t in ticks for x in t.timesteps], self.device),
                start_frames_B=upload_long([x for t in ticks for x in t.start_frames], self.device),
                start_frames=tuple(x for t in ticks for x in t.start_frames),
            )

    def _tail(self, stream_id: str) -> StreamBatchState:
        st = self._tails.get(stream_id)
        if st is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open on actor {self.index}", stream_id=stream_id)
        return st

    def _run_tail(self, msg: StageMessage) -> None:
        batch, msg.batch = msg.batch, None
        if msg.is_prefill:
            (item,) = msg.items
            st = self._tail(item.stream_id)
            x0_1CFHW = batch.x0_BCFHW
            timesteps = msg.prefill_timesteps
            if item.step + 1 < len(timesteps):  # exactly LatentStreamer.prefill's re-noise
                next_t = torch.full((1,), timesteps[item.step + 1], dtype=torch.long, device=self.device)
                noise_1CFHW = st.draw_noise_BCFHW(1, x0_1CFHW.shape[2])
                item.latents_BCFHW = self.schedule.add_noise(x0_1CFHW, noise_1CFHW, next_t).cpu()
            else:
                st.reset(next_frame=x0_1CFHW.shape[2])
                item.x0_BCFHW = x0_1CFHW
            return
        live = [item for item in msg.items if item.slots is not None]
        rows = batch.row_slices() if batch is not None else []
        for item, row in zip(live, rows):
            st = self._tail(item.stream_id)
            st.buffer_BCFHW = item.buffer_BCFHW.to(self.device, self.dtype, copy=True)
            st.status = list(item.statuses)
            item.x0_BCFHW = st.end_tick(item.slots, batch.x0_BCFHW[row])
            item.buffer_BCFHW = st.buffer_BCFHW
        for item in msg.items:
            item.buffer_BCFHW = None if item.buffer_BCFHW is None else item.buffer_BCFHW.cpu()

    def _run_decode(self, msg: StageMessage) -> None:
        for item in msg.items:
            x0, item.x0_BCFHW = item.x0_BCFHW, None
            if not item.decode:
                continue
            if x0 is None:
                raise AssertionError(f"stream {item.stream_id!r}: a chunk left the stream batch undecoded")
            params = self._params.get(item.stream_id)
            if params is None:
                raise StreamNotFoundError(f"stream {item.stream_id!r} is not open on actor {self.index}")
            frames_BCTHW = self.decoders[params.vae].decode(item.stream_id, x0)
            item.frames_out_THWC = to_host(frames_model_to_uint8(frames_BCTHW)[0])

    # ---- block rebalancing (control calls, graph torn down) -------------------------------------------

    def export_blocks(self, blocks: list[int]) -> dict:
        """Weights (CPU state dicts) and every stream's KV caches and cross-attention K/V of `blocks`."""
        with self._lock:
            shard = self._require_shard()
            payload: dict = {"weights": {}, "kv": {}, "cross": {}}
            for i in blocks:
                if str(i) not in shard.model.blocks:
                    raise ValueError(f"actor {self.index} does not hold block {i} (holds {shard.block_range})")
                payload["weights"][i] = {k: v.cpu() for k, v in shard.model.blocks[str(i)].state_dict().items()}
            for sid in shard.stream_ids:
                state = shard.state(sid)
                payload["kv"][sid] = {
                    i: {
                        "tokens_per_frame": state.kv[i].tokens_per_frame,
                        "policy": state.kv[i].policy,
                        **{name: getattr(state.kv[i], name).cpu() for name in KV_FIELDS},
                    }
                    for i in blocks
                }
                if state.cross_kv is not None:
                    payload["cross"][sid] = {i: tuple(t.cpu() for t in state.cross_kv[i]) for i in blocks}
            return payload

    def import_blocks(self, payload: dict) -> None:
        """Add blocks (weights + live streams' caches) exported by another shard of the same model."""
        with self._lock:
            shard = self._require_shard()
            cfg = shard.cfg
            for i, weights in payload["weights"].items():
                with torch.device(self.device), _default_dtype(self.dtype):
                    block = WanBlock(cfg)
                block.load_state_dict({k: v.to(self.device, self.dtype) for k, v in weights.items()}, strict=True)
                block.ops = shard.ops  # eager or compiled, as the shard's own blocks
                shard.model.blocks[str(i)] = block.eval().requires_grad_(False)
            for sid, per_block in payload["kv"].items():
                state = shard.state(sid)
                for i, raw in per_block.items():
                    cache = BlockKVCache.__new__(BlockKVCache)
                    cache.tokens_per_frame = raw["tokens_per_frame"]
                    cache.policy = raw["policy"]
                    for name in KV_FIELDS:
                        setattr(cache, name, raw[name].to(self.device))
                    state.kv[i] = cache
            for sid, per_block in payload["cross"].items():
                state = shard.state(sid)
                for i, (k, v) in per_block.items():
                    state.cross_kv[i] = (k.to(self.device), v.to(self.device))

    def drop_blocks(self, blocks: list[int]) -> None:
        """Forget blocks moved to another shard (weights and every stream's caches)."""
        with self._lock:
            shard = self._require_shard()
            for i in blocks:
                del shard.model.blocks[str(i)]
                for sid in shard.stream_ids:
                    state = shard.state(sid)
                    state.kv.pop(i, None)
                    if state.cross_kv is not None:
                        state.cross_kv.pop(i, None)

    def set_block_range(self, block_range: tuple[int, int]) -> None:
        """Adopt the block range after imports / drops; raises if the held blocks do not match it."""
        with self._lock:
            shard = self._require_shard()
            held = sorted(int(k) for k in shard.model.blocks.keys())
            start, end = block_range
            if held != list(range(start, end)):
                raise ValueError(f"actor {self.index} holds blocks {held}, not [{start}, {end})")
            if (start == 0) != shard.is_first or (end == self.num_layers) != shard.is_last:
                raise ValueError(f"actor {self.index}: a rebalance cannot move the first or last block boundary")
            shard.model.block_range = (start, end)
            for sid in shard.stream_ids:
                assert sorted(shard.state(sid).kv) == held
            self.placement = StagePlacement(
                actor=self.placement.actor, gpu=self.placement.gpu, encode=self.placement.encode,
                blocks=(start, end), decode=self.placement.decode,
            )

    def _require_shard(self) -> DiTShard:
        if self.shard is None:
            raise ValueError(f"actor {self.index} holds no DiT shard")
        graphs = getattr(self.shard, "graphs", None)
        if graphs is not None:  # captured CUDA graphs replay the old block list: drop them all
            for sid in self.shard.stream_ids:
                graphs.forget(sid)
        self.shard.spares.clear()  # their caches cover the old block list
        return self.shard

    # ---- stats -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _timed(self, role: str):
        if self.sync_timing:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_timing:
                torch.cuda.synchronize(self.device)
            self._timings.setdefault(role, deque(maxlen=4096)).append(time.perf_counter() - t0)

    def stats(self, reset: bool = False, reset_peak: bool = False) -> dict:
        """Role timings (seconds, most recent runs), memory, device and roles of this worker.
        `reset` clears the timings after reading them, `reset_peak` the device's peak memory."""
        with self._lock:
            out = {
                "actor": self.index,
                "roles": self.placement.roles,
                "device": str(self.device),
                "pid": os.getpid(),
                "timings_s": {role: list(values) for role, values in self._timings.items()},
                "memory_bytes": 0,
                "peak_memory_bytes": 0,
                "streams": len(self._params),
            }
            if self.device.type == "cuda":
                out["memory_bytes"] = int(torch.cuda.memory_allocated(self.device))
                out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
                if reset_peak:
                    torch.cuda.reset_peak_memory_stats(self.device)
            if reset:
                self._timings.clear()
            return out


def stage_actor_class():
    """`StageWorker` as a Ray actor class (options such as num_gpus are applied per actor)."""
    import ray

    return ray.remote(StageWorker)


@dataclass
class WorkerOptions:
    """Per-worker construction options shared by every actor of a chain (see StageWorker)."""

    num_threads: int | None = None
    sync_timing: bool = False
    deterministic: bool = False
    cuda_graphs: bool = False
    spare_streams: int = 8
    """Closed streams' DiT states each shard keeps for reuse (stages.dit_stage, "Spare states")."""
    env_vars: dict[str, str] = field(default_factory=dict)
    """Environment of each Ray actor (runtime_env env_vars), e.g. NCCL_NVLS_ENABLE=0."""
