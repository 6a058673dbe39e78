"""The streaming engine in one process: frames in, restyled frames out, many streams at once.

Legend: B batch, C channels, T frames, H/W pixel height/width, h/w latent height/width (H/8, W/8).

Data flow per stream (spec §C, with Weir's start on the first frame):

    frames (uint8 HxWx3, seq) --buffer--> chunk (1 frame first, then 4)
        -> VAE encode (per-stream conv caches)            -> latent z  [1, 16, 1, h, w] per chunk
        -> motion score -> noise strength s, step t0       (scheduling.noise.NoiseController)
        -> z_noisy = eps * s + z * (1 - s)
        -> DiT (stream batch: n slots in flight, one forward per tick shared by every stepped stream)
        -> x0 of the frame that entered n-1 ticks ago      -> VAE decode -> 4 frames, tagged with their seqs

The first chunk is prefilled (all n steps back to back, batch 1) and decoded at once: with the default
`first_chunk_frames=1` the first output is frame 0 itself, one frame interval after the stream opens.

Frames in flight on a prompt change continue with the new prompt (their remaining denoising steps use
the new text conditioning; the self-attention caches are kept). A prompt may be several weighted
prompts (stages.prompts.PromptMix), and a change may blend over the next N chunks instead of
switching at once (stages.prompt_blend: the T5 embeddings are interpolated per chunk, linear or slerp,
and the cross-attention K/V recomputed from them; the Nth chunk gets the new prompt exactly). On a steps change the frames in flight
are first finished with the old number of steps (drain ticks without new input), then the slots are
resized from slot 0's caches; nothing is dropped.

Ring (`StreamParams.chains` = W, default 1): the stream runs W interleaved stream-batch chains
(stages.stream_batch, "Ring"): tick k continues the buffer tick k - W left, so a chunk comes out
(n-1)*W ticks after it went in instead of n-1, in input order, after (n-1)*W warm-up ticks that emit
nothing; a drain takes (n-1)*W ticks. In one process this only adds latency; it is the oracle of the
multi-GPU pipeline (cluster.graph), where it lets W ticks of one stream be in the pipeline at once.
Worked example, W = 2, n = 2, prefill on frame 0, then chunks c0 = frames 1-4, c1 = 5-8, ...: ticks
0 and 1 (c0, c1) emit nothing, tick 2 (c2) emits c0's frames 1-4, tick 3 emits c1's 5-8; a flush
after c3 runs drain ticks 4 and 5, which emit c2 and c3.

Step-by-step mode (`set_step_mode`, per stream, switchable mid-stream): the reference's "without stream
batch" - each chunk runs its n steps back to back (batch 1, slot 0) and is emitted in the same tick:
lower latency per frame, n forwards per chunk. Switching in, the frames in flight are drained first
(returned); switching back, the n slots are rebuilt from slot 0 and the stream batch warms up again.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from scheduling.noise import NoiseController
from stages.config import DIT_PRESETS, StreamConfig
from stages.errors import BadFrameError, BadRequestError, StreamExistsError, StreamNotFoundError
from stages.motion import motion_score
from stages.prompt_blend import encode_mix
from stages.prompts import PromptMix, check_blend_chunks
from stages.stream_batch import check_chains
from stages.vae_stage import HostCopy, frames_model_to_uint8, frames_uint8_to_model, stack_frames, to_host

MIN_SIDE = 16
MAX_SIDE = 2048
CHUNK_FRAMES = 4
"""Input frames per latent frame (the Wan VAE's temporal compression)."""


@dataclass(frozen=True)
class EngineSpec:
    """Which model an engine runs, where, and from which weights."""

    model: str = "tiny"
    """DiT preset: 'tiny' (CPU tests), 'wan-1.3b', 'wan-14b'."""
    vae: str = "wan"
    """Default VAE for streams that don't choose: 'wan' or 'taehv'."""
    device: str = "cpu"
    """torch device string, e.g. 'cpu', 'cuda', 'cuda:1'."""
    dtype: str = "float32"
    """'float32' or 'bfloat16' (the GPU default)."""
    checkpoint_dir: str | None = None
    """Folder laid out like the published release; None = random weights seeded by weights_seed."""
    weights_seed: int = 0
    """Seed of the random weights when checkpoint_dir is None."""
    text_device: str | None = None
    """Device of the text encoder (default: same as `device`; 'cpu' keeps T5 off the hot GPU)."""
    cuda_graphs: bool = True
    """Replay steady-state DiT steps from CUDA graphs (CUDA devices only; eager on a capture error)."""
    spare_streams: int = 8
    """Closed streams' DiT states kept for the next streams of their geometry, with their CUDA graphs
    (stages.dit_stage, "Spare states"); 0 frees every state at close."""

    def __post_init__(self) -> None:
        if self.model not in DIT_PRESETS:
            raise ValueError(f"model={self.model!r}: choose one of {sorted(DIT_PRESETS)}")
        if self.vae not in ("wan", "taehv"):
            raise ValueError(f"vae={self.vae!r}: choose 'wan' or 'taehv'")
        if self.spare_streams < 0:
            raise ValueError(f"spare_streams={self.spare_streams} must be >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: choose 'float32', 'bfloat16' or 'float16'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class StreamParams:
    """What a client asks for when it opens a stream."""

    prompt: str | PromptMix
    """One prompt, or several weighted prompts (PromptMix)."""
    num_steps: int = 2
    noise_scale: float = 0.8
    seed: int = 0
    height: int = 480
    width: int = 832
    vae: str | None = None
    """'wan' or 'taehv'; None = the engine's default."""
    first_chunk_frames: int = 1
    """1: first output from frame 0 alone (Weir); 5: the reference's 1+4 start."""
    motion_aware_noise: bool = True
    chains: int | None = None
    """W interleaved stream-batch chains (module docstring, "Ring"), 1..16; None = the executor's
    default (1 in one process; the multi-GPU pipeline's ring setting)."""

    def validate(self) -> None:
        """Raise BadRequestError naming the first field out of range."""
        PromptMix.of(self.prompt)
        if not 1 <= self.num_steps <= 4:
            raise BadRequestError(f"num_steps={self.num_steps} must be 1..4", field="num_steps")
        if not 0.0 < self.noise_scale <= 1.0:
            raise BadRequestError(f"noise_scale={self.noise_scale} must be in (0, 1]", field="noise_scale")
        for name, side in (("height", self.height), ("width", self.width)):
            if side % 16 or not MIN_SIDE <= side <= MAX_SIDE:
                raise BadRequestError(
                    f"{name}={side} must be a multiple of 16 in [{MIN_SIDE}, {MAX_SIDE}]", field=name
                )
        if self.vae not in (None, "wan", "taehv"):
            raise BadRequestError(f"vae={self.vae!r} must be 'wan' or 'taehv'", field="vae")
        if self.first_chunk_frames not in (1, 5):
            raise BadRequestError(
                f"first_chunk_frames={self.first_chunk_frames} must be 1 or 5", field="first_chunk_frames"
            )
        if self.chains is not None:
            check_chains(self.chains)


@dataclass
class OutputFrame:
    """One restyled frame, tagged with the sequence number of the input frame it comes from."""

    seq: int
    frame: np.ndarray
    """uint8 [H, W, 3]."""


@dataclass
class _Stream:
    """Engine-side bookkeeping of one stream (model state lives in the stages' per-stream objects)."""

    stream_id: str
    params: StreamParams
    vae: str
    num_steps: int
    noise: NoiseController
    generator: torch.Generator
    chains: int = 1
    pending: deque = field(default_factory=deque)
    """(seq, frame uint8 HxWx3) not yet encoded."""
    in_flight: deque = field(default_factory=deque)
    """Seq lists of the chunks inside the stream batch, one per tick, oldest first ([] for a drain tick)."""
    started: bool = False
    step_by_step: bool = False
    last_frame_BC1HW: torch.Tensor | None = None
    frames_in: int = 0
    frames_out: int = 0


@dataclass(frozen=True)
class TickTimes:
    """Stage times of one engine tick, measured on the device (CUDA events; the host clock on CPU).

    Taken only for a plain tick (every stepped stream encodes a chunk, shares the one DiT forward and
    decodes what leaves it; no prefill, no step-by-step stream), where the three stages run one after
    the other. Example: 2 streams, 1 step: encode_chunks=2, rows=2, decode_chunks=2.
    """

    encode_s: float
    """Upload, motion score and VAE encode of every stepped chunk."""
    encode_chunks: int
    dit_s: float
    """The shared DiT forward."""
    rows: int
    """Rows of that forward (n per stream-batch stream)."""
    decode_s: float
    """VAE decode of the chunks that left the stream batch, and their copy to the host."""
    decode_chunks: int


class _StageClock:
    """Marks on the device's timeline (CUDA events) or the host clock (CPU, where ops are synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def intervals_s(self) -> list[float]:
        """Seconds between consecutive marks (waits for the last one on CUDA)."""
        if self._cuda:
            self._marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self._marks, self._marks[1:])]
        return [b - a for a, b in zip(self._marks, self._marks[1:])]


@dataclass
class EngineStats:
    """Counters of one engine, for the metrics exporter."""

    active_streams: int
    frames_in: int
    frames_out: int
    ticks: int
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0


class StreamEngine:
    """Many streams on one device. Thread-safe: one lock around every call that touches model state."""

    def __init__(self, spec: EngineSpec, *, components: EngineComponents | None = None) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = spec.torch_dtype
        self.components = components if components is not None else build_components(spec)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.RLock()
        self._ticks = 0
        self.tick_times: TickTimes | None = None
        """Stage times of the latest step when it was a plain tick (TickTimes), else None."""
        self._frames_in = 0
        self._frames_out = 0

    # ---- stream lifecycle -------------------------------------------------------------------------

    def open_stream(self, stream_id: str, params: StreamParams) -> None:
        """Open a stream; its state is private to it. Raises BadRequestError, StreamExistsError."""
        params.validate()
        vae = params.vae or self.spec.vae
        with self._lock:
            if stream_id in self._streams:
                raise StreamExistsError(f"stream {stream_id!r} is already open", stream_id=stream_id)
            cfg = StreamConfig(
                num_steps=params.num_steps,
                noise_scale=params.noise_scale,
                first_chunk_frames=params.first_chunk_frames,
                motion_aware_noise=params.motion_aware_noise,
            )
            c = self.components
            c.encoders[vae].open_stream(stream_id)
            c.decoders[vae].open_stream(stream_id)
            chains = params.chains or 1
            c.dit.open(stream_id, stream_cfg=cfg, height=params.height, width=params.width, seed=params.seed,
                       chains=chains)
            c.dit.set_prompt_context(stream_id, self._embed(PromptMix.of(params.prompt)))
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
            self._streams[stream_id] = _Stream(
                stream_id=stream_id,
                params=params,
                vae=vae,
                num_steps=params.num_steps,
                noise=NoiseController(params.noise_scale, enabled=params.motion_aware_noise),
                generator=gen,
                chains=chains,
            )

    def close_stream(self, stream_id: str) -> None:
        """Free every per-stream state. Closing an unknown stream is a no-op (a client may vanish twice)."""
        with self._lock:
            s = self._streams.pop(stream_id, None)
            if s is None:
                return
            c = self.components
            c.encoders[s.vae].close_stream(stream_id)
            c.decoders[s.vae].close_stream(stream_id)
            c.dit.close(stream_id)

    def has_stream(self, stream_id: str) -> bool:
        return stream_id in self._streams

    @property
    def forwards_per_stream(self) -> bool:
        """True when a step over several streams runs one DiT forward per stream anyway (the CUDA-graph
        path replays one graph per stream: stages.dit_stage), so stepping them one at a time costs the
        same and lets each stream's frames out as soon as its own chunk is done."""
        return any(shard.graphs is not None and shard.graphs.enabled for shard in self.components.dit.shards)

    # ---- frames -----------------------------------------------------------------------------------

    def add_frame(self, stream_id: str, seq: int, frame: np.ndarray) -> bool:
        """Buffer one frame; True when the stream has a chunk ready to step.

        Raises BadFrameError for a frame that is not uint8 [height, width, 3] of this stream,
        StreamNotFoundError for an unknown stream. A bad frame changes nothing.
        """
        s = self._get(stream_id)
        h, w = s.params.height, s.params.width
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.shape != (h, w, 3):
            got = (getattr(frame, "shape", None), str(getattr(frame, "dtype", type(frame).__name__)))
            raise BadFrameError(
                f"frame {seq} of stream {stream_id!r} must be uint8 [{h}, {w}, 3], got shape {got[0]} {got[1]}",
                stream_id=stream_id,
                seq=seq,
                expected=(h, w, 3),
                got=got[0],
            )
        with self._lock:
            s.pending.append((int(seq), frame))
            s.frames_in += 1
            self._frames_in += 1
            return self._chunk_ready(s)

    def ready_streams(self) -> list[str]:
        with self._lock:
            return [sid for sid, s in self._streams.items() if self._chunk_ready(s)]

    def pending_frames(self, stream_id: str) -> int:
        return len(self._get(stream_id).pending)

    def push_frame(self, stream_id: str, seq: int, frame: np.ndarray) -> list[OutputFrame]:
        """add_frame, then step this stream alone if a chunk is ready."""
        if self.add_frame(stream_id, seq, frame):
            return self.step([stream_id])[stream_id]
        return []

    def step(self, stream_ids: list[str]) -> dict[str, list[OutputFrame]]:
        """One tick: each listed stream with a ready chunk advances by one chunk; one shared DiT forward.

        Streams without a ready chunk are returned with no frames. First chunks are prefilled
        (each on its own; a prefill is a different shape) and decoded at once; so are the chunks of
        step-by-step streams (all n steps back to back, batch 1).
        """
        out: dict[str, list[OutputFrame]] = {sid: [] for sid in stream_ids}
        with self._lock:
            self.tick_times = None
            clock = _StageClock(self.device)
            plain = True  # no prefill, no step-by-step stream: the stages run one after the other
            clock.mark()
            batch: list[tuple[_Stream, torch.Tensor, int, list[int]]] = []
            for sid in stream_ids:
                s = self._get(sid)
                if not self._chunk_ready(s):
                    continue
                if not s.started:
                    out[sid].extend(self._prefill(s))
                    plain = False
                    continue
                seqs, frames_BCTHW = self._take(s, CHUNK_FRAMES)
                noisy, current_step = self._encode_noisy(s, frames_BCTHW, first=False)
                if s.step_by_step:
                    x0 = self.components.dit.step_through(s.stream_id, noisy, current_step)
                    out[sid].extend(self._decode(s, x0, seqs))
                    plain = False
                    continue
                batch.append((s, noisy, current_step, seqs))
            if batch:
                clock.mark()
                out_lat = self.components.dit.step([(s.stream_id, z, t) for s, z, t, _ in batch])
                clock.mark()
                decoded = 0
                for (s, _, _, seqs), x0 in zip(batch, out_lat):
                    s.in_flight.append(seqs)
                    frames = self._emit(s, x0)
                    decoded += bool(frames)
                    out[s.stream_id].extend(frames)
                clock.mark()
                if plain:
                    encode_s, dit_s, decode_s = clock.intervals_s()
                    decode_s = decode_s if decoded else 0.0  # warm-up ticks of a stream batch emit nothing
                    self.tick_times = TickTimes(encode_s, len(batch), dit_s, sum(s.num_steps for s, *_ in batch),
                                               decode_s, decoded)
            self._ticks += 1
        return out

    def flush(self, stream_id: str) -> list[OutputFrame]:
        """Finish every frame the stream holds: a partial chunk is padded with its last frame (the
        padding is not returned), and drain ticks push the frames in flight out."""
        with self._lock:
            s = self._get(stream_id)
            out: list[OutputFrame] = []
            if s.pending and not s.started:
                while len(s.pending) < s.params.first_chunk_frames:
                    s.pending.append((-1, s.pending[-1][1]))
                out.extend(self._prefill(s))
            if s.pending:
                while len(s.pending) % CHUNK_FRAMES:
                    s.pending.append((-1, s.pending[-1][1]))
                while s.pending:
                    out.extend(self.step([stream_id])[stream_id])
            out.extend(self._drain(s))
            return [f for f in out if f.seq >= 0]

    # ---- live controls ----------------------------------------------------------------------------

    def set_prompt(self, stream_id: str, prompt: str | PromptMix, *, blend_chunks: int = 0) -> None:
        """Change the text conditioning; caches are kept.

        blend_chunks 0: at once, frames in flight finish with the new prompt. N (1..64): over the
        stream's next N chunks the conditioning moves from the current one to the new (in the mix's
        mode, linear or slerp), reaching it exactly at the Nth. BadRequestError for bad input.
        """
        mix = PromptMix.of(prompt)
        check_blend_chunks(blend_chunks)
        with self._lock:
            self._get(stream_id)
            self.components.dit.set_prompt_context(
                stream_id, self._embed(mix), blend_chunks=blend_chunks, mode=mix.mode
            )

    def set_steps(self, stream_id: str, num_steps: int) -> list[OutputFrame]:
        """Change the number of denoising steps. Frames in flight are finished first (returned)."""
        if not 1 <= num_steps <= 4:
            raise BadRequestError(f"num_steps={num_steps} must be 1..4", field="num_steps")
        with self._lock:
            s = self._get(stream_id)
            out = self._drain(s) if s.started else []
            self.components.dit.set_num_steps(stream_id, num_steps)
            s.num_steps = num_steps
            s.in_flight.clear()  # the resized stream batch warms up again from a zero buffer
            return out

    def set_step_mode(self, stream_id: str, step_by_step: bool) -> list[OutputFrame]:
        """Run the stream step by step (True) or stream-batched (False) from its next chunk on. The
        frames in flight are finished first and returned; nothing is dropped. A no-op if unchanged."""
        with self._lock:
            s = self._get(stream_id)
            if s.step_by_step == step_by_step:
                return []
            out = self._drain(s) if s.started else []
            if not step_by_step and s.started:
                self.components.dit.set_num_steps(stream_id, s.num_steps)  # slots rebuilt from slot 0
            s.in_flight.clear()
            s.step_by_step = step_by_step
            return out

    def warm_up(self, height: int, width: int, *, steps: tuple[int, ...] = (1, 2, 3, 4),
                vaes: tuple[str, ...] | None = None, chunks: int = 6) -> float:
        """Run a throwaway stream per (steps, vae) at this resolution so that kernels are loaded, cuDNN
        has picked its algorithms and the DiT's CUDA graphs exist before the first client arrives; then
        the heap is frozen (`freeze_heap`). Returns the seconds it took. Client streams are unaffected
        (their state is their own)."""
        import time

        t0 = time.perf_counter()
        frame = np.full((height, width, 3), 128, np.uint8)
        for vae in vaes or tuple(self.components.encoders):
            for n in steps:
                sid = f"__warm_up_{vae}_{n}"
                self.open_stream(sid, StreamParams(prompt="warm up", num_steps=n, height=height, width=width,
                                                   vae=vae))
                try:
                    for seq in range(1 + CHUNK_FRAMES * (chunks + n)):
                        self.push_frame(sid, seq, frame)
                finally:
                    self.close_stream(sid)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        freeze_heap()
        return time.perf_counter() - t0

    def stats(self) -> EngineStats:
        text = self.components.text
        return EngineStats(
            active_streams=len(self._streams),
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            ticks=self._ticks,
            prompt_cache_hits=getattr(text, "cache_hits", 0),
            prompt_cache_misses=getattr(text, "cache_misses", 0),
        )

    # ---- internals --------------------------------------------------------------------------------

    def _embed(self, mix: PromptMix) -> torch.Tensor:
        return encode_mix(self.components.text, mix, self.device, self.dtype)

    def _get(self, stream_id: str) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open", stream_id=stream_id)
        return s

    @staticmethod
    def _chunk_ready(s: _Stream) -> bool:
        need = CHUNK_FRAMES if s.started else s.params.first_chunk_frames
        return len(s.pending) >= need

    def _take(self, s: _Stream, count: int) -> tuple[list[int], torch.Tensor]:
        items = [s.pending.popleft() for _ in range(count)]
        seqs = [seq for seq, _ in items]
        frames_THWC = stack_frames([f for _, f in items], pinned=self.device.type == "cuda")
        return seqs, frames_uint8_to_model(frames_THWC, device=self.device, dtype=self.dtype)

    def _encode_noisy(self, s: _Stream, frames_BCTHW: torch.Tensor, *, first: bool) -> tuple[torch.Tensor, int]:
        noisy, current_step = encode_noisy(
            self.components.encoders[s.vae], s.stream_id, frames_BCTHW, s.noise, s.generator,
            None if first else s.last_frame_BC1HW, dtype=self.dtype,
        )
        s.last_frame_BC1HW = frames_BCTHW[:, :, -1:]
        return noisy, current_step

    def _prefill(self, s: _Stream) -> list[OutputFrame]:
        seqs, frames_BCTHW = self._take(s, s.params.first_chunk_frames)
        noisy, _ = self._encode_noisy(s, frames_BCTHW, first=True)
        x0 = self.components.dit.prefill(s.stream_id, noisy)
        s.started = True
        return self._decode(s, x0, seqs)

    def _emit(self, s: _Stream, x0: torch.Tensor | None) -> list[OutputFrame]:
        """A tick's result: x0 is the chunk that entered exit_lag(n, W) ticks ago (None while warming up)."""
        if len(s.in_flight) <= exit_lag(s.num_steps, s.chains):
            return []  # warm-up: the last slot held the zero buffer, not a frame
        seqs = s.in_flight.popleft()
        if not seqs:  # a drain tick's empty slot (or warm-up garbage) leaves the stream batch
            return []
        if x0 is None:
            raise AssertionError(f"stream {s.stream_id!r}: frames {seqs} left the stream batch undecoded")
        return self._decode(s, x0, seqs)

    def _drain(self, s: _Stream) -> list[OutputFrame]:
        out: list[OutputFrame] = []
        # in_flight holds the chunks not yet emitted; each drain tick moves one chain's slots one step
        # on and leaves an empty marker behind, so the next real chunk is emitted exit_lag ticks later
        while any(s.in_flight):
            x0 = self.components.dit.step([(s.stream_id, None, None)])[0]
            s.in_flight.append([])
            out.extend(self._emit(s, x0))
        return out

    def _decode(self, s: _Stream, x0_BCTHW: torch.Tensor, seqs: list[int]) -> list[OutputFrame]:
        frames_BCTHW = self.components.decoders[s.vae].decode(s.stream_id, x0_BCTHW)
        frames = to_host(frames_model_to_uint8(frames_BCTHW)[0]).numpy()
        if frames.shape[0] != len(seqs):
            raise AssertionError(f"decoded {frames.shape[0]} frames for {len(seqs)} inputs")
        s.frames_out += len(seqs)
        self._frames_out += len(seqs)
        return [OutputFrame(seq=q, frame=f) for q, f in zip(seqs, frames)]


def freeze_heap() -> int:
    """Collect garbage once, then exempt every object alive now from later collections (`gc.freeze`);
    returns how many objects are frozen. Call it after a warm-up, before clients arrive.

    A served engine's process holds a great many long-lived Python objects (the models' modules, the
    torch.compile caches of every compiled piece and shape, the CUDA-graph tables), and each full
    collection walks all of them, holding the GIL. On a 2-core CPU box, 0.2 million objects take
    0.14 s to walk and 0.5 million 0.35 s (after a single small torch.compile): a stall that every
    stream on the GPU waits through. Frozen, they are skipped; objects made later (frames, messages,
    new streams' states) are collected as usual.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def exit_lag(num_steps: int, chains: int = 1) -> int:
    """Ticks between a chunk's entry and the tick that emits it: (n-1)*W (module docstring, "Ring").

    Example: n = 2, W = 2 -> 2: the chunk of tick 0 comes out of tick 2; ticks 0 and 1 are warm-up.
    """
    return (num_steps - 1) * chains


def encode_noisy(encoder, stream_id: str, frames_BCTHW: torch.Tensor, noise: NoiseController,
                 generator: torch.Generator, prev_last_BC1HW: torch.Tensor | None, *,
                 dtype: torch.dtype) -> tuple[torch.Tensor, int | None]:
    """Encode a chunk and noise it for the DiT: z_noisy = eps * s + z * (1 - s).

    The strength s comes from the stream's motion-aware controller, fed the chunk's motion after
    `prev_last_BC1HW` (None for the first chunk: the initial strength, no step label). Returns
    (z_noisy in `dtype`, current_step). The one place this is done, for the engine and stage actors.
    """
    # the motion score's read-back waits for the score alone: the encode is queued before it
    motion = None if prev_last_BC1HW is None else HostCopy(motion_score(prev_last_BC1HW, frames_BCTHW))
    z_BCTHW = encoder.encode(stream_id, frames_BCTHW)
    if motion is None:
        scale, current_step = noise.init_noise_scale, None
    else:
        scale, current_step = noise.update(float(motion.wait()))
    eps = torch.randn(z_BCTHW.shape, generator=generator, device=z_BCTHW.device, dtype=torch.float32)
    return (eps.to(z_BCTHW.dtype) * scale + z_BCTHW * (1 - scale)).to(dtype), current_step


@dataclass
class EngineComponents:
    """The stage objects an engine drives; built by build_components or injected (e.g. tests)."""

    dit: object
    """A LatentStreamer over a DiT (full model or chained shards)."""
    encoders: dict[str, object]
    """VAE kind -> VAEEncodeStage."""
    decoders: dict[str, object]
    """VAE kind -> VAEDecodeStage."""
    text: object
    """A text encoder with `encode(prompt) -> [1, 512, 4096]` and a prompt cache."""


def build_components(spec: EngineSpec) -> EngineComponents:
    """Build (and load, if spec.checkpoint_dir is set) every model an engine needs."""
    from stages.loading import build_models

    return build_models(spec, DIT_PRESETS[spec.model])
