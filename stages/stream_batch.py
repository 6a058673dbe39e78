"""The latent-space stream-batch loop (spec C.1-C.3): prefill, then one DiT micro-step per chunk.

Shape legend:
    n  denoising steps = slots of a stream        C  latent channels (16)
    F  latent frames (1 per chunk; 1 or 2 in the prefill)      H, W  latent height / width
    B  rows of a shared forward (all streams of a step)

Each stream keeps n slots in flight. Slot i holds a latent at noise level t_i (slot 0 the newest
chunk at the motion controller's `current_step`, slot n-1 the oldest, at t_{n-1}). One step:

    1. shift the buffer and the start positions down one slot; slot 0 <- the new noisy latent at the
       stream's next frame position (after the RoPE reset: frame >= 50 jumps back to frame 5);
    2. one DiT forward over all slots (each slot attends to its own KV cache);
    3. re-noise slots 0..n-2 to t_{i+1} with fresh noise; slot n-1 now holds a clean x0,
       emitted if it came from a real chunk.

So a chunk leaves n-1 steps after it arrives. Worked example, n = 2, steps (700, 500):
    step 1: slots [A@700, zeros@500] -> emits nothing (slot 1 was warm-up zeros)
    step 2: slots [B@cur, A@500]     -> emits x0(A)
    drain (no input): slots [-, B@500] -> emits x0(B); slot 0 is not forwarded.

Warm-up: after the prefill the buffer is zeros and every slot sits at the prefill's next position;
like the reference, those zero rows are forwarded (writing K/V into slots 1.. caches) but never
emitted. `forward_warmup_rows=False` skips them instead (not the reference's behaviour).

Ring of W chains (spec D, "Resulting schedule"; `chains=W`, default 1 = the single chain above).
The stream keeps W interleaved stream-batch chains, each with its own n-slot buffer, start positions
and slot statuses, initialised like the single chain after the prefill (zeros, warm-up). Tick k (counted
from the prefill or the last steps change) runs on chain k mod W: it shifts that chain's buffer, which
the chain's previous tick, k - W, left. Everything else is the stream's, in tick order: the frame
positions (tick k's chunk gets the next one), slot 0's current_step, the noise draws, and the slots' KV
caches (slot i's cache is written by tick k with the chunk that entered at tick k - i*W). So chunk k
leaves at tick k + (n-1)*W; the first (n-1)*W ticks (each chain's first n-1) are warm-up; a drain needs
(n-1)*W ticks; and the output keeps input order (the exit tick grows with k). Worked example, W = 2,
n = 2, steps (700, 500), chunk k = the k-th chunk after the prefill:
    tick 0, chain 0: [A@700, zeros@500] -> nothing        tick 1, chain 1: [B@700, zeros@500] -> nothing
    tick 2, chain 0: [C@cur, A@500]     -> x0(A)          tick 3, chain 1: [D@cur, B@500]     -> x0(B)
    drain:  tick 4, chain 0: [-, C@500] -> x0(C)          tick 5, chain 1: [-, D@500]         -> x0(D)
Why: a tick's result is needed only W ticks later, so a pipeline of W stages can hold W ticks of ONE
stream at once (cluster.graph); a chunk then spends n ticks of W stages each, n*W stage times, in the
chain, as in the reference. At n = 1 no tick reads another's buffer and every W gives the same frames.
(The reference starts chains 1.. from chain 0's buffer before any result is back and discards that
"warm-up garbage"; here every chain warms up from zeros, as the single chain does.)

Step by step (the reference's "without stream batch", spec C; `step_through`): batch 1 on slot 0,
all n steps back to back on one chunk at the stream's next frame position (slot 0's timestep is the
motion controller's current_step), re-noised between steps, its x0 returned at once. Each step
rewrites the same cache positions; only the last advances the eviction index (stages.kv_cache). The
stream batch must be drained before (no chunk in flight); returning to it, `set_num_steps` rebuilds
the n slots from slot 0 and restarts the warm-up.

Noise: each stream draws from its own source, by default a torch.Generator seeded per stream.
Draw order (it matches the reference's, so a source built on the same seed reproduces it): in the
prefill, one draw of [F, C, H, W] between consecutive steps; in a step, one draw of [1, C, H, W] per
re-noised slot 0..n-2 in slot order. Draws are frame-major ([.., F, C, H, W]) then moved to BCFHW.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stages.config import StreamConfig
from stages.dit_stage import DiTMicroBatch, DiTShard
from stages.errors import BadRequestError, StreamExistsError, StreamNotFoundError
from stages.flow_match import FlowMatchSchedule, denoising_steps
from stages.kv_cache import upload_long
from stages.prompt_blend import PromptBlend

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]
"""Returns standard normal noise of the given (frame-major) shape on the stream's device and dtype."""


