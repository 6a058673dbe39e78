"""The published reference pipeline, assembled by hand as a CPU numerical oracle (spec H).

The stock wrappers load real checkpoint folders and the 5.7B-parameter T5 encoder, so the oracle
builds `CausalStreamInferencePipeline` without its __init__, attaches a hand-built diffusion wrapper
around a `CausalWanModel` holding the SAME weights as a Weir `WanDiT`, and a stub text encoder that
returns fixed [1, 512, 4096] embeddings. Build a fresh oracle per test: the reference keeps its
eviction queues on the attention modules and never resets them.

`run_reference_stream` drives it the way the reference's single-GPU session loop does (prefill at
tokens [0, 2F), then one `inference_stream` per chunk with the RoPE reset at frame 50), drawing all
re-noising noise from the global RNG seeded with `noise_seed`.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch

from cluster.reference_bench import assemble_reference_pipeline
from stages.config import DiTConfig, StreamConfig

reference = pytest.importorskip(
    "models.wan.causal_stream_inference", reason="reference package not installed"
)


@dataclass
class ReferenceRun:
    prefill_x0_BCFHW: torch.Tensor
    emitted: list[torch.Tensor | None]
    """Per stream step: slot n-1's x0 [1, C, 1, H, W] once processed >= n, else None."""
    pipeline: object


def build_reference_pipeline(
    cfg: DiTConfig,
    state_dict: dict[str, torch.Tensor],
    text_embeds_BST: torch.Tensor,
    *,
    height: int,
    width: int,
    stream_cfg: StreamConfig,
):
    """A CPU fp32 reference pipeline with the given DiT weights; height/width in pixels."""
    from models.wan.causal_model import CausalWanModel
    from models.wan.flow_match import FlowMatchScheduler
    from models.wan.wan_wrapper import CausalWanDiffusionWrapper

    model = CausalWanModel(
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        in_dim=cfg.in_dim,
        out_dim=cfg.out_dim,
        text_len=cfg.text_len,
        freq_dim=cfg.freq_dim,
        eps=cfg.eps,
    )
    model.load_state_dict(state_dict, strict=True)
    model.eval().requires_grad_(False)

    names = types.SimpleNamespace(
        Wrapper=CausalWanDiffusionWrapper, Pipeline=reference.CausalStreamInferencePipeline,
        FlowMatchScheduler=FlowMatchScheduler,
    )
    return assemble_reference_pipeline(names, model, cfg, height=height, width=width, stream_cfg=stream_cfg,
                                       text_BST=text_embeds_BST, device=torch.device("cpu"))


@torch.no_grad()
def run_reference_stream(
    pipe,
    prefill_latents_BCFHW: torch.Tensor,
    chunks_BCFHW: list[torch.Tensor],
    current_steps: list[int],
    *,
    noise_seed: int,
    rope_reset_frame: int = 50,
) -> ReferenceRun:
    """Prefill on 2 latent frames, then one stream step per chunk, as the reference's session loop."""
    fp = pipe.frame_seq_length
    torch.manual_seed(noise_seed)
    num_frames = prefill_latents_BCFHW.shape[2]
    x0 = pipe.prepare(
        text_prompts=["weir"],
        device="cpu",
        dtype=torch.float32,
        noise=prefill_latents_BCFHW.transpose(1, 2).contiguous(),
        current_start=0,
        current_end=num_frames * fp,
    )
    n = len(pipe.denoising_step_list)
    start = num_frames * fp
    emitted: list[torch.Tensor | None] = []
    for k, (chunk, step) in enumerate(zip(chunks_BCFHW, current_steps)):
        if start // fp >= rope_reset_frame:
            start = pipe.kv_cache_length - fp
        out = pipe.inference_stream(
            noise=chunk.transpose(1, 2).contiguous(),
            current_start=start,
            current_end=start + fp,
            current_step=step,
        )
        emitted.append(out[[-1]].transpose(1, 2).clone() if k + 1 >= n else None)
        start += fp
    return ReferenceRun(prefill_x0_BCFHW=x0.transpose(1, 2).clone(), emitted=emitted, pipeline=pipe)


def reference_key_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference CausalWanModel built on the meta device."""
    from models.wan.causal_model import CausalWanModel

    with torch.device("meta"):
        model = CausalWanModel(
            dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
