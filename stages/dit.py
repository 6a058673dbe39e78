"""The Wan2.1 causal DiT (1.3B / 14B), whole or as a contiguous shard of blocks.

Shape legend:
    B  rows (one latent frame sequence each: a stream's denoising slot)
    C  latent channels (16)        F  latent frames per row        H, W  latent height / width
    Hp, Wp  token grid (H/2, W/2)  Fp tokens per frame (Hp*Wp)     L  tokens per row (F*Fp)
    D  model width (dim)           N  heads        Dh  head dim (128)
    S  text tokens (512)           T  text width (4096)            Z  head outputs per token (64)

Module attribute names are the keys of the published checkpoints (spec B "State dict"), so a plain
`load_state_dict(strict=True)` of a published Wan2.1 causal DiT state dict (without the wrapper's
`model.` prefix) fills a `WanDiT`. A shard built with `block_range=(s, e)` keeps blocks s..e-1 under
their global indices (`blocks.5.self_attn.q.weight` stays `blocks.5...`), the patch embedding only
if s == 0 and the head only if e == L; every shard keeps the small time and text embeddings (a middle
shard recomputes them, spec D "Block modes"). `WanDiT.checkpoint_keys(cfg, block_range)` names the
keys a shard owns, and `load_checkpoint` loads a shard's slice of the full state dict unchanged.

Forward pieces (the stage composes them; per-stream state arrives through `BlockAttention`):
    embed(latents_BCFHW)                       -> x_BLD         (first shard)
    time_embeddings(timesteps_BF)              -> e_BFD, e0_BF6D
    run_blocks(x_BLD, e0_BF6D, rope, attn)     -> x_BLD         (owned blocks, in order)
    head_out(x_BLD, e_BFD, F, Hp, Wp)          -> flow_BCFHW    (last shard)
    text_embed(text_BST) / cross_kv(ctx_BSD)   -> per-block cross-attention K/V of a prompt
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stages.config import DiTConfig
from stages.fused import EAGER_OPS, BlockOps, rms_norm
from stages.rope import RopeAngles, RopeTables


class BlockAttention(Protocol):
    """What a block needs from the per-stream state: the stage implements it for a micro-batch."""

    def self_attend(
        self, block_index: int, q_BLND: torch.Tensor, k_BLND: torch.Tensor, v_BLND: torch.Tensor
    ) -> torch.Tensor:
        """Write the rows' new (rotated) K/V into their caches and attend; returns [B, L, N, Dh]."""
        ...

    def cross_attend(self, block_index: int, q_BLND: torch.Tensor) -> torch.Tensor:
        """Attend to each row's prompt K/V; returns [B, L, N, Dh]."""
        ...


