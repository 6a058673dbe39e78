"""Model and streaming configuration: frozen, documented dataclasses, validated on construction.

Presets:
    DIT_PRESETS["wan-1.3b"]   the published Wan2.1-T2V-1.3B DiT (825 state-dict keys, 1,418,996,800 params)
    DIT_PRESETS["wan-14b"]    the published Wan2.1-T2V-14B DiT (1095 keys, 14,288,491,584 params)
    DIT_PRESETS["tiny"]       a 4-block, dim-256 DiT with the real head dim (128), for CPU tests

Derived values (tokens per latent frame, cache length) are properties, never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The published step list of the distilled StreamDiffusionV2 checkpoints; `--steps k` takes the first k.
DENOISING_STEP_LIST: tuple[int, ...] = (700, 500, 400, 200)


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan2.1 causal DiT. Attribute names follow Wan's `config.json`."""

    dim: int
    """Hidden width (1536 for 1.3B, 5120 for 14B). Must be num_heads * head_dim."""
    ffn_dim: int
    """Feed-forward width (8960 / 13824)."""
    num_heads: int
    """Attention heads (12 / 40)."""
    num_layers: int
    """Number of DiT blocks L (30 / 40)."""
    in_dim: int = 16
    """Latent channels in (the Wan VAE's z_dim)."""
    out_dim: int = 16
    """Latent channels out."""
    text_len: int = 512
    """Text tokens the T5 context is padded to."""
    text_dim: int = 4096
    """Width of the umT5-XXL encoder output."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm in the DiT."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch of the Conv3d patch embedding."""

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be a positive multiple of num_heads={self.num_heads}")
        if self.dim // self.num_heads != 128:
            raise ValueError(
                f"head dim is {self.dim // self.num_heads}; Wan's RoPE split (22/21/21 pairs) needs 128: "
                "set dim = 128 * num_heads"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers} must be >= 1")
        if self.patch_size != (1, 2, 2):
            raise ValueError(f"patch_size={self.patch_size}: only Wan's (1, 2, 2) is supported")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, height: int, width: int) -> int:
        """F: DiT tokens per latent frame for a pixel size. 480x832 -> 30*52 = 1560; 512x512 -> 1024."""
        return (height // 16) * (width // 16)


DIT_PRESETS: dict[str, DiTConfig] = {
    "wan-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "tiny": DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4),
}


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the Wan2.1 VAE (`Wan2.1_VAE.pth`: dim 96, z_dim 16)."""

    dim: int = 96
    """Base channel count of the encoder/decoder."""
    z_dim: int = 16
    """Latent channels."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per stage."""
    num_res_blocks: int = 2
    """Residual blocks per stage."""
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    """Which of the 3 downsampling stages also halve time (4x temporal compression in all)."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.z_dim < 1:
            raise ValueError(f"dim={self.dim} and z_dim={self.z_dim} must be >= 1")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per downsampling stage (len(dim_mult) - 1)")


VAE_PRESETS: dict[str, VAEConfig] = {
    "wan": VAEConfig(),
    "tiny": VAEConfig(dim=8),
}


@dataclass(frozen=True)
class StreamConfig:
    """How one stream is denoised. Defaults are the published `wan_causal_dmd_v2v.yaml`."""

    num_steps: int = 2
    """Denoising steps n (1-4): the first n entries of DENOISING_STEP_LIST."""
    noise_scale: float = 0.8
    """Initial noise strength s_init of the motion-aware controller (0 < s <= 1)."""
    num_kv_cache_frames: int = 6
    """Latent frames kept in each self-attention KV cache."""
    num_sink_frames: int = 3
    """Leading cache frames kept as attention sinks (refreshed adaptively)."""
    adapt_sink_threshold: float = 0.2
    """Refresh a sink frame when its K/V cosine similarity to the new frame drops below this; -1 = off."""
    rope_reset_frame: int = 50
    """When a slot's RoPE frame index reaches this, it jumps back to num_kv_cache_frames - 1."""
    first_chunk_frames: int = 1
    """Input frames before the first output: 1 (Weir: frame 0 alone) or 5 (the reference's 1+4 start)."""
    motion_aware_noise: bool = True
    """Adapt the noise strength to motion (spec §C); False keeps noise_scale fixed."""
    latent_scaling: str = "reference"
    """'reference': raw encoder mean into the DiT, de-normalised decode (published behaviour);
    'symmetric': normalise on encode as well (the fix)."""
    step_list: tuple[int, ...] = field(default=DENOISING_STEP_LIST)
    """Full step list the first num_steps are taken from."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_steps <= len(self.step_list):
            raise ValueError(f"num_steps={self.num_steps} must be in 1..{len(self.step_list)}")
        if not 0.0 < self.noise_scale <= 1.0:
            raise ValueError(f"noise_scale={self.noise_scale} must be in (0, 1]")
        if not 0 <= self.num_sink_frames < self.num_kv_cache_frames:
            raise ValueError(
                f"num_sink_frames={self.num_sink_frames} must be in [0, num_kv_cache_frames="
                f"{self.num_kv_cache_frames})"
            )
        if self.first_chunk_frames not in (1, 5):
            raise ValueError(f"first_chunk_frames={self.first_chunk_frames} must be 1 (Weir) or 5 (reference)")
        if self.latent_scaling not in ("reference", "symmetric"):
            raise ValueError(f"latent_scaling={self.latent_scaling!r} must be 'reference' or 'symmetric'")
        if self.rope_reset_frame <= self.num_kv_cache_frames:
            raise ValueError(f"rope_reset_frame={self.rope_reset_frame} must exceed num_kv_cache_frames")

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The step list in use, e.g. num_steps=2 -> (700, 500)."""
        return self.step_list[: self.num_steps]
