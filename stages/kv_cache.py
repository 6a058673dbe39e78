"""Per-stream DiT state: each block's rolling self-attention KV cache with sink frames, plus the
cross-attention K/V of the stream's prompt. Never stored on an nn.Module.

Shape legend:
    R  slots of the stream (one per denoising step in flight, n)
    B  rows of one call (a subset of the R slots, usually all of them in order)
    C  cache capacity in tokens = num_kv_cache_frames * Fp
    Fp tokens per latent frame (the spec's F; 1560 at 480x832)
    M  new tokens of one call (num_frames * Fp)
    N  heads        D  head dim (128)        Q  eviction-queue capacity
    S  text tokens (512)

The state machine of one block's cache, per slot (spec C "KV cache" and I.1-I.3), for a call whose
queries start at token c_start (a multiple of Fp) and span M tokens, c_end = c_start + M:

1. Adaptive sink check, only when the call has exactly one frame (M <= Fp), before the write:
   mean K of each sink frame (rotated keys) vs the new frame's mean K, cosine similarity; the same for
   V; avg = (cos_k + cos_v)/2; if min(avg) < threshold, push (argmin+1)*Fp to the FRONT of the queue.
   A never-written sink frame is all zeros: cosine 0, so the check fires while the sinks fill.
2. Full phase (c_end > C or local_end >= C): pop the queue head tau, write [tau-M, tau), re-append tau
   if tau > sink_tokens (so rolling frames form a ring and a sink refresh is consumed once);
   local_end stays C.
3. Fill phase (otherwise): local_end += c_end - global_end, write [local_end-M, local_end); append
   c_end + M to the queue if it lies in (sink_tokens, C] and differs from the queue's last entry.
4. global_end = c_end; attention reads cache[:local_end] of the slot (non-causal).

Step by step (the reference's "without stream batch", spec C): a frame's n steps are n calls at the
same c_start on one slot. The fill phase already rewrites the same positions (c_end == global_end
adds nothing to local_end, and the queue's last entry blocks a duplicate append). In the full phase
only the LAST step may advance the eviction index: the earlier ones pass `evict=False` and write
[tau-M, tau) at the queue head tau without popping it, so all n steps land where the last one does.

Worked example (Fp = 16, C = 96, 3 sink frames -> sink_tokens = 48), the reference's 2-frame prefill
at c_start = 0 (M = 32): fill, local_end = 0 + 32 - 0 = 32, writes [0, 32), queue gets 32 + 32 = 64 ->
[64]. The first stream call of that slot at c_start = 32 (M = 16): sink frame 2 is empty so the check
fires with argmin 2 -> queue [48, 64]; fill, local_end = 32 + 48 - 32 = 48, writes [32, 48), 64 is
already last -> [48, 64]. Once local_end reaches 96, every call pops: 48 (sink refresh, consumed),
then 64 (re-appended), 80, 96, 64, ...

Every step is written as batched tensor ops over the rows (no per-slot Python loop, no host sync);
the queue is a fixed-capacity ring per slot (Q = 64 by default: the fill phase may stack a few
front inserts, the full phase keeps the length constant). `queue_lists()` reads it back for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from stages.config import StreamConfig


@dataclass(frozen=True)
class KVCachePolicy:
    """Geometry and sink policy of the rolling cache, taken from a StreamConfig."""

    num_cache_frames: int = 6
    """Latent frames each slot's cache holds (num_kv_cache)."""
    num_sink_frames: int = 3
    """Leading cache frames used as attention sinks."""
    sink_threshold: float = 0.2
    """Refresh a sink when avg cosine similarity < this; -1 turns the check off (reference: > -1 is on)."""
    queue_capacity: int = 64
    """Entries of each slot's eviction ring; more than enough for the fill-phase pile-ups."""

    @classmethod
    def from_stream_config(cls, cfg: StreamConfig) -> KVCachePolicy:
        return cls(
            num_cache_frames=cfg.num_kv_cache_frames,
            num_sink_frames=cfg.num_sink_frames,
            sink_threshold=cfg.adapt_sink_threshold,
        )

    @property
    def sink_check_enabled(self) -> bool:
        return self.num_sink_frames > 0 and self.sink_threshold > -1