def timestep_sinusoid(freq_dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """float64 [len(t), freq_dim] = [cos(t*w), sin(t*w)] with w_j = 10000^(-j/half), cos first.

    Example: freq_dim = 4, t = 0 -> [1, 1, 0, 0].
    """
    half = freq_dim // 2
    t = timesteps.to(torch.float64).flatten()
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = torch.outer(t, omega)
    return torch.cat([angle.cos(), angle.sin()], dim=1)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, normalised in float32 (Wan's q/k norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns its input's dtype (affine only where the checkpoint has weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class SelfAttention(nn.Module):
    """Causal self-attention over the row's KV cache; keys are rotated before they are cached."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self, x_BLD: torch.Tensor, rope: RopeAngles, attn: BlockAttention, block_index: int,
        ops: BlockOps = EAGER_OPS,
    ) -> torch.Tensor:
        b, num_tokens, d = x_BLD.shape
        heads = (b, num_tokens, self.num_heads, d // self.num_heads)
        cos, sin = rope.cos_BL1P, rope.sin_BL1P
        q_BLND = ops.rms_norm_rotate(self.q(x_BLD), self.norm_q.weight, self.norm_q.eps, self.num_heads, cos, sin)
        k_BLND = ops.rms_norm_rotate(self.k(x_BLD), self.norm_k.weight, self.norm_k.eps, self.num_heads, cos, sin)
        v_BLND = self.v(x_BLD).view(heads)
        out_BLND = attn.self_attend(block_index, q_BLND, k_BLND, v_BLND)
        return self.o(out_BLND.flatten(2))


class CrossAttention(nn.Module):
    """Attention to the prompt. K/V depend only on the prompt, so they are computed once per prompt."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def context_kv(self, ctx_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_BSND, v_BSND) of an embedded prompt."""
        b, s, d = ctx_BSD.shape
        heads = (b, s, self.num_heads, d // self.num_heads)
        return self.norm_k(self.k(ctx_BSD)).view(heads), self.v(ctx_BSD).view(heads)

    def forward(
        self, x_BLD: torch.Tensor, attn: BlockAttention, block_index: int, ops: BlockOps = EAGER_OPS
    ) -> torch.Tensor:
        b, num_tokens, d = x_BLD.shape
        q_BLD = ops.rms_norm(self.q(x_BLD), self.norm_q.weight, self.norm_q.eps)
        q_BLND = q_BLD.view(b, num_tokens, self.num_heads, d // self.num_heads)
        return self.o(attn.cross_attend(block_index, q_BLND).flatten(2))


class WanBlock(nn.Module):
    """Pre-norm adaLN block: self-attention, cross-attention, FFN (spec B step 4).

    `ops` (stages.fused) holds the elementwise pieces: eager by default, compiled on CUDA
    (`WanDiT.use_ops`). It is configuration, not weights or per-stream state.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.ops: BlockOps = EAGER_OPS

    def forward(
        self,
        x_BLD: torch.Tensor,
        e0_BF6D: torch.Tensor,
        rope: RopeAngles,
        attn: BlockAttention,
        block_index: int,
    ) -> torch.Tensor:
        ops = self.ops  # modulation is broadcast per latent frame: each chunk is [B, F, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation[:, None] + e0_BF6D).chunk(6, dim=2)

        h_BLD = ops.modulate(x_BLD, shift1, scale1, self.norm1.eps)
        x_BLD, n_BLD = ops.gated_residual_norm(  # x += self-attention * gate1; n = norm3(x)
            x_BLD, self.self_attn(h_BLD, rope, attn, block_index, ops), gate1,
            self.norm3.weight, self.norm3.bias, self.norm3.eps,
        )
        x_BLD, h_BLD = ops.residual_modulate(  # x += cross-attention(n); h = adaLN2(x)
            x_BLD, self.cross_attn(n_BLD, attn, block_index, ops), shift2, scale2, self.norm2.eps
        )
        return ops.gated_residual(x_BLD, ops.ffn(h_BLD, self.ffn[0], self.ffn[2]), gate2)


class WanHead(nn.Module):
    """adaLN output head: Linear(D -> prod(patch) * out_dim = 64) on the modulated LayerNorm."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x_BLD: torch.Tensor, e_BFD: torch.Tensor) -> torch.Tensor:
        """Returns [B, F, Fp, Z]."""
        num_frames = e_BFD.shape[1]
        shift, scale = (self.modulation[:, None] + e_BFD[:, :, None]).chunk(2, dim=2)
        h_BFPD = self.norm(x_BLD).unflatten(1, (num_frames, x_BLD.shape[1] // num_frames))
        return self.head(h_BFPD * (1 + scale) + shift)


class WanDiT(nn.Module):
    """Wan2.1 causal DiT or a shard of it.

    Args:
        cfg: model shape (see DIT_PRESETS).
        block_range: (start, end) of the blocks this shard holds, 0 <= start < end <= num_layers;
            None = all blocks. Example: L = 30 split in 3 -> (0, 10), (10, 20), (20, 30); the middle
            shard holds `blocks.10` .. `blocks.19` plus the time/text embeddings.
    """

    def __init__(self, cfg: DiTConfig, block_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        start, end = self.check_block_range(cfg, block_range)
        self.cfg = cfg
        self.block_range = (start, end)
        d = cfg.dim
        if start == 0:
            self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleDict({str(i): WanBlock(cfg) for i in range(start, end)})
        if end == cfg.num_layers:
            self.head = WanHead(cfg)
        self._rope_by_device: dict[torch.device, RopeTables] = {}  # constants, not per-stream state

    # ---- shard geometry and checkpoints ------------------------------------------------------

    @staticmethod
    def check_block_range(cfg: DiTConfig, block_range: tuple[int, int] | None) -> tuple[int, int]:
        start, end = block_range if block_range is not None else (0, cfg.num_layers)
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(
                f"block_range={block_range} must satisfy 0 <= start < end <= num_layers={cfg.num_layers}"
            )
        return int(start), int(end)

    @property
    def is_first(self) -> bool:
        return self.block_range[0] == 0

    @property
    def is_last(self) -> bool:
        return self.block_range[1] == self.cfg.num_layers

    @property
    def block_indices(self) -> range:
        return range(*self.block_range)

    @classmethod
    def checkpoint_keys(cls, cfg: DiTConfig, block_range: tuple[int, int] | None = None) -> list[str]:
        """State-dict keys a shard owns, in checkpoint order (built on the meta device: no memory)."""
        with torch.device("meta"):
            return list(cls(cfg, block_range).state_dict().keys())

    def shard_state_dict(self, full_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The slice of a full-model state dict this shard owns (keys unchanged)."""
        own = self.state_dict().keys()
        return {k: v for k, v in full_state_dict.items() if k in own}

    def load_checkpoint(self, full_state_dict: dict[str, torch.Tensor]) -> None:
        """Strictly load this shard's slice of a full-model state dict (stages.checkpoints does the
        checking: missing and mis-shaped keys, and any key outside the published layout, are a
        CheckpointError naming them; other shards' blocks are skipped)."""
        from stages.checkpoints import load_dit_state_dict

        load_dit_state_dict(self, full_state_dict)

    def use_ops(self, ops: BlockOps) -> None:
        """Run every owned block's elementwise pieces through `ops` (stages.fused: eager or compiled)."""
        for block in self.blocks.values():
            block.ops = ops

    def rope_tables(self, device: torch.device) -> RopeTables:
        tables = self._rope_by_device.get(device)
        if tables is None:
            tables = RopeTables(self.cfg.head_dim, device=device)
            self._rope_by_device[device] = tables
        return tables

    def embed(self, latents_BCFHW: torch.Tensor) -> torch.Tensor:
        """Patch-embed latents into tokens ordered frame -> row -> column: [B, F*Hp*Wp, D], contiguous.

        The conv's output is [B, D, F, Hp, Wp]; its token-major transpose is made contiguous once here.
        Left strided, every block's pieces would keep that layout (compiled pointwise kernels follow
        their input's strides), and each LayerNorm over D would read with a stride of L elements.
        """
        if not self.is_first:
            raise RuntimeError(
                f"shard {self.block_range} has no patch embedding (only the first shard embeds)"
            )
        return self.patch_embedding(latents_BCFHW).flatten(2).transpose(1, 2).contiguous()

    def time_embeddings(self, timesteps_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_BFD, e0_BF6D): per-row, per-frame time embedding and its 6-way adaLN projection."""
        b, f = timesteps_BF.shape
        weight = self.time_embedding[0].weight
        sinus = timestep_sinusoid(self.cfg.freq_dim, timesteps_BF.to(weight.device)).to(weight.dtype)
        e = self.time_embedding(sinus)
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e.unflatten(0, (b, f)), e0.unflatten(0, (b, f))

    def run_blocks(
        self, x_BLD: torch.Tensor, e0_BF6D: torch.Tensor, rope: RopeAngles, attn: BlockAttention
    ) -> torch.Tensor:
        """Run the owned blocks in order."""
        for index in self.block_indices:
            x_BLD = self.blocks[str(index)](x_BLD, e0_BF6D, rope, attn, index)
        return x_BLD

    def head_out(
        self, x_BLD: torch.Tensor, e_BFD: torch.Tensor, grid_fhw: tuple[int, int, int]
    ) -> torch.Tensor:
        """Head + unpatchify to the predicted flow [B, out_dim, F, 2*Hp, 2*Wp].

        Token (f, i, j) carries a 1x2x2 patch of out_dim channels laid out as (p, q, r, c); pixel
        (f, 2i+q, 2j+r) of channel c comes from it (the reference's 'fhwpqrc->cfphqwr').
        """
        if not self.is_last:
            raise RuntimeError(f"shard {self.block_range} has no head (only the last shard predicts)")
        f, hp, wp = grid_fhw
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        b = x_BLD.shape[0]
        patches = self.head(x_BLD, e_BFD).reshape(b, f, hp, wp, pt, ph, pw, c)
        return patches.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f * pt, hp * ph, wp * pw)

    def text_embed(self, text_BST: torch.Tensor) -> torch.Tensor:
        """Zero-pad the T5 output to text_len tokens and embed it: [B, S, D]. No mask: the padded
        (zero) tokens are attended to, as in the reference.
        """
        b, s, t = text_BST.shape
        if s > self.cfg.text_len or t != self.cfg.text_dim:
            raise ValueError(
                f"text embeddings {tuple(text_BST.shape)} must be [B, <= {self.cfg.text_len}, "
                f"{self.cfg.text_dim}]"
            )
        weight = self.text_embedding[0].weight
        text_BST = text_BST.to(device=weight.device, dtype=weight.dtype)
        if s < self.cfg.text_len:
            text_BST = F.pad(text_BST, (0, 0, 0, self.cfg.text_len - s))
        return self.text_embedding(text_BST)

    def cross_kv(self, ctx_BSD: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention (k_BSND, v_BSND) of an embedded prompt for every owned block."""
        return {i: self.blocks[str(i)].cross_attn.context_kv(ctx_BSD) for i in self.block_indices}
