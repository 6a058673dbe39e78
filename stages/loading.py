"""Build every model an engine needs, from the published files or with seeded random weights.

Random weights do the same work as the real model (same shapes, same kernels), which is what the
benchmarks need; `head.head` is re-randomised (the published init zeroes it, which would make the
DiT output its input and hide bugs).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch

from stages.config import VAE_PRESETS, DiTConfig, StreamConfig
from stages.dit import WanDiT
from stages.dit_stage import DiTShard
from stages.fused import channels_last_weights_
from stages.stream_batch import LatentStreamer
from stages.taehv import TAEHV, TAEHV_PRESETS
from stages.vae_stage import VAEDecodeStage, VAEEncodeStage
from stages.wan_vae import WanVAE

if TYPE_CHECKING:
    from stages.engine import EngineComponents, EngineSpec


CUDNN_BENCHMARK_LIMIT = 0
"""cuDNN algorithms autotuning tries per conv shape (0: all; PyTorch's default is 10). The Wan VAE's
full-resolution 96 -> 96 3x3x3 conv (4 frames at 480x832) takes 1.45 ms with every algorithm tried
and 1.94 ms with the first ten, on an H200 (BENCHMARKS.md); the wider convs gain 0-8%. The cost is a
longer first call per shape, which warm-up at start pays."""


def use_cudnn_autotuning(enabled: bool = True) -> None:
    """Let cuDNN time its conv algorithms per shape and keep the fastest (all of them:
    CUDNN_BENCHMARK_LIMIT, or the environment's WEIR_CUDNN_BENCHMARK_LIMIT, read at each call), or go
    by its heuristics (`enabled` False, as deterministic runs need)."""
    torch.backends.cudnn.benchmark = enabled
    if enabled:
        limit = os.environ.get("WEIR_CUDNN_BENCHMARK_LIMIT", str(CUDNN_BENCHMARK_LIMIT))
        if not limit.isdigit():
            raise ValueError(f"WEIR_CUDNN_BENCHMARK_LIMIT={limit!r}: give a count of algorithms (0: all)")
        torch.backends.cudnn.benchmark_limit = int(limit)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights: every Linear/Conv N(0, 1/fan_in), norms at 1, biases and modulations small.

    Drawn on the parameters' own device (a 14B model initialises in seconds on a GPU); the same
    seed gives the same weights on the same device type.
    """
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            if p.ndim >= 2 and "modulation" not in name:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
            elif name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", "gamma")) or ".norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module


def _build(cls, cfg, device: torch.device, dtype: torch.dtype, seed: int):
    with torch.device(device), _default_dtype(dtype if dtype.is_floating_point else torch.float32):
        model = cls(cfg)
    return random_init_(model, seed)


def build_dit_shard(cfg: DiTConfig, block_range: tuple[int, int] | None, *, device: torch.device,
                    dtype: torch.dtype, checkpoint: str | None = None, seed: int = 0,
                    cuda_graphs: bool = False, spare_streams: int = 8) -> DiTShard:
    """One DiT shard (the whole model when block_range is None), loaded or random, as a stage.
    `cuda_graphs` replays steady-state steps from CUDA graphs (CUDA devices only); `spare_streams`
    closed streams' states are kept for reuse (see DiTShard)."""
    from stages.checkpoints import load_dit_checkpoint

    if checkpoint is None:
        with torch.device(device), _default_dtype(dtype):
            model = WanDiT(cfg, block_range)
        random_init_(model, seed)
    else:
        with torch.device("meta"):
            model = WanDiT(cfg, block_range)
        load_dit_checkpoint(model, checkpoint)
    return DiTShard(model, device=device, dtype=dtype, cuda_graphs=cuda_graphs, spare_streams=spare_streams)


def build_vae_models(model: str, device: torch.device, dtype: torch.dtype, *, checkpoint_dir: str | None = None,
                     weights_seed: int = 0) -> dict[str, torch.nn.Module]:
    """VAE kind -> model for a DiT preset: the Wan VAE always, TAEHV unless a release folder lacks it.

    Random weights are seeded weights_seed + 1 (Wan) and + 2 (TAEHV); on CUDA the Wan VAE's Conv3d
    weights are stored channels-last. The single-process engine and the stage actors both build here.
    """
    from stages.checkpoints import find_checkpoints, load_taehv, load_wan_vae

    vae_cfg = VAE_PRESETS["tiny" if model == "tiny" else "wan"]
    taehv_cfg = TAEHV_PRESETS["tiny" if model == "tiny" else "taew2_1"]
    if checkpoint_dir is None:
        out = {
            "wan": _build(WanVAE, vae_cfg, device, dtype, weights_seed + 1),
            "taehv": _build(TAEHV, taehv_cfg, device, dtype, weights_seed + 2),
        }
    else:
        layout = find_checkpoints(checkpoint_dir, dit=model)
        with torch.device("meta"):
            wan_vae = WanVAE(vae_cfg)
        load_wan_vae(wan_vae, layout.vae)
        out = {"wan": wan_vae}
        if layout.taehv is not None:
            with torch.device("meta"):
                taehv = TAEHV(taehv_cfg)
            load_taehv(taehv, layout.taehv)
            out["taehv"] = taehv
    if torch.device(device).type == "cuda":
        channels_last_weights_(out["wan"])
        out["wan"].use_compiled_ops()
        if "taehv" in out:
            out["taehv"].use_channels_last()
    return out


def build_models(spec: EngineSpec, dit_cfg: DiTConfig) -> EngineComponents:
    """Every component of a single-device engine: DiT (one shard), both VAEs, the text encoder."""
    from stages.checkpoints import find_checkpoints
    from stages.engine import EngineComponents
    from stages.t5 import build_text_encoder

    device, dtype = torch.device(spec.device), spec.torch_dtype
    if device.type == "cuda":
        use_cudnn_autotuning()
    checkpoint = None
    if spec.checkpoint_dir is not None:
        checkpoint = str(find_checkpoints(spec.checkpoint_dir, dit=spec.model).dit_checkpoint(spec.model))
    shard = build_dit_shard(dit_cfg, None, device=device, dtype=dtype, checkpoint=checkpoint,
                            seed=spec.weights_seed, cuda_graphs=spec.cuda_graphs and device.type == "cuda",
                            spare_streams=spec.spare_streams)
    vaes = build_vae_models(spec.model, device, dtype, checkpoint_dir=spec.checkpoint_dir,
                            weights_seed=spec.weights_seed)
    text_device = torch.device(spec.text_device or spec.device)
    text = build_text_encoder(
        spec.checkpoint_dir, device=text_device, dtype=dtype if text_device.type == "cuda" else torch.float32,
        seed=spec.weights_seed,
    )
    scaling = StreamConfig().latent_scaling
    encoders, decoders = {}, {}
    for kind, vae in vaes.items():
        vae_dtype = torch.float16 if kind == "taehv" and device.type == "cuda" else dtype
        graphs = spec.cuda_graphs and device.type == "cuda"
        spares = dict(cuda_graphs=graphs, spare_streams=spec.spare_streams)
        encoders[kind] = VAEEncodeStage(kind, vae, device, vae_dtype, scaling, **spares)
        decoders[kind] = VAEDecodeStage(kind, vae, device, vae_dtype, scaling, **spares)
    return EngineComponents(dit=LatentStreamer([shard]), encoders=encoders, decoders=decoders, text=text)