class GeneratorNoise:
    """Standard normal noise from a private torch.Generator seeded once per stream."""

    def __init__(self, seed: int, *, device: torch.device | str, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)


class SlotStatus(enum.Enum):
    EMPTY = 0
    """Nothing in flight (after a drain tick): not forwarded."""
    WARMUP = 1
    """Zeros after a (re)start: forwarded (reference behaviour) but never emitted."""
    FRAME = 2
    """A real chunk: emitted when it reaches slot n-1."""


MAX_CHAINS = 16
"""Most interleaved stream-batch chains of one stream (one per pipeline stage at most is useful)."""


def check_chains(chains: int) -> None:
    """BadRequestError unless 1 <= chains <= MAX_CHAINS."""
    if not 1 <= chains <= MAX_CHAINS:
        raise BadRequestError(f"chains={chains} must be in 1..{MAX_CHAINS}", field="chains")


@dataclass
class _Chain:
    """One stream-batch chain: its n-slot buffer, the slots' frame positions and statuses."""

    buffer_BCFHW: torch.Tensor
    start_frames: list[int]
    status: list[SlotStatus]


class _ChainField:
    """An attribute of StreamBatchState that reads and writes the current tick's chain's field."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, state, owner: type | None = None):
        if state is None:
            return self
        return getattr(state._chains[state.chain], self.name)

    def __set__(self, state, value) -> None:
        setattr(state._chains[state.chain], self.name, value)


@dataclass
class StreamTick:
    """What one stream contributes to a shared forward."""

    stream_id: str
    slots: tuple[int, ...]
    noisy_latents_BCFHW: torch.Tensor
    timesteps: list[int]
    start_frames: list[int]


class StreamBatchState:
    """Per-stream stream-batch buffer: latents, positions, timesteps and counters of the n slots.

    Args:
        num_steps: n; the timesteps are the first n of `stream_cfg.step_list`.
        latent_hw: latent (H, W) = pixels / 8.
        noise: the stream's noise source.
        chains: W interleaved chains (module docstring, "Ring"); `buffer_BCFHW`, `start_frames` and
            `status` are those of the chain of the current tick (chain 0 before the first).
    """

    def __init__(
        self,
        stream_id: str,
        *,
        stream_cfg: StreamConfig,
        num_steps: int,
        latent_hw: tuple[int, int],
        noise: NoiseSource,
        schedule: FlowMatchSchedule,
        device: torch.device,
        dtype: torch.dtype,
        in_channels: int = 16,
        forward_warmup_rows: bool = True,
        chains: int = 1,
    ) -> None:
        check_chains(chains)
        self.stream_id = stream_id
        self.num_chains = chains
        self.stream_cfg = stream_cfg
        self.timesteps = denoising_steps(stream_cfg.step_list, num_steps)
        self.latent_hw = latent_hw
        self.noise = noise
        self.schedule = schedule
        self.device = device
        self.dtype = dtype
        self.in_channels = in_channels
        self.forward_warmup_rows = forward_warmup_rows
        self.current_step = self.timesteps[0]
        """Slot 0's timestep; a step with current_step=None reuses the last one (the reference aliases it)."""
        self.next_frame: int | None = None
        """Latent-frame position of the next chunk; None until the prefill ran."""
        self.processed = 0
        self._timesteps_renoise = upload_long(self.timesteps[1:], device)
        self.reset(next_frame=None)

    buffer_BCFHW = _ChainField()
    """The current chain's latents [n, C, 1, H, W], slot 0 the newest."""
    start_frames = _ChainField()
    """The current chain's latent-frame position of each slot."""
    status = _ChainField()
    """The current chain's SlotStatus of each slot."""

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def next_chain(self) -> int:
        """The chain the next tick runs on: ticks since the reset, mod W."""
        return self.ticks % self.num_chains

    def reset(self, next_frame: int | None) -> None:
        """Zero every chain's buffer and restart the warm-up, all slots at `next_frame` (spec C.2)."""
        n = self.num_steps
        h, w = self.latent_hw
        warm = SlotStatus.WARMUP if self.forward_warmup_rows else SlotStatus.EMPTY
        self._chains = [
            _Chain(torch.zeros(n, self.in_channels, 1, h, w, device=self.device, dtype=self.dtype),
                   [next_frame or 0] * n, [warm] * n)
            for _ in range(self.num_chains)
        ]
        self.chain = 0  # the chain of the current (last begun) tick
        self.ticks = 0  # ticks begun since the reset
        self.next_frame = next_frame
        self.processed = 0

    def draw_noise_BCFHW(self, num_rows: int, num_frames: int) -> torch.Tensor:
        """Noise for `num_rows` rows of `num_frames` frames, drawn frame-major, returned BCFHW."""
        h, w = self.latent_hw
        noise_BFCHW = self.noise((num_rows, num_frames, self.in_channels, h, w))
        return noise_BFCHW.transpose(1, 2)

    def begin_tick(
        self, noisy_latent_1CFHW: torch.Tensor | None, current_step: int | None,
        buffer_BCFHW: torch.Tensor | None = None,
    ) -> StreamTick | None:
        """Move on to the next chain, shift its buffer and place the new chunk (None = drain tick).
        Returns the rows to forward.

        buffer_BCFHW: that chain's buffer as its previous tick left it, when it was kept elsewhere
        (the pipeline's head gets it back from the tail through the driver); None = the one held here.
        """
        if self.next_frame is None:
            raise BadRequestError(f"stream {self.stream_id!r}: prefill before stepping")
        self.chain = self.next_chain
        self.ticks += 1
        if buffer_BCFHW is not None:
            self.buffer_BCFHW = buffer_BCFHW.to(self.device, self.dtype, copy=True)
        if current_step is not None:
            self.current_step = int(current_step)
        n = self.num_steps
        if n > 1:
            self.buffer_BCFHW = torch.roll(self.buffer_BCFHW, 1, dims=0)
        self.start_frames = [0] + self.start_frames[:-1]
        self.status = [SlotStatus.EMPTY] + self.status[:-1]
        if noisy_latent_1CFHW is not None:
            if self.next_frame >= self.stream_cfg.rope_reset_frame:
                self.next_frame = self.stream_cfg.num_kv_cache_frames - 1
            self.buffer_BCFHW[0] = noisy_latent_1CFHW.reshape(self.buffer_BCFHW.shape[1:]).to(self.dtype)
            self.start_frames[0] = self.next_frame
            self.status[0] = SlotStatus.FRAME
            self.next_frame += 1
        slots = tuple(i for i, s in enumerate(self.status) if s is not SlotStatus.EMPTY)
        if not slots:
            return None
        timesteps = [self.current_step, *self.timesteps[1:]]
        rows = upload_long(slots, self.device) if len(slots) < n else None
        latents = self.buffer_BCFHW if rows is None else self.buffer_BCFHW.index_select(0, rows)
        return StreamTick(
            stream_id=self.stream_id,
            slots=slots,
            noisy_latents_BCFHW=latents,
            timesteps=[timesteps[i] for i in slots],
            start_frames=[self.start_frames[i] for i in slots],
        )

    def end_tick(self, slots: tuple[int, ...], x0_BCFHW: torch.Tensor) -> torch.Tensor | None:
        """Store the rows' x0 in the current tick's chain, re-noise its slots 0..n-2 to t_{i+1}, and
        return slot n-1's x0 [1, C, 1, H, W] if it holds a real chunk (else None).
        """
        n = self.num_steps
        x0_BCFHW = x0_BCFHW.to(self.dtype)
        if len(slots) == n:
            self.buffer_BCFHW = x0_BCFHW.clone()
        else:
            self.buffer_BCFHW[upload_long(slots, self.device)] = x0_BCFHW
        if n > 1:
            noise_BCFHW = torch.cat([self.draw_noise_BCFHW(1, 1) for _ in range(n - 1)])
            renoised = self.schedule.add_noise(
                self.buffer_BCFHW[: n - 1], noise_BCFHW, self._timesteps_renoise
            )
            self.buffer_BCFHW[: n - 1] = renoised
        self.processed += 1
        if self.status[n - 1] is SlotStatus.FRAME:
            return self.buffer_BCFHW[n - 1 :].clone()
        return None