class BlockKVCache:
    """One block's self-attention cache of one stream, for R slots.

    Tensors: k_RCND, v_RCND (keys stored rotated), global_end_R, local_end_R (int64 token indices),
    the eviction ring queue_RQ with its head_R / len_R, and the running per-frame means of the sink
    frames sink_k_RSX / sink_v_RSX (X = N*D; what the adaptive sink check compares against, kept up
    to date on every write that lands in a sink frame, so the check never re-reads the cache). All on
    one device.
    """

    TENSOR_FIELDS = (
        "k_RCND", "v_RCND", "global_end_R", "local_end_R", "queue_RQ", "queue_head_R", "queue_len_R",
        "sink_k_RSX", "sink_v_RSX",
    )
    """Every tensor of the cache (copied by `replicated_from_slot0`, moved whole by a block rebalance)."""

    def __init__(
        self,
        *,
        num_slots: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        policy: KVCachePolicy,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.tokens_per_frame = tokens_per_frame
        self.policy = policy
        capacity = policy.num_cache_frames * tokens_per_frame
        shape = (num_slots, capacity, num_heads, head_dim)
        self.k_RCND = torch.zeros(shape, device=device, dtype=dtype)
        self.v_RCND = torch.zeros(shape, device=device, dtype=dtype)
        long = dict(device=device, dtype=torch.long)
        self.global_end_R = torch.zeros(num_slots, **long)
        self.local_end_R = torch.zeros(num_slots, **long)
        self.queue_RQ = torch.zeros(num_slots, policy.queue_capacity, **long)
        self.queue_head_R = torch.zeros(num_slots, **long)
        self.queue_len_R = torch.zeros(num_slots, **long)
        sinks = (num_slots, policy.num_sink_frames, num_heads * head_dim)
        self.sink_k_RSX = torch.zeros(sinks, device=device, dtype=dtype)  # mean of an all-zero frame
        self.sink_v_RSX = torch.zeros(sinks, device=device, dtype=dtype)

    @property
    def num_slots(self) -> int:
        return self.k_RCND.shape[0]

    @property
    def capacity(self) -> int:
        return self.k_RCND.shape[1]

    def update(
        self,
        slots_B: torch.Tensor,
        token_starts_B: torch.Tensor,
        k_BMND: torch.Tensor,
        v_BMND: torch.Tensor,
        *,
        sink_check: bool = True,
        evict: bool = True,
        all_slots: bool = False,
        plan: Callable[..., tuple[torch.Tensor, ...]] | None = None,
    ) -> torch.Tensor:
        """Run one call of the state machine for rows `slots_B` and write their new K/V.

        Args:
            slots_B: int64 slot of each row (distinct).
            token_starts_B: int64 c_start of each row (a multiple of tokens_per_frame).
            k_BMND: the new rotated keys; v_BMND: the new values.
            sink_check: False skips step 1 even for a single-frame call (Weir's 1-latent prefill).
            evict: False (a non-last step of a step-by-step frame) peeks the queue head in the full
                phase instead of popping it (module docstring).
            all_slots: the rows are exactly slots 0..R-1 in order (then state is written back whole).
            plan: `plan_cache_update` or a compiled copy of it (stages.fused); None = the eager one.

        Returns:
            lengths_B: valid cache tokens of each row after the write (what attention reads).
        """
        fp = self.tokens_per_frame
        b, m = k_BMND.shape[:2]
        k_BMND = k_BMND.to(self.k_RCND.dtype)
        v_BMND = v_BMND.to(self.v_RCND.dtype)
        state = (self.global_end_R, self.local_end_R, self.queue_RQ, self.queue_head_R, self.queue_len_R,
                 self.sink_k_RSX, self.sink_v_RSX)
        if not all_slots:
            state = tuple(t[slots_B] for t in state)
        check = sink_check and self.policy.sink_check_enabled and m <= fp
        (global_B, local_B, queue_BQ, head_B, len_B, sink_k_BSX, sink_v_BSX, flat_BM, _) = (
            plan or plan_cache_update
        )(
            *state, token_starts_B, k_BMND=k_BMND, v_BMND=v_BMND, slots_B=slots_B,
            tokens_per_frame=fp, capacity=self.capacity, num_sink_frames=self.policy.num_sink_frames,
            sink_threshold=self.policy.sink_threshold, sink_check=check, evict=evict,
        )
        rows = flat_BM.flatten()  # the new K/V: row b's tokens go to [write_start, write_start + m) of its slot
        _token_rows(self.k_RCND).index_copy_(0, rows, _token_rows(k_BMND.contiguous()))
        _token_rows(self.v_RCND).index_copy_(0, rows, _token_rows(v_BMND.contiguous()))
        new_state = (global_B, local_B, queue_BQ, head_B, len_B, sink_k_BSX, sink_v_BSX)
        for name, value in zip(self.TENSOR_FIELDS[2:], new_state):
            if all_slots:
                getattr(self, name).copy_(value)
            else:
                getattr(self, name)[slots_B] = value
        return local_B

    def reset_(self) -> None:
        """Back to a fresh cache's state (all zeros), in place: the tensors keep their addresses."""
        for name in self.TENSOR_FIELDS:
            getattr(self, name).zero_()

    def copy_slot0_(self) -> None:
        """Every slot a copy of slot 0 (K/V, ends and eviction queue), in place."""
        if self.num_slots > 1:
            for name in self.TENSOR_FIELDS:
                t = getattr(self, name)
                t[1:].copy_(t[:1].expand_as(t[1:]))

    def replicated_from_slot0(self, num_slots: int) -> BlockKVCache:
        """A cache of `num_slots` slots, each a copy of slot 0 (K/V, ends and eviction queue)."""
        out = BlockKVCache.__new__(BlockKVCache)
        out.tokens_per_frame = self.tokens_per_frame
        out.policy = self.policy
        for name in self.TENSOR_FIELDS:
            t = getattr(self, name)
            setattr(out, name, t[:1].repeat(num_slots, *([1] * (t.dim() - 1))))
        return out

    def queue_lists(self) -> list[list[int]]:
        """Each slot's eviction queue, front first, as Python lists (host sync: tests/debug only)."""
        q, head, size = self.queue_RQ.tolist(), self.queue_head_R.tolist(), self.queue_len_R.tolist()
        cap = self.policy.queue_capacity
        return [[q[r][(head[r] + i) % cap] for i in range(size[r])] for r in range(len(q))]


def _token_rows(x_BTND: torch.Tensor) -> torch.Tensor:
    """[B*T, N*D] rows of a contiguous cache or K/V tensor, as 8-byte words where the row's bytes
    allow: an index copy moves one element at a time, so bf16 elements would take 4x the steps."""
    rows = x_BTND.view(-1, x_BTND.shape[2] * x_BTND.shape[3])
    return rows.view(torch.int64) if rows.shape[1] * rows.element_size() % 8 == 0 else rows


def plan_cache_update(
    *state: torch.Tensor,
    k_BMND: torch.Tensor,
    v_BMND: torch.Tensor,
    slots_B: torch.Tensor,
    tokens_per_frame: int,
    capacity: int,
    **policy,
) -> tuple[torch.Tensor, ...]:
    """Everything of one cache write but the K/V copy itself: the new frames' mean K and V, then
    `plan_cache_write` on `state` (its first eight arguments: the rows' cache state and token starts)
    with `policy` (its sink and eviction flags). Returns its outputs with the write start replaced by
    the flat cache rows [B, M] (slot * C + token) that the rows' new K/V go to."""
    b, m = k_BMND.shape[:2]
    fp = tokens_per_frame
    frame_k_BFX = k_BMND.reshape(b, m // fp, fp, -1).mean(2)
    frame_v_BFX = v_BMND.reshape(b, m // fp, fp, -1).mean(2)
    *new_state, write_start_B, fire_B = plan_cache_write(
        *state, frame_k_BFX, frame_v_BFX, tokens_per_frame=fp, capacity=capacity, **policy
    )
    flat_BM = (slots_B * capacity + write_start_B)[:, None] + torch.arange(m, device=slots_B.device)
    return (*new_state, flat_BM, fire_B)


def plan_cache_write(
    global_B: torch.Tensor,
    local_B: torch.Tensor,
    queue_BQ: torch.Tensor,
    head_B: torch.Tensor,
    len_B: torch.Tensor,
    sink_k_BSX: torch.Tensor,
    sink_v_BSX: torch.Tensor,
    token_starts_B: torch.Tensor,
    frame_k_BFX: torch.Tensor,
    frame_v_BFX: torch.Tensor,
    *,
    tokens_per_frame: int,
    capacity: int,
    num_sink_frames: int,
    sink_threshold: float,
    sink_check: bool,
    evict: bool,
) -> tuple[torch.Tensor, ...]:
    """Steps 1-4 of the module docstring for B rows, as a pure function of small tensors (no K/V):
    returns the rows' new (global_end, local_end, queue, head, len, sink_k, sink_v), the token
    where each row's write starts, and whether each row's sink check fired. Pure, so torch.compile
    can fuse its few dozen tiny ops.

    frame_k_BFX / frame_v_BFX are the per-frame means of the new keys / values (X = N*D). A write
    covers F whole frames starting at a frame boundary, so the sink frames it lands in take those
    means; the check compares the sinks' means with the new frame's (spec I.1).
    """
    fp, cap, num_q = tokens_per_frame, capacity, queue_BQ.shape[1]
    sink_tokens = num_sink_frames * fp
    b, num_frames = frame_k_BFX.shape[:2]
    m = num_frames * fp
    rows_B = torch.arange(b, device=global_B.device)
    queue_BQ = queue_BQ.clone()
    c_end_B = token_starts_B + m
    fire_B = torch.zeros_like(global_B, dtype=torch.bool)

    # 1. adaptive sink check (single-frame calls only), pushes to the front of the queue
    if sink_check and num_sink_frames > 0:
        cos_k_BS = torch.cosine_similarity(sink_k_BSX, frame_k_BFX, dim=-1)
        cos_v_BS = torch.cosine_similarity(sink_v_BSX, frame_v_BFX, dim=-1)
        avg_BS = (cos_k_BS + cos_v_BS) / 2
        fire_B = avg_BS.min(dim=-1).values < sink_threshold
        target_B = (avg_BS.argmin(dim=-1) + 1) * fp
        head_B = torch.where(fire_B, (head_B - 1) % num_q, head_B)
        queue_BQ[rows_B, head_B] = torch.where(fire_B, target_B, queue_BQ[rows_B, head_B])
        len_B = len_B + fire_B.long()

    # 2. full phase: pop the head, re-append it if it is a rolling (non-sink) frame end
    full_B = (c_end_B > cap) | (local_B >= cap)
    popped_B = queue_BQ[rows_B, head_B]
    pop_B = full_B if evict else torch.zeros_like(full_B)
    head_B = torch.where(pop_B, (head_B + 1) % num_q, head_B)
    len_B = len_B - pop_B.long()
    reappend_B = pop_B & (popped_B > sink_tokens)
    tail_B = (head_B + len_B) % num_q
    queue_BQ[rows_B, tail_B] = torch.where(reappend_B, popped_B, queue_BQ[rows_B, tail_B])
    len_B = len_B + reappend_B.long()

    # 3. fill phase: advance local_end, append the end of the next frame-sized span
    fill_local_B = local_B + c_end_B - global_B
    rolling_B = c_end_B + m
    last_B = queue_BQ[rows_B, (head_B + len_B - 1) % num_q]
    append_B = (
        ~full_B & (rolling_B > sink_tokens) & (rolling_B <= cap) & ((len_B == 0) | (last_B != rolling_B))
    )
    tail_B = (head_B + len_B) % num_q
    queue_BQ[rows_B, tail_B] = torch.where(append_B, rolling_B, queue_BQ[rows_B, tail_B])
    len_B = len_B + append_B.long()

    # 4. where the write goes, and the sink frames it lands in
    new_local_B = torch.where(full_B, torch.full_like(local_B, cap), fill_local_B)
    write_start_B = torch.where(full_B, popped_B, fill_local_B) - m
    if num_sink_frames > 0:
        frame_BS = torch.arange(num_sink_frames, device=global_B.device)[None, :] - write_start_B[:, None] // fp
        lands_BS1 = ((frame_BS >= 0) & (frame_BS < num_frames))[:, :, None]
        pick_BS = frame_BS.clamp(0, num_frames - 1)
        sink_k_BSX = torch.where(lands_BS1, frame_k_BFX[rows_B[:, None], pick_BS], sink_k_BSX)
        sink_v_BSX = torch.where(lands_BS1, frame_v_BFX[rows_B[:, None], pick_BS], sink_v_BSX)
    return c_end_B, new_local_B, queue_BQ, head_B, len_B, sink_k_BSX, sink_v_BSX, write_start_B, fire_B


def upload_long(values, device: torch.device | str) -> torch.Tensor:
    """int64 tensor of `values` on `device` without a host sync: on CUDA it goes through pinned
    memory with a non-blocking copy (the caching host allocator keeps the pinned block until the
    copy is done); elsewhere it is a plain torch.tensor.
    """
    device = torch.device(device)
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class DiTStreamState:
    """Everything one stream keeps on one DiT shard, for the blocks the shard owns.

    `kv[i]` is block i's self-attention cache (global block index); `cross_kv[i]` the (k, v) of the
    stream's prompt for block i, each [1, S, N, D], shared by every slot (None until a prompt is set).
    """

    stream_id: str
    num_slots: int
    tokens_per_frame: int
    grid_hw: tuple[int, int]
    """Token grid (height, width) of one latent frame: latent (h/2, w/2)."""
    policy: KVCachePolicy
    kv: dict[int, BlockKVCache] = field(default_factory=dict)
    cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    host_local_end: list[int] = field(default_factory=list)
    """Host mirror of every block's local_end per slot (all blocks see the same calls): see `advance_host_ends`."""
    host_global_end: list[int] = field(default_factory=list)
    recycled_cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """A recycled state's previous prompt K/V tensors, refilled in place by the next prompt (`recycle`)."""
    _slot_index_cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def advance_host_ends(self, slots: tuple[int, ...], start_frames: tuple[int, ...], num_frames: int) -> bool:
        """Mirror one call's local_end bookkeeping on the host (phases 2-4 of the module docstring) and
        say whether every row's cache is full after it: then attention reads the whole cache and needs
        no length mask, which keeps it on the fast attention kernels.

        local_end depends only on each call's token span, never on tensor values (the sink check moves
        queue entries, not local_end), so the mirror is exact. Full is absorbing: once local_end is the
        capacity, every later call is in the full phase.

        Example (Fp = 16, C = 96): after a 1-frame prefill (local_end 16) the stream calls at frames
        1, 2, 3, 4, 5 reach 32, 48, 64, 80, 96: the fifth call and every one after it are full.
        """
        fp = self.tokens_per_frame
        cap = self.policy.num_cache_frames * fp
        if len(self.host_local_end) != self.num_slots:
            self.host_local_end = [0] * self.num_slots
            self.host_global_end = [0] * self.num_slots
        all_full = True
        for slot, start in zip(slots, start_frames):
            c_end = (start + num_frames) * fp
            local, seen = self.host_local_end[slot], self.host_global_end[slot]
            local = cap if (c_end > cap or local >= cap) else local + c_end - seen
            self.host_local_end[slot], self.host_global_end[slot] = local, c_end
            all_full = all_full and local >= cap
        return all_full

    def slot_index(self, slots: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """int64 tensor of slot indices on `device`, memoised per tuple (one upload per pattern)."""
        index = self._slot_index_cache.get(slots)
        if index is None:
            if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
                # the upload would be captured reading a temporary pinned buffer that the host allocator
                # hands out again: later replays would read whatever is there then
                raise RuntimeError(f"slot index {slots} first needed inside a CUDA graph capture; build it "
                                   "before capturing (DiTShard._prepare_capture)")
            if len(set(slots)) != len(slots) or not all(0 <= s < self.num_slots for s in slots):
                raise ValueError(f"slots {slots} must be distinct and in [0, {self.num_slots})")
            index = upload_long(slots, device)
            self._slot_index_cache[slots] = index
        return index

    def recycle(self, stream_id: str) -> None:
        """Make this state a new stream's, in place: every cache as freshly allocated (zeros), no prompt
        yet. Tensor addresses are kept, so CUDA graphs captured on it stay valid for the new stream
        (stages.dit_stage, "Spare states"); the prompt K/V tensors wait in `recycled_cross_kv` to be
        overwritten by the new stream's prompt."""
        for cache in self.kv.values():
            cache.reset_()
        self.stream_id = stream_id
        self.host_local_end, self.host_global_end = [], []
        if self.cross_kv is not None:
            self.recycled_cross_kv, self.cross_kv = self.cross_kv, None

    def set_num_slots(self, num_slots: int) -> bool:
        """Every block's cache `num_slots` slots, each a copy of slot 0 (K/V, ends, eviction queue).
        Returns whether the tensors were replaced: an unchanged count copies slot 0 in place."""
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        if self.host_local_end:
            self.host_local_end = [self.host_local_end[0]] * num_slots
            self.host_global_end = [self.host_global_end[0]] * num_slots
        if num_slots == self.num_slots:
            for cache in self.kv.values():
                cache.copy_slot0_()
            return False
        self.kv = {i: cache.replicated_from_slot0(num_slots) for i, cache in self.kv.items()}
        self.num_slots = num_slots
        self._slot_index_cache.clear()
        return True
