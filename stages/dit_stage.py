"""The DiT stage: one `WanDiT` shard (all blocks or a contiguous range) serving many streams.

Shape legend:
    B  rows of a micro-batch (each one denoising slot of one stream)
    C  latent channels (16)      F  latent frames per row     H, W  latent height / width (pixels / 8)
    L  tokens per row (F * H/2 * W/2)      D  model width
    S  text tokens (512)         T  text width (4096)

A micro-batch is one denoising micro-step for a set of rows. Rows of several streams share one
forward (that is how the serving layer batches streams): `segments` lists, in row order, each
stream's id and the slots its rows belong to. Shards are chained: the first embeds the latents, each
runs its blocks on `hidden_BLD`, the last applies the head, unpatchifies and converts the flow to x0.
The message is a plain dataclass of tensors and Python values, so it can cross processes unchanged.

Worked example: streams "a" (n = 2 slots) and "b" (n = 3) in one step ->
    segments = [("a", (0, 1)), ("b", (0, 1, 2))], B = 5, rows 0-1 are a's slots 0-1, rows 2-4 b's.
With a 3-way split of a 30-block model the chain is (0, 10) -> (10, 20) -> (20, 30); chained in one
process it equals the unsplit model bit for bit.

Each shard keeps, per open stream, a `DiTStreamState` (kv_cache.py) for the blocks it owns.

Spare states. A closed stream's state is kept as a spare (at most `spare_streams`, oldest dropped
first) and a new stream of the same geometry (slots, token grid, cache policy) takes it: the caches
are zeroed in place (exactly a fresh state's values) and the prompt K/V refilled in place, so the
state keeps its tensor addresses and with them its CUDA graphs, which the graph runner renames to the
new stream. A stream that opens on a spare runs no eager DiT call and no DiT capture (its VAE
graphs, per stream, are still captured). On one H200 a new 1.3B stream's first chunks cost about
0.33 s of extra GPU time on a fresh state and about 50 ms on a spare (BENCHMARKS.md), and every
other stream on the GPU waits through them. Spares are freed when an allocation runs out of memory,
and when the shard's block range changes (`spares.clear()`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from stages.attention import attend, attend_kv_cache
from stages.config import DiTConfig, StreamConfig
from stages.cuda_graphs import SPARE_PREFIX, ShardGraphRunner, SparePool
from stages.dit import WanDiT
from stages.errors import BadRequestError, StreamExistsError, StreamNotFoundError
from stages.flow_match import FlowMatchSchedule
from stages.fused import EAGER_OPS, BlockOps, compiled_ops
from stages.kv_cache import BlockKVCache, DiTStreamState, KVCachePolicy

Segment = tuple[str, tuple[int, ...]]
LOG = logging.getLogger(__name__)


@dataclass
class DiTMicroBatch:
    """One denoising micro-step for B rows, passed from shard to shard.

    Attributes:
        segments: [(stream_id, slots)] in row order; sum of len(slots) == B.
        noisy_latents_BCFHW: x_t of every row. The first shard embeds it; the last needs it for x0.
        timesteps_B: int64 timestep of each row (the same for all of a row's frames).
        start_frames_B: int64 first latent-frame position of each row: RoPE temporal start, and
            token start = start_frame * tokens_per_frame for the KV cache.
        hidden_BLD: hidden state between shards (None before the first shard and after the last).
        x0_BCFHW: the predicted clean latents (set by the last shard).
        sink_check: run the adaptive sink check on single-frame rows (spec I.1). The prefill turns
            it off: its n steps rewrite the same positions, and the reference's prefill never runs it.
        evict: False for the non-last steps of a step-by-step frame: a full cache writes at the
            eviction queue's head without advancing it (stages.kv_cache, "Step by step").
        capture: the shard may replay this step from a CUDA graph (when it has a graph runner).
            Step-by-step calls set False (a rare mode, n differently keyed calls per chunk). The
            prefill keeps it: its graph is replayed by the next stream that opens on its state
            (module docstring, "Spare states").
    """

    segments: list[Segment]
    noisy_latents_BCFHW: torch.Tensor
    timesteps_B: torch.Tensor
    start_frames_B: torch.Tensor
    hidden_BLD: torch.Tensor | None = None
    x0_BCFHW: torch.Tensor | None = None
    sink_check: bool = True
    evict: bool = True
    capture: bool = True
    start_frames: tuple[int, ...] | None = None
    """Host copy of start_frames_B, when the sender has it: lets each shard know, without reading
    a tensor, which segments' caches are full (no attention mask needed). None = always mask."""
    full_segments: tuple[bool, ...] | None = None
    """Set by the shard from its host mirror (`DiTStreamState.advance_host_ends`), per segment."""

    @property
    def num_rows(self) -> int:
        return sum(len(slots) for _, slots in self.segments)

    @property
    def grid_fhw(self) -> tuple[int, int, int]:
        """Token grid of one row: (frames, H/2, W/2)."""
        _, _, f, h, w = self.noisy_latents_BCFHW.shape
        return f, h // 2, w // 2

    def row_slices(self) -> list[slice]:
        out, row = [], 0
        for _, slots in self.segments:
            out.append(slice(row, row + len(slots)))
            row += len(slots)
        return out


class _MicroBatchAttention:
    """`BlockAttention` over a micro-batch: routes each segment's rows to its stream's caches."""

    def __init__(self, batch: DiTMicroBatch, states: list[DiTStreamState], device: torch.device,
                 ops: BlockOps = EAGER_OPS) -> None:
        self._plan = ops.plan_cache_update
        tokens_per_frame = states[0].tokens_per_frame
        token_starts_B = batch.start_frames_B.to(device) * tokens_per_frame
        self._sink_check = batch.sink_check
        self._evict = batch.evict
        self._parts = []
        full = batch.full_segments or (False,) * len(states)
        for (_, slots), rows, state, is_full in zip(batch.segments, batch.row_slices(), states, full):
            slots_B = state.slot_index(slots, device)
            all_in_order = slots == tuple(range(state.num_slots))
            self._parts.append(
                (rows, state, slots_B, None if all_in_order else slots_B, token_starts_B[rows], is_full)
            )

    def self_attend(
        self, block_index: int, q_BLND: torch.Tensor, k_BLND: torch.Tensor, v_BLND: torch.Tensor
    ) -> torch.Tensor:
        outs = []
        for rows, state, slots_B, cache_rows_B, starts_B, is_full in self._parts:
            cache: BlockKVCache = state.kv[block_index]
            lengths_B = cache.update(
                slots_B, starts_B, k_BLND[rows], v_BLND[rows], sink_check=self._sink_check,
                evict=self._evict, all_slots=cache_rows_B is None, plan=self._plan,
            )
            outs.append(attend_kv_cache(q_BLND[rows], cache.k_RCND, cache.v_RCND,
                                        None if is_full else lengths_B, cache_rows_B))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def cross_attend(self, block_index: int, q_BLND: torch.Tensor) -> torch.Tensor:
        outs = []
        for rows, state, *_ in self._parts:
            k_1SND, v_1SND = state.cross_kv[block_index]
            outs.append(attend(q_BLND[rows], k_1SND, v_1SND))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class DiTShard:
    """A `WanDiT` (whole or a block range) plus the per-stream state of the blocks it owns.

    Args:
        model: the shard's weights (already loaded); moved to device/dtype and frozen.
        device, dtype: where and in what precision it runs (fp32 on CPU, bf16 on CUDA).
        schedule: flow-matching schedule for the x0 conversion (last shard only); default shift 8.
        cuda_graphs: replay steady-state micro-steps from CUDA graphs (stages/cuda_graphs.py); only
            takes effect on a CUDA device, and falls back to eager for good if a capture fails.
        compile_ops: run the blocks' elementwise pieces and the KV-cache bookkeeping through
            torch.compile (stages/fused.py); only takes effect on a CUDA device. None (default) =
            as cuda_graphs: the fast GPU path is both.
        spare_streams: closed streams' states kept for reuse (module docstring, "Spare states");
            0 frees every state at close.
    """

    def __init__(
        self,
        model: WanDiT,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        schedule: FlowMatchSchedule | None = None,
        cuda_graphs: bool = False,
        compile_ops: bool | None = None,
        spare_streams: int = 8,
    ) -> None:
        self.spares = SparePool(spare_streams)
        """Closed streams' states (module docstring, "Spare states")."""
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.schedule = (schedule or FlowMatchSchedule()).to(self.device)
        self._streams: dict[str, DiTStreamState] = {}
        compile_ops = cuda_graphs if compile_ops is None else compile_ops
        self.ops: BlockOps = compiled_ops() if compile_ops and self.device.type == "cuda" else EAGER_OPS
        self.model.use_ops(self.ops)
        self.graphs: ShardGraphRunner | None = None
        if cuda_graphs and self.device.type == "cuda":
            # a few keys per stream (prefill, fill phase, full cache), live streams and spares alike
            self.graphs = ShardGraphRunner(self._compute, self.device, prepare=self._prepare_capture,
                                           max_graphs=64 + 4 * spare_streams)
            self.spares.graphs = self.graphs

    @property
    def cfg(self) -> DiTConfig:
        return self.model.cfg

    @property
    def block_range(self) -> tuple[int, int]:
        return self.model.block_range

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    @property
    def stream_ids(self) -> list[str]:
        return list(self._streams)

    def state(self, stream_id: str) -> DiTStreamState:
        """The stream's state on this shard (tests and the rebalancer read it)."""
        try:
            return self._streams[stream_id]
        except KeyError:
            raise StreamNotFoundError(
                f"stream {stream_id!r} is not open on DiT shard {self.block_range}", stream_id=stream_id
            ) from None

    # ---- stream lifecycle ------------------------------------------------------------------------

    def open_stream(
        self, stream_id: str, *, num_slots: int, height: int, width: int, stream_cfg: StreamConfig
    ) -> None:
        """Allocate the stream's caches, or take a spare state of this geometry (module docstring):
        every owned block gets k/v [num_slots, cache_frames*Fp, N, 128].

        height/width are in pixels (multiples of 16): Fp = (height/16) * (width/16).
        """
        if stream_id.startswith(SPARE_PREFIX):
            raise BadRequestError(f"stream id {stream_id!r} may not start with a NUL character")
        if stream_id in self._streams:
            raise StreamExistsError(
                f"stream {stream_id!r} is already open on DiT shard {self.block_range}", stream_id=stream_id
            )
        if height % 16 or width % 16 or height < 16 or width < 16:
            raise BadRequestError(
                f"height={height}, width={width} must be positive multiples of 16", height=height, width=width
            )
        if num_slots < 1:
            raise BadRequestError(f"num_slots={num_slots} must be >= 1", num_slots=num_slots)
        self._forget_graphs(stream_id)
        policy = KVCachePolicy.from_stream_config(stream_cfg)
        grid_hw = (height // 16, width // 16)
        spare = self.spares.take(stream_id, (num_slots, grid_hw, policy, tuple(self.model.block_indices)))
        if spare is not None:
            spare.recycle(stream_id)
            self._streams[stream_id] = spare
            return
        try:
            kv = self._allocate_caches(num_slots, grid_hw, policy)
        except torch.OutOfMemoryError:
            if not self.spares:
                raise
            LOG.warning("DiT shard %s: out of memory opening %r, freeing %d spare stream states",
                        self.block_range, stream_id, len(self.spares))
            self.spares.clear()
            torch.cuda.empty_cache()
            kv = self._allocate_caches(num_slots, grid_hw, policy)
        self._streams[stream_id] = DiTStreamState(
            stream_id=stream_id,
            num_slots=num_slots,
            tokens_per_frame=grid_hw[0] * grid_hw[1],
            grid_hw=grid_hw,
            policy=policy,
            kv=kv,
        )

    def _allocate_caches(self, num_slots: int, grid_hw: tuple[int, int],
                         policy: KVCachePolicy) -> dict[int, BlockKVCache]:
        return {
            i: BlockKVCache(
                num_slots=num_slots,
                tokens_per_frame=grid_hw[0] * grid_hw[1],
                num_heads=self.cfg.num_heads,
                head_dim=self.cfg.head_dim,
                policy=policy,
                device=self.device,
                dtype=self.dtype,
            )
            for i in self.model.block_indices
        }

    @torch.no_grad()
    def set_text_context(self, stream_id: str, text_embeds_BST: torch.Tensor) -> None:
        """Embed the T5 output [1, <=512, 4096] and compute every owned block's cross-attention K/V.

        Callable again mid-stream to swap the prompt: self-attention caches are kept. A swap writes
        the new K/V into the existing tensors (same values as fresh ones), so captured CUDA graphs,
        which read those tensors by address, stay valid.
        """
        state = self.state(stream_id)
        if text_embeds_BST.dim() != 3 or text_embeds_BST.shape[0] != 1:
            raise BadRequestError(
                f"text embeddings must be [1, S, {self.cfg.text_dim}], got {tuple(text_embeds_BST.shape)}"
            )
        ctx_BSD = self.model.text_embed(text_embeds_BST)
        cross_kv = self.model.cross_kv(ctx_BSD)
        target = state.cross_kv if state.cross_kv is not None else state.recycled_cross_kv
        state.recycled_cross_kv = None
        if target is None or target.keys() != cross_kv.keys() or any(
            target[i][0].shape != k.shape or target[i][0].dtype != k.dtype for i, (k, _) in cross_kv.items()
        ):
            state.cross_kv = cross_kv
            self._forget_graphs(stream_id)
            return
        for i, (k_new, v_new) in cross_kv.items():
            k_old, v_old = target[i]
            k_old.copy_(k_new)
            v_old.copy_(v_new)
        state.cross_kv = target

    def set_num_slots(self, stream_id: str, num_slots: int) -> None:
        """Resize the stream to `num_slots` slots, every slot a copy of slot 0's caches and eviction
        queue (the reference's batch-mode restore). Used after the prefill (which writes slot 0 only)
        and when the number of denoising steps changes mid-stream; in-flight slots 1.. are dropped.
        A new slot count means new cache tensors, so the stream's CUDA graphs are dropped; an unchanged
        one (the prefill's) copies slot 0 in place and keeps them.
        """
        if self.state(stream_id).set_num_slots(num_slots):
            self._forget_graphs(stream_id)

    def close_stream(self, stream_id: str) -> None:
        """Close the stream: its state becomes a spare (module docstring) or is freed. Closing an unknown
        id raises StreamNotFoundError."""
        state = self.state(stream_id)
        del self._streams[stream_id]
        self.spares.put(stream_id, (state.num_slots, state.grid_hw, state.policy, tuple(sorted(state.kv))), state)

    def _forget_graphs(self, stream_id: str) -> None:
        if self.graphs is not None:
            self.graphs.forget(stream_id)

    # ---- the micro-step --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, batch: DiTMicroBatch) -> DiTMicroBatch:
        """Run the owned blocks for every row of `batch`; returns a new message for the next shard
        (hidden_BLD set) or, on the last shard, the result (x0_BCFHW set, hidden_BLD None).

        With a graph runner, a step whose key (streams, slots, shapes) was seen before is replayed
        from a CUDA graph; the result is the same computation on the same state.
        """
        states = self._check(batch)
        if batch.start_frames is not None:
            num_frames = batch.grid_fhw[0]
            full = tuple(
                state.advance_host_ends(slots, batch.start_frames[rows], num_frames)
                for (_, slots), rows, state in zip(batch.segments, batch.row_slices(), states)
            )
            batch = dataclasses.replace(batch, full_segments=full)
        if self.graphs is not None and batch.capture:
            out = self._replay_per_stream(batch, states)
        else:
            out = self._compute(batch, states)
        if not self.is_last:
            return dataclasses.replace(batch, hidden_BLD=out, x0_BCFHW=None)
        return dataclasses.replace(batch, hidden_BLD=None, x0_BCFHW=out)

    def _replay_per_stream(self, batch: DiTMicroBatch, states: list[DiTStreamState]) -> torch.Tensor:
        """A graph-backed step, one stream (segment) at a time, outputs concatenated in row order.

        A graph is keyed by the streams it names, so a graph over a multi-stream batch would be
        captured anew for every combination of streams that happen to be ready together (a capture
        each tick under churn). One stream per replay keys graphs by stream alone: each stream is
        captured once, on its second step. Batching streams buys little here anyway: every segment
        attends to its own caches separately, and a 1.3B row at 480x832 already fills the GPU's
        matmuls (BENCHMARKS.md: 8 streams in one forward take 8x one stream's time).
        """
        if len(batch.segments) == 1:
            out = self.graphs.run(batch, states)
            return self._compute(batch, states) if out is None else out
        outs = []
        for i, ((stream_id, slots), rows, state) in enumerate(zip(batch.segments, batch.row_slices(), states)):
            part = dataclasses.replace(
                batch,
                segments=[(stream_id, slots)],
                noisy_latents_BCFHW=batch.noisy_latents_BCFHW[rows],
                timesteps_B=batch.timesteps_B[rows],
                start_frames_B=batch.start_frames_B[rows],
                hidden_BLD=None if batch.hidden_BLD is None else batch.hidden_BLD[rows],
                start_frames=None if batch.start_frames is None else batch.start_frames[rows],
                full_segments=None if batch.full_segments is None else batch.full_segments[i:i + 1],
            )
            out = self.graphs.run(part, [state])
            outs.append(self._compute(part, [state]) if out is None else out)
        return torch.cat(outs)

    def _check(self, batch: DiTMicroBatch) -> list[DiTStreamState]:
        """The batch's stream states, after the host-side checks (no tensor values are read)."""
        states = [self.state(stream_id) for stream_id, _ in batch.segments]
        _, hp, wp = batch.grid_fhw
        for state in states:
            if state.grid_hw != (hp, wp):
                raise BadRequestError(
                    f"stream {state.stream_id!r} has a {state.grid_hw} token grid, "
                    f"the batch {(hp, wp)}: batch only streams of one resolution"
                )
            if state.cross_kv is None:
                raise BadRequestError(
                    f"stream {state.stream_id!r} has no prompt: call set_text_context first"
                )
        if len(states) > 1 and len({s.tokens_per_frame for s in states}) != 1:
            raise BadRequestError("all streams of a micro-batch need the same resolution")
        if batch.timesteps_B.shape[0] != batch.num_rows or batch.start_frames_B.shape[0] != batch.num_rows:
            raise BadRequestError(
                f"segments describe {batch.num_rows} rows, timesteps/starts have "
                f"{batch.timesteps_B.shape[0]}/{batch.start_frames_B.shape[0]}"
            )
        if not self.is_first and batch.hidden_BLD is None:
            raise BadRequestError(f"shard {self.block_range} needs hidden_BLD from the previous shard")
        return states

    def _prepare_capture(self, batch: DiTMicroBatch, states: list[DiTStreamState]) -> None:
        """Before a capture: the segments' slot indices, which `_compute` would upload on first use."""
        for (_, slots), state in zip(batch.segments, states):
            state.slot_index(slots, self.device)

    def _compute(self, batch: DiTMicroBatch, states: list[DiTStreamState]) -> torch.Tensor:
        """The device work of one micro-step: hidden_BLD (not last) or x0_BCFHW (last shard).

        Capturable by a CUDA graph: every per-step value arrives as a device tensor of the batch,
        cache write positions and valid lengths are computed on the device, and no Python branch
        reads a tensor value (the branches depend only on shapes, segments and flags).
        """
        f, hp, wp = batch.grid_fhw
        if self.is_first:
            x_BLD = self.model.embed(batch.noisy_latents_BCFHW.to(self.device, self.dtype))
        else:
            x_BLD = batch.hidden_BLD.to(self.device, self.dtype)
        timesteps_B = batch.timesteps_B.to(self.device)
        e_BFD, e0_BF6D = self.model.time_embeddings(timesteps_B[:, None].expand(-1, f))
        rope = self.model.rope_tables(self.device).angles(batch.start_frames_B.to(self.device), f, hp, wp)
        attn = _MicroBatchAttention(batch, states, self.device, self.ops)
        x_BLD = self.model.run_blocks(x_BLD, e0_BF6D, rope, attn)

        if not self.is_last:
            return x_BLD
        flow_BCFHW = self.model.head_out(x_BLD, e_BFD, (f, hp, wp))
        x_t = batch.noisy_latents_BCFHW.to(self.device)
        return self.schedule.flow_to_x0(flow_BCFHW, x_t, timesteps_B)


def split_blocks(num_layers: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous near-equal block ranges, the remainder going to the first shards (spec D).

    Example: 30 blocks over 4 shards -> [(0, 8), (8, 16), (16, 23), (23, 30)].
    """
    if not 1 <= num_shards <= num_layers:
        raise ValueError(f"num_shards={num_shards} must be in 1..num_layers={num_layers}")
    base, extra = divmod(num_layers, num_shards)
    ranges, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges
