"""The VAE encode and decode stages: one model, many streams, each stream's caches in a registry.

Legend: B batch, C channels (3 pixels, Z=16 latent), T frames (pixel or latent, as the name says),
H/W pixel height/width, h/w latent height/width (H/8, W/8).

Frame counts per call (both kinds):

    encode  first call 1 + 4k frames -> 1 + k latents (Weir: 1 -> 1; the reference: 5 -> 2)
            later calls 4k frames    -> k latents
    decode  first call T latents     -> 1 + 4(T-1) frames (Wan; TAEHV with emit_first_frame)
            later calls T latents    -> 4T frames

Latent scaling (StreamConfig.latent_scaling), with mean/std the Wan2.1 constants:

    kind   scaling      encode returns                      decode takes z and computes
    wan    reference    raw mu                              Wan decoder(z / (1/std) + mean)
    wan    symmetric    (mu - mean) * (1/std)               Wan decoder(z / (1/std) + mean)
    taehv  reference    z_taehv / (1/std) + mean            TAEHV decoder(z)
    taehv  symmetric    z_taehv                             TAEHV decoder(z)

TAEHV works in the normalised latent space (it applies no mean/std), so in 'reference' mode its
latents are mapped to raw-mu space to feed the DiT what the Wan encoder would; the decode side
treats DiT output as normalised for both kinds, as the reference does. Decoded pixels are clamped
to [-1, 1] and returned in fp32.

Spare TAEHV caches. A closed TAEHV stream's cache (its MemBlocks' memory tensors) is kept, with its
CUDA graphs where the stage has them, up to `spare_streams` (the oldest dropped first), as the DiT
keeps its stream states (`stages.cuda_graphs.SparePool`). The next stream whose first call has the
same batch and frame size takes it: the memory is zeroed in place, which is exactly a fresh cache's
empty memory (a MemBlock reads absent memory as zeros), and the graphs are renamed to the new
stream. Its first call runs eager as always (it writes the memory in place), and its second call
replays the closed stream's graph instead of capturing one (about 17 ms of a 480x832 stream's
start-up on an H200). The reference's re-decode
mode (`taehv_context_latents`) keeps latents outside the memory and is not recycled.

CUDA graphs (`cuda_graphs`, on CUDA). A stream's steady calls replay a CUDA graph of the whole call
(stages.cuda_graphs CallGraphRunner): the call's hundreds of kernels launch as one, and the GPU does
not wait on the host between them. A TAEHV stream's calls from its second on go through the graphs;
a Wan VAE stream's once its previous call allocated no cache slot (WanVAECache `new_slots`): from its
fourth, as its first two calls change the slots' frame counts and later ones overwrite them in place
(its conv windows too: each stream owns its own, stages.wan_vae "Windows").
"""

from __future__ import annotations

import numpy as np
import torch

from stages.cuda_graphs import SPARE_PREFIX, CallGraphRunner, SparePool
from stages.errors import BadFrameError, BadRequestError, StreamExistsError, StreamNotFoundError
from stages.taehv import TAEHV, TAEHVCache
from stages.wan_vae import LATENT_MEAN, LATENT_STD, WanVAE, WanVAECache

VAE_KINDS = ("wan", "taehv")
LATENT_SCALINGS = ("reference", "symmetric")
SPATIAL_FACTOR = 8
"""Pixels per latent position along H and W."""


def frames_uint8_to_model(
    frames_THWC_uint8: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> [1, 3, T, H, W] in [-1, 1] (x / 127.5 - 1), on (device, dtype)."""
    if frames_THWC_uint8.ndim != 4 or frames_THWC_uint8.shape[-1] != 3:
        raise BadFrameError(f"frames must be [T, H, W, 3], got {tuple(frames_THWC_uint8.shape)}")
    # the bytes travel as they are (one contiguous copy, asynchronous from pinned memory); the
    # channel permute and the conversion run on the device. The result is [B, C, T, H, W] viewed on
    # THWC memory, i.e. channels-last-3d, the VAEs' layout on CUDA.
    frames_THWC = frames_THWC_uint8.to(device=device, non_blocking=frames_THWC_uint8.is_pinned())
    return frames_THWC.permute(3, 0, 1, 2).unsqueeze(0).to(dtype) / 127.5 - 1.0


def stack_frames(frames: list[np.ndarray], *, pinned: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] frames -> one uint8 [T, H, W, 3] tensor, copied once. `pinned` puts it in
    page-locked memory, so that `frames_uint8_to_model` copies it to a GPU asynchronously."""
    out_THWC = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8, pin_memory=pinned)
    np.stack(frames, out=out_THWC.numpy())
    return out_THWC


def frames_model_to_uint8(frames_BCTHW: torch.Tensor) -> torch.Tensor:
    """Frames [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3] (clamped, rounded), contiguous, on
    the same device (so that a copy to the host is one plain transfer and gives contiguous frames)."""
    scaled_BCTHW = ((frames_BCTHW.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled_BCTHW.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


class HostCopy:
    """A tensor on its way to the host. From a GPU the copy is queued at once, behind the kernels that
    make the tensor, into page-locked memory (the caching host allocator's: a direct transfer, 0.11
    ms for four 480x832 frames against 0.60 ms into pageable memory on an H200), and `wait()` waits
    for that copy alone, not for what was queued on the stream after it. The block returns to the
    allocator when the last view of it (a frame's numpy array, say) is gone.

    Example: score = HostCopy(motion_score(prev, chunk)); z = encoder.encode(chunk) (queued behind the
    score's copy); float(score.wait()) returns as soon as the score has arrived, while the encode runs.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self._ready = None
        if not x.is_cuda:
            self._host = x.cpu()
            return
        self._host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self._host.copy_(x, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def wait(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


def to_host(x: torch.Tensor) -> torch.Tensor:
    """x on the host, the copy finished (`HostCopy`)."""
    return HostCopy(x).wait()


def _check_kind(vae_kind: str, model: torch.nn.Module, latent_scaling: str) -> None:
    if vae_kind not in VAE_KINDS:
        raise ValueError(f"vae_kind={vae_kind!r} must be one of {VAE_KINDS}")
    want = WanVAE if vae_kind == "wan" else TAEHV
    if not isinstance(model, want):
        raise ValueError(f"vae_kind={vae_kind!r} needs a {want.__name__}, got {type(model).__name__}")
    if latent_scaling not in LATENT_SCALINGS:
        raise ValueError(f"latent_scaling={latent_scaling!r} must be one of {LATENT_SCALINGS}")


class _StreamRegistry:
    """stream_id -> per-stream cache, with typed errors for unknown and duplicate ids."""

    def __init__(self) -> None:
        self._caches: dict[str, WanVAECache | TAEHVCache] = {}

    def open(self, stream_id: str, cache: WanVAECache | TAEHVCache) -> None:
        if stream_id in self._caches:
            raise StreamExistsError(f"stream {stream_id!r} is already open", stream_id=stream_id)
        self._caches[stream_id] = cache

    def get(self, stream_id: str) -> WanVAECache | TAEHVCache:
        try:
            return self._caches[stream_id]
        except KeyError:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open", stream_id=stream_id) from None

    def close(self, stream_id: str) -> WanVAECache | TAEHVCache:
        cache = self._caches.pop(stream_id, None)
        if cache is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open", stream_id=stream_id)
        return cache

    def replace(self, stream_id: str, cache: WanVAECache | TAEHVCache) -> None:
        """The open stream's cache swapped for another (a recycled one)."""
        self.get(stream_id)
        self._caches[stream_id] = cache

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._caches

    def __len__(self) -> int:
        return len(self._caches)

    def ids(self) -> list[str]:
        return list(self._caches)


class _VAEStage:
    """Shared plumbing: the model (moved to (device, dtype) in place, eval, no grad), the stream
    registry, and the latent mean / inverse std in the stage dtype."""

    def __init__(
        self,
        vae_kind: str,
        model: WanVAE | TAEHV,
        device: torch.device | str,
        dtype: torch.dtype,
        latent_scaling: str = "reference",
        *,
        cuda_graphs: bool = False,
        spare_streams: int = 8,
    ) -> None:
        _check_kind(vae_kind, model, latent_scaling)
        self.vae_kind = vae_kind
        self.device = torch.device(device)
        self.dtype = dtype
        self.latent_scaling = latent_scaling
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self._streams = _StreamRegistry()
        std_C = torch.tensor(LATENT_STD, dtype=torch.float32).to(device=self.device, dtype=dtype)
        self._mean_1C111 = torch.tensor(LATENT_MEAN, dtype=torch.float32).to(device=self.device, dtype=dtype)
        self._mean_1C111 = self._mean_1C111.view(1, -1, 1, 1, 1)
        self._inv_std_1C111 = (1.0 / std_C).view(1, -1, 1, 1, 1)
        self.graphs: CallGraphRunner | None = None
        """On CUDA with cuda_graphs: a stream's steady calls replay CUDA graphs (module docstring; the
        eager calls are many kernels, and the GPU idles between their launches: BENCHMARKS.md)."""
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = CallGraphRunner(self.device, max_graphs=64 + 2 * spare_streams)
        self.spares = SparePool(spare_streams, self.graphs)
        """Closed TAEHV streams' caches, keyed by their first call's (batch, height, width) (module docstring)."""
        self._first_keys: dict[str, tuple] = {}
        """Open TAEHV stream -> the (batch, height, width) of its first call."""

    @property
    def stream_ids(self) -> list[str]:
        return self._streams.ids()

    def has_stream(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def open_stream(self, stream_id: str) -> None:
        """Start a stream with fresh caches. Raises StreamExistsError if it is already open."""
        if stream_id.startswith(SPARE_PREFIX):
            raise BadRequestError(f"stream id {stream_id!r} may not start with a NUL character")
        self._streams.open(stream_id, self._new_cache())

    def close_stream(self, stream_id: str) -> None:
        """Forget the stream and free its caches, or keep them as a spare (module docstring). Raises
        StreamNotFoundError if it is not open."""
        cache = self._streams.close(stream_id)
        key = self._first_keys.pop(stream_id, None)
        if key is not None and self._recyclable(cache):
            self.spares.put(stream_id, key, cache)
        elif self.graphs is not None:
            self.graphs.forget(stream_id)

    def _new_cache(self) -> WanVAECache | TAEHVCache:
        raise NotImplementedError

    @staticmethod
    def _recyclable(cache: WanVAECache | TAEHVCache) -> bool:
        """A TAEHV cache that has run (its MemBlocks have memory) and holds no re-decode latents."""
        return (isinstance(cache, TAEHVCache) and cache.num_calls > 0 and cache.context_BTCHW is None
                and any(m is not None for m in cache.memory))

    def _first_call_cache(self, stream_id: str, cache: TAEHVCache, x_BCTHW: torch.Tensor) -> TAEHVCache:
        """Before a TAEHV stream's first call on x_BCTHW (frames or latents): a spare cache of the same
        (batch, height, width), zeroed and with its graphs renamed to this stream, when there is one;
        else the stream's own."""
        key = (x_BCTHW.shape[0], *x_BCTHW.shape[-2:])
        self._first_keys[stream_id] = key
        spare = self.spares.take(stream_id, key)
        if spare is None:
            return cache
        for memory in spare.memory:
            if memory is not None:
                memory.zero_()
        spare.num_calls = 0
        self._streams.replace(stream_id, spare)
        return spare

    def _graph_call(self, stream_id: str, cache: WanVAECache | TAEHVCache, fn, x: torch.Tensor) -> torch.Tensor:
        """fn(x) for a stream, from its CUDA graphs once its calls only overwrite its cache in place
        (module docstring), eager before. The cache's call count is set here, as a replay does not
        run fn's host code."""
        if isinstance(cache, WanVAECache):
            steady = cache.num_calls > 0 and cache.new_slots == 0
        else:  # the first call fills every MemBlock's memory; later calls overwrite it
            steady = cache.num_calls > 0
        if self.graphs is None or not steady:
            return fn(x)
        calls = cache.num_calls
        out = self.graphs.run(stream_id, fn, x)
        cache.num_calls = calls + 1
        return out

    def cache_nbytes(self, stream_id: str) -> int:
        """Bytes held by one stream's caches (for memory accounting)."""
        return self._streams.get(stream_id).nbytes()

    def _normalise(self, mu_BZTHW: torch.Tensor) -> torch.Tensor:
        return (mu_BZTHW - self._mean_1C111) * self._inv_std_1C111

    def _denormalise(self, z_BZTHW: torch.Tensor) -> torch.Tensor:
        return z_BZTHW / self._inv_std_1C111 + self._mean_1C111


class VAEEncodeStage(_VAEStage):
    """Pixels -> latents for many streams. `encode` takes [B, 3, T, H, W] in [-1, 1] (H, W multiples of 8)."""

    def _new_cache(self) -> WanVAECache | TAEHVCache:
        return self.model.new_encode_cache()

    def encode(self, stream_id: str, frames_BCTHW: torch.Tensor) -> torch.Tensor:
        """The stream's next frames -> latents [B, 16, T', H/8, W/8] in the stage dtype (see module doc)."""
        cache = self._streams.get(stream_id)
        if frames_BCTHW.ndim != 5 or frames_BCTHW.shape[1] != 3:
            raise BadFrameError(f"frames must be [B, 3, T, H, W], got {tuple(frames_BCTHW.shape)}")
        H, W = frames_BCTHW.shape[-2:]
        if H % SPATIAL_FACTOR or W % SPATIAL_FACTOR:
            raise BadFrameError(
                f"frame size {H}x{W} must be a multiple of {SPATIAL_FACTOR}", height=H, width=W
            )
        frames_BCTHW = frames_BCTHW.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            if self.vae_kind == "wan":
                assert isinstance(cache, WanVAECache)

                def encode_wan(frames_BCTHW: torch.Tensor) -> torch.Tensor:
                    mu_BZTHW = self.model.stream_encode(frames_BCTHW, cache)
                    if self.latent_scaling == "symmetric":
                        return self._normalise(mu_BZTHW)
                    # dense (mu is a channel slice of the moments): an eager call's latents and a
                    # replay's (cloned out of the graph) then have one layout, so decode sees one key
                    return mu_BZTHW.contiguous()

                return self._graph_call(stream_id, cache, encode_wan, frames_BCTHW)
            assert isinstance(cache, TAEHVCache)
            if cache.num_calls == 0:
                cache = self._first_call_cache(stream_id, cache, frames_BCTHW)

            def encode_BCTHW(frames_BCTHW: torch.Tensor) -> torch.Tensor:
                unit_BTCHW = (frames_BCTHW * 0.5 + 0.5).clamp(0, 1).transpose(1, 2)
                z_BZTHW = self.model.stream_encode(unit_BTCHW, cache).transpose(1, 2).contiguous()
                return self._denormalise(z_BZTHW) if self.latent_scaling == "reference" else z_BZTHW

            return self._graph_call(stream_id, cache, encode_BCTHW, frames_BCTHW)


class VAEDecodeStage(_VAEStage):
    """Latents -> pixels for many streams. `decode` returns [B, 3, T', 8h, 8w] fp32 in [-1, 1].

    TAEHV options (defaults: Weir's; the reference is `taehv_context_latents=3,
    taehv_emit_first_frame=False`):
    - `taehv_context_latents` None streams exactly: each MemBlock continues from the stream's memory,
      so chunked output equals one whole-clip decode, and a 1-latent call decodes 1 latent (about 9x
      less work than the reference's window on an H100 at 480x832). An int k re-decodes the last
      <= k latents from empty memory with the new ones, as the reference does (k = 3).
    - `taehv_emit_first_frame` True gives the Wan VAE's frame count on the first call (latent 0 ->
      frame 0, so 1 + 4(T-1)); False drops latent 0's frame like the reference (4(T-1); a 1-latent
      first call then returns no frames).
    """

    def __init__(
        self,
        vae_kind: str,
        model: WanVAE | TAEHV,
        device: torch.device | str,
        dtype: torch.dtype,
        latent_scaling: str = "reference",
        *,
        taehv_context_latents: int | None = None,
        taehv_emit_first_frame: bool = True,
        cuda_graphs: bool = False,
        spare_streams: int = 8,
    ) -> None:
        super().__init__(vae_kind, model, device, dtype, latent_scaling, cuda_graphs=cuda_graphs,
                         spare_streams=spare_streams)
        if taehv_context_latents is not None and taehv_context_latents < 0:
            raise ValueError(f"taehv_context_latents={taehv_context_latents} must be None or >= 0")
        self.taehv_context_latents = taehv_context_latents
        self.taehv_emit_first_frame = taehv_emit_first_frame

    def _new_cache(self) -> WanVAECache | TAEHVCache:
        return self.model.new_decode_cache()

    def decode(self, stream_id: str, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """The stream's next latents [B, 16, T, h, w] -> frames [B, 3, T', 8h, 8w] fp32 in [-1, 1]."""
        cache = self._streams.get(stream_id)
        if latents_BCTHW.ndim != 5 or latents_BCTHW.shape[2] == 0:
            raise ValueError(f"latents must be [B, Z, T>=1, h, w], got {tuple(latents_BCTHW.shape)}")
        z_BZTHW = latents_BCTHW.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            if self.vae_kind == "wan":
                assert isinstance(cache, WanVAECache)

                def decode_wan(z_BZTHW: torch.Tensor) -> torch.Tensor:
                    frames_BCTHW = self.model.stream_decode(self._denormalise(z_BZTHW), cache)
                    return frames_BCTHW.float().clamp_(-1.0, 1.0)

                return self._graph_call(stream_id, cache, decode_wan, z_BZTHW)
            assert isinstance(cache, TAEHVCache)
            if cache.num_calls == 0 and self.taehv_context_latents is None:
                cache = self._first_call_cache(stream_id, cache, z_BZTHW)

            def decode_BCTHW(z_BZTHW: torch.Tensor) -> torch.Tensor:
                unit_BTCHW = self.model.stream_decode(
                    z_BZTHW.transpose(1, 2),
                    cache,
                    context_latents=self.taehv_context_latents,
                    emit_first_frame=self.taehv_emit_first_frame,
                )
                return (unit_BTCHW.transpose(1, 2).float() * 2.0 - 1.0).clamp_(-1.0, 1.0)

            if self.taehv_context_latents is not None:  # the reference's re-decode window grows: eager
                return decode_BCTHW(z_BZTHW)
            return self._graph_call(stream_id, cache, decode_BCTHW, z_BZTHW)
