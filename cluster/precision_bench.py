"""`weir bench engine --check-precision`: bf16 vs fp32 of the DiT stream on the same random weights.

Both precisions are built from the same seeded fp32 weights (`random_init_` draws in fp32 on the CPU
and casts), fed the same prompt embedding, the same noisy latents and the same re-noising noise
(drawn in fp32 and cast), and run the prefill plus `chunks` stream steps through `LatentStreamer`;
bf16 runs the production path (CUDA graphs on when asked), fp32 runs eager with TF32 off.

Error of one output x (every emitted x0, prefill included), against the fp32 output r:
    rel_l2  = ||x - r||_2 / ||r||_2        (the gated number: target <= 1e-2)
    rel_max = max|x - r| / max|r|          (reported alongside)
A row reports the max of both over the run.
"""

from __future__ import annotations

import torch

from stages.config import DIT_PRESETS, StreamConfig
from stages.loading import build_dit_shard
from stages.stream_batch import LatentStreamer


def _run_stream(shard, *, height: int, width: int, num_steps: int, text_BST: torch.Tensor,
                latents: list[torch.Tensor], noise_seed: int) -> list[torch.Tensor]:
    """Prefill on latents[0], then one step per later latent, then drain: every x0 in fp32."""
    device, dtype = shard.device, shard.dtype
    gen = torch.Generator(device=device).manual_seed(noise_seed)

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    streamer = LatentStreamer([shard])
    streamer.open("p", height=height, width=width, stream_cfg=StreamConfig(num_steps=num_steps), noise=noise)
    streamer.set_prompt_context("p", text_BST.to(device, dtype))
    outs = [streamer.prefill("p", latents[0].to(device, dtype)).float()]
    for z in latents[1:]:
        x0 = streamer.step([("p", z.to(device, dtype), None)])[0]
        if x0 is not None:
            outs.append(x0.float())
    for _ in range(num_steps - 1):
        x0 = streamer.step([("p", None, None)])[0]
        if x0 is not None:
            outs.append(x0.float())
    streamer.close("p")
    return outs


def compare(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(max rel_l2, max rel_max) over paired outputs; see the module docstring."""
    if len(outputs) != len(reference):
        raise AssertionError(f"{len(outputs)} outputs vs {len(reference)} reference outputs")
    rel_l2 = max(((x - r).norm() / r.norm().clamp_min(1e-30)).item() for x, r in zip(outputs, reference))
    rel_max = max(((x - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                  for x, r in zip(outputs, reference))
    return rel_l2, rel_max


@torch.no_grad()
def precision_rows(*, model_name: str = "wan-1.3b", resolutions: list[tuple[int, int]] = ((480, 832),),
                   steps: list[int] = (1, 2), chunks: int = 4, device: str = "cuda", seed: int = 0,
                   cuda_graphs: bool = True, low_dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """One row per (resolution, steps): rel_l2 / rel_max of the low-precision outputs vs fp32."""
    cfg = DIT_PRESETS[model_name]
    dev = torch.device(device)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        shards = {
            torch.float32: build_dit_shard(cfg, None, device=dev, dtype=torch.float32, seed=seed),
            low_dtype: build_dit_shard(cfg, None, device=dev, dtype=low_dtype, seed=seed,
                                       cuda_graphs=cuda_graphs),
        }
        gen = torch.Generator().manual_seed(seed + 1)
        text_BST = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
        for height, width in resolutions:
            h, w = height // 8, width // 8
            latents = [torch.randn(1, cfg.in_dim, 1, h, w, generator=gen) for _ in range(1 + chunks)]
            for n in steps:
                runs = {
                    dt: _run_stream(shard, height=height, width=width, num_steps=n, text_BST=text_BST,
                                    latents=latents, noise_seed=seed + 2)
                    for dt, shard in shards.items()
                }
                rel_l2, rel_max = compare(runs[low_dtype], runs[torch.float32])
                graphs = shards[low_dtype].graphs
                rows.append(dict(
                    kind="precision", model=model_name, resolution=f"{height}x{width}", steps=n,
                    dtype=str(low_dtype).removeprefix("torch."), outputs=len(runs[low_dtype]),
                    rel_l2=rel_l2, rel_max=rel_max, ok=rel_l2 <= 1e-2,
                    cuda_graphs=None if graphs is None else graphs.stats(),
                ))
        return rows
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