class LatentStreamer:
    """Drives the stream-batch loop of many streams over a chain of DiT shards in one process.

    The engine calls: open -> set_prompt_context -> prefill -> step (repeatedly, many streams at
    once) -> close. `set_num_steps` changes n mid-stream; `set_prompt_context` again changes the
    prompt, at once or blended over the next chunks (stages.prompt_blend: each new chunk, in a prefill,
    a step or a step-through, advances the stream's blend before its forward).

    Args:
        shards: the chain, covering blocks 0..L-1 contiguously (one full shard, or a split).
        forward_warmup_rows: see the module docstring (True = reference behaviour).
    """

    def __init__(self, shards: Sequence[DiTShard], *, forward_warmup_rows: bool = True) -> None:
        if not shards:
            raise ValueError("LatentStreamer needs at least one DiT shard")
        expected = 0
        for shard in shards:
            if shard.block_range[0] != expected:
                raise ValueError(f"shard ranges {[s.block_range for s in shards]} are not contiguous from 0")
            expected = shard.block_range[1]
        if expected != shards[0].cfg.num_layers:
            raise ValueError(
                f"shards cover blocks 0..{expected - 1}, the model has {shards[0].cfg.num_layers}"
            )
        self.shards = list(shards)
        self.device = shards[-1].device
        self.dtype = shards[-1].dtype
        self.schedule = shards[-1].schedule
        self.forward_warmup_rows = forward_warmup_rows
        self._streams: dict[str, StreamBatchState] = {}
        self._prompts: dict[str, PromptBlend] = {}

    def _state(self, stream_id: str) -> StreamBatchState:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open", stream_id=stream_id) from None

    def stream_state(self, stream_id: str) -> StreamBatchState:
        return self._state(stream_id)

    def open(
        self,
        stream_id: str,
        *,
        height: int,
        width: int,
        stream_cfg: StreamConfig | None = None,
        seed: int = 0,
        noise: NoiseSource | None = None,
        chains: int = 1,
    ) -> None:
        """Open a stream of height x width pixels. `noise` overrides the seeded default source;
        `chains` W > 1 runs W interleaved stream-batch chains (module docstring, "Ring")."""
        if stream_id in self._streams:
            raise StreamExistsError(f"stream {stream_id!r} is already open", stream_id=stream_id)
        stream_cfg = stream_cfg or StreamConfig()
        n = stream_cfg.num_steps
        check_chains(chains)
        for shard in self.shards:
            shard.open_stream(stream_id, num_slots=n, height=height, width=width, stream_cfg=stream_cfg)
        self._streams[stream_id] = StreamBatchState(
            stream_id,
            stream_cfg=stream_cfg,
            num_steps=n,
            latent_hw=(height // 8, width // 8),
            noise=noise or GeneratorNoise(seed, device=self.device, dtype=self.dtype),
            schedule=self.schedule,
            device=self.device,
            dtype=self.dtype,
            in_channels=self.shards[0].cfg.in_dim,
            forward_warmup_rows=self.forward_warmup_rows,
            chains=chains,
        )

    def close(self, stream_id: str) -> None:
        self._state(stream_id)
        for shard in self.shards:
            shard.close_stream(stream_id)
        del self._streams[stream_id]
        self._prompts.pop(stream_id, None)

    def set_prompt_context(
        self, stream_id: str, text_embeds_BST: torch.Tensor, *, blend_chunks: int = 0, mode: str = "linear"
    ) -> None:
        """Set or swap the prompt (T5 output [1, <=512, 4096]); self-attention caches are kept.

        blend_chunks 0 (or the stream's first prompt): at once. N > 0: the stream's next N chunks
        move from the current conditioning to this one (interpolated in `mode`), the Nth exactly here.
        """
        self._state(stream_id)
        now = self._prompts.setdefault(stream_id, PromptBlend()).retarget(text_embeds_BST, blend_chunks, mode)
        if now is not None:
            self._apply_prompt(stream_id, now)

    def prompt_context(self, stream_id: str) -> torch.Tensor | None:
        """The text embedding the stream is conditioned on now (None before its first prompt)."""
        self._state(stream_id)
        blend = self._prompts.get(stream_id)
        return None if blend is None else blend.current

    def prompt_blend_remaining(self, stream_id: str) -> int:
        """Chunks until the stream's prompt blend is complete (0: none running)."""
        self._state(stream_id)
        blend = self._prompts.get(stream_id)
        return 0 if blend is None else blend.remaining

    def _apply_prompt(self, stream_id: str, text_embeds_BST: torch.Tensor) -> None:
        for shard in self.shards:
            shard.set_text_context(stream_id, text_embeds_BST)

    def _advance_prompt(self, stream_id: str) -> None:
        """A new chunk of the stream enters the DiT: a running blend moves one chunk on."""
        blend = self._prompts.get(stream_id)
        now = None if blend is None else blend.advance()
        if now is not None:
            self._apply_prompt(stream_id, now)

    def set_num_steps(self, stream_id: str, num_steps: int) -> None:
        """Change n mid-stream: every shard replicates slot 0's caches into n slots and every chain's
        buffer restarts its warm-up at the next frame position (the next tick is chain 0's). Chunks in
        flight in slots 1.. are dropped (drain first with None ticks to keep them).
        """
        old = self._state(stream_id)
        denoising_steps(old.stream_cfg.step_list, num_steps)  # validates
        for shard in self.shards:
            shard.set_num_slots(stream_id, num_steps)
        new = StreamBatchState(
            stream_id,
            stream_cfg=old.stream_cfg,
            num_steps=num_steps,
            latent_hw=old.latent_hw,
            noise=old.noise,
            schedule=self.schedule,
            device=self.device,
            dtype=self.dtype,
            in_channels=old.in_channels,
            forward_warmup_rows=old.forward_warmup_rows,
            chains=old.num_chains,
        )
        new.reset(next_frame=old.next_frame)
        self._streams[stream_id] = new

    def run_chain(self, batch: DiTMicroBatch) -> DiTMicroBatch:
        for shard in self.shards:
            batch = shard.forward(batch)
        return batch

    def prefill(self, stream_id: str, noisy_latents_1CFHW: torch.Tensor) -> torch.Tensor:
        """Denoise the first chunk (F = 1 or 2 latent frames at positions 0..F-1) through all n steps
        on slot 0, re-noising between steps; then replicate slot 0 into the n slots and reset the
        buffer (all slots at frame F). Returns x0 [1, C, F, H, W] of the first chunk.

        F = 2 is the reference's 1+4-frame start (every step writes tokens [0, 2F), queue [4F]).
        F = 1 is Weir's frame-0-alone start: every step writes [0, F), local_end = F, and no queue
        entry (the next span's end 2F is a sink position); the sink check is skipped in the prefill
        for both (the reference's 2-frame prefill never runs it), so it first runs on the first
        stream step, where the still-empty sink frames 1 and 2 make it fire, as in the reference.
        """
        state = self._state(stream_id)
        if noisy_latents_1CFHW.dim() != 5 or noisy_latents_1CFHW.shape[0] != 1:
            raise BadRequestError(
                f"prefill latents must be [1, C, F, H, W], got {tuple(noisy_latents_1CFHW.shape)}"
            )
        num_frames = noisy_latents_1CFHW.shape[2]
        if num_frames not in (1, 2):
            raise BadRequestError(f"prefill takes 1 or 2 latent frames, got {num_frames}")
        self._advance_prompt(stream_id)
        x_1CFHW = noisy_latents_1CFHW.to(self.device, self.dtype)
        starts = torch.zeros(1, dtype=torch.long, device=self.device)
        x0_1CFHW = x_1CFHW
        for i, t in enumerate(state.timesteps):
            batch = DiTMicroBatch(
                segments=[(stream_id, (0,))],
                noisy_latents_BCFHW=x_1CFHW,
                timesteps_B=torch.full((1,), t, dtype=torch.long, device=self.device),
                start_frames_B=starts,
                sink_check=False,
                start_frames=(0,),
            )
            x0_1CFHW = self.run_chain(batch).x0_BCFHW
            if i + 1 < state.num_steps:
                next_t = torch.full((1,), state.timesteps[i + 1], dtype=torch.long, device=self.device)
                noise_1CFHW = state.draw_noise_BCFHW(1, num_frames)
                x_1CFHW = self.schedule.add_noise(x0_1CFHW, noise_1CFHW, next_t)
        for shard in self.shards:
            shard.set_num_slots(stream_id, state.num_steps)
        state.reset(next_frame=num_frames)
        return x0_1CFHW

    def step_through(
        self, stream_id: str, noisy_latent_1CFHW: torch.Tensor, current_step: int | None
    ) -> torch.Tensor:
        """Step by step (module docstring): all n steps of one chunk on slot 0, batch 1; returns its
        x0 [1, C, 1, H, W]. Noise draws: one [1, C, H, W] between consecutive steps.

        Example, n = 2, steps (700, 500), next frame 7: forward x@cur at frame 7 (cache written at the
        eviction head, not advanced), re-noise x0 to 500, forward at frame 7 again (head advanced).
        """
        state = self._state(stream_id)
        if state.next_frame is None:
            raise BadRequestError(f"stream {stream_id!r}: prefill before stepping")
        if current_step is not None:
            state.current_step = int(current_step)
        self._advance_prompt(stream_id)
        if state.next_frame >= state.stream_cfg.rope_reset_frame:
            state.next_frame = state.stream_cfg.num_kv_cache_frames - 1
        starts = upload_long([state.next_frame], self.device)
        timesteps = [state.current_step, *state.timesteps[1:]]
        x_1CFHW = noisy_latent_1CFHW.to(self.device, self.dtype)
        x0_1CFHW = x_1CFHW
        for i, t in enumerate(timesteps):
            last = i + 1 == len(timesteps)
            batch = DiTMicroBatch(
                segments=[(stream_id, (0,))],
                noisy_latents_BCFHW=x_1CFHW,
                timesteps_B=upload_long([t], self.device),
                start_frames_B=starts,
                sink_check=i == 0,
                evict=last,
                capture=False,
                start_frames=(state.next_frame,),
            )
            x0_1CFHW = self.run_chain(batch).x0_BCFHW
            if not last:
                noise_1CFHW = state.draw_noise_BCFHW(1, 1)
                x_1CFHW = self.schedule.add_noise(
                    x0_1CFHW, noise_1CFHW, upload_long([timesteps[i + 1]], self.device)
                )
        state.next_frame += 1
        state.processed += 1
        return x0_1CFHW

    def step(
        self, requests: Sequence[tuple[str, torch.Tensor | None, int | None]]
    ) -> list[torch.Tensor | None]:
        """One shared DiT forward for every listed stream (each at most once).

        Args:
            requests: (stream_id, noisy latent [1, C, 1, H, W] or None for a drain tick,
                current_step or None to keep the stream's last one).

        Returns:
            per request, the emitted x0 [1, C, 1, H, W] or None (warm-up, or nothing in flight).
        """
        ids = [r[0] for r in requests]
        if len(set(ids)) != len(ids):
            raise BadRequestError(f"a stream may appear once per step, got {ids}")
        ticks = []
        for stream_id, latent, current_step in requests:
            ticks.append(self._state(stream_id).begin_tick(latent, current_step))
            if latent is not None:
                self._advance_prompt(stream_id)
        live = [t for t in ticks if t is not None]
        results: dict[str, torch.Tensor | None] = {}
        if live:
            batch = DiTMicroBatch(
                segments=[(t.stream_id, t.slots) for t in live],
                noisy_latents_BCFHW=torch.cat([t.noisy_latents_BCFHW for t in live]),
                timesteps_B=upload_long([x for t in live for x in t.timesteps], self.device),
                start_frames_B=upload_long([x for t in live for x in t.start_frames], self.device),
                start_frames=tuple(x for t in live for x in t.start_frames),
            )
            x0_BCFHW = self.run_chain(batch).x0_BCFHW
            for tick, rows in zip(live, batch.row_slices()):
                results[tick.stream_id] = self._streams[tick.stream_id].end_tick(tick.slots, x0_BCFHW[rows])
        return [results.get(stream_id) for stream_id in ids]
