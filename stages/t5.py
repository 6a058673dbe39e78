"""The umT5-XXL text encoder (encoder half only) and the prompt -> embedding front end.

Legend: B batch, L tokens (text_len, 512), D model width (4096), N heads (64), E head dim (64),
K relative-position buckets (32), V vocabulary (256384).

    ids_BL --token_embedding--> x_BLD
    for each of the 24 blocks (pre-norm, each with its OWN relative position bias):
        x_BLD += o(softmax(q k^T + bias_BNLL + pad_mask) v)      unscaled attention (T5: no 1/sqrt(E))
        x_BLD += fc2(fc1(norm2(x)) * gelu_tanh(gate(norm2(x))))    gated FFN, no biases anywhere
    x_BLD = norm(x_BLD)                                            T5 RMSNorm (no mean, no bias), eps 1e-6

Module attribute names are exactly the keys of the published `models_t5_umt5-xxl-enc-bf16.pth`
(242 keys), so `stages.checkpoints.load_t5` loads it strictly:

    token_embedding.weight                   [V, D]
    blocks.{i}.norm1.weight                  [D]
    blocks.{i}.attn.{q,k,v,o}.weight         [N*E, D] ([D, N*E] for o)
    blocks.{i}.norm2.weight                  [D]
    blocks.{i}.ffn.gate.0.weight             [ffn, D]
    blocks.{i}.ffn.fc1.weight                [ffn, D]
    blocks.{i}.ffn.fc2.weight                [D, ffn]
    blocks.{i}.pos_embedding.embedding.weight [K, N]
    norm.weight                              [D]

Relative position buckets (bidirectional, K=32, max distance 128), for rel = key_pos - query_pos:
half = K/2 = 16 buckets per direction, the upper half for rel > 0; |rel| < 8 gets its own bucket;
8 <= |rel| < 128 is binned logarithmically into buckets 8..15; everything further shares bucket 15.
Worked example: rel = +20 -> 16 + 8 + int(log(20/8) / log(128/8) * 8) = 16 + 8 + 2 = 26.

The front end (`TextEncoder`) cleans the prompt (ftfy, HTML-unescape twice, collapse whitespace),
tokenizes with the tokenizer shipped next to the weights (padded/truncated to 512, `</s>` appended),
runs the encoder, zeroes every output row past the true token count and returns `[1, 512, D]`.
An LRU cache keyed on the cleaned prompt makes a repeated prompt free. `RandomTextEncoder` is a
deterministic stand-in with the same interface for tests and benchmarks without weights.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 encoder. Defaults are umT5-XXL as shipped with Wan2.1."""

    vocab_size: int = 256384
    """Rows of the token embedding."""
    dim: int = 4096
    """Model width D (the DiT's `text_dim`)."""
    num_heads: int = 64
    """Attention heads N."""
    head_dim: int = 64
    """Per-head width E; the attention width N*E need not equal D."""
    ffn_dim: int = 10240
    """Hidden width of the gated feed-forward."""
    num_layers: int = 24
    """Encoder blocks, each with its own relative position bias table."""
    num_buckets: int = 32
    """Relative position buckets K (both directions together)."""
    max_distance: int = 128
    """Distances at or beyond this share the last bucket of their direction."""
    eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    text_len: int = 512
    """Tokens every prompt is padded/truncated to."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_heads", "head_dim", "ffn_dim", "num_layers", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets={self.num_buckets} must be an even number >= 4 (bidirectional)")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(
                f"max_distance={self.max_distance} must exceed num_buckets/4={self.num_buckets // 4} "
                "(the exact-distance buckets)"
            )

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count. umt5-xxl: 1,050,148,864 embedding + 24 * 192,948,224 + 4,096 = 5,680,910,336."""
        per_block = (
            4 * self.dim * self.attn_dim
            + 3 * self.dim * self.ffn_dim
            + 2 * self.dim
            + self.num_buckets * self.num_heads
        )
        return self.vocab_size * self.dim + self.num_layers * per_block + self.dim


T5_PRESETS: dict[str, T5Config] = {
    "umt5-xxl": T5Config(),
    "tiny": T5Config(vocab_size=512, dim=64, num_heads=4, head_dim=16, ffn_dim=128, num_layers=2),
}


# ---------------------------------------------------------------------------------------------- modules


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written out: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GeluTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class T5RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, statistics in fp32; no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_f32 = x_BLD.float()
        y_BLD = x_f32 * torch.rsqrt(x_f32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y_BLD = y_BLD.to(self.weight.dtype)
        return self.weight * y_BLD


def relative_position_buckets(
    len_q: int, len_k: int, *, num_buckets: int, max_distance: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bidirectional T5 bucket index [len_q, len_k] of rel = key_pos - query_pos (see module docstring)."""
    rel_QK = torch.arange(len_k, device=device)[None, :] - torch.arange(len_q, device=device)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    bucket_QK = (rel_QK > 0).long() * half
    dist_QK = rel_QK.abs()
    # log binning for the far range; the clamp only keeps log() finite where the exact branch wins anyway
    far = dist_QK.clamp(min=1).float() / max_exact
    far_bucket_QK = (
        max_exact + (torch.log(far) / math.log(max_distance / max_exact) * (half - max_exact)).long()
    )
    far_bucket_QK = far_bucket_QK.clamp(max=half - 1)
    return bucket_QK + torch.where(dist_QK < max_exact, dist_QK, far_bucket_QK)


class T5RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head); `forward(buckets_QK)` gives the additive bias [1, N, Q, K]."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets_QK: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets_QK).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention without biases and without the 1/sqrt(E) scale (T5 convention)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        attn_dim = num_heads * head_dim
        self.q = nn.Linear(dim, attn_dim, bias=False)
        self.k = nn.Linear(dim, attn_dim, bias=False)
        self.v = nn.Linear(dim, attn_dim, bias=False)
        self.o = nn.Linear(attn_dim, dim, bias=False)

    def forward(self, x_BLD: torch.Tensor, bias_BNLL: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q_BNLE = self.q(x_BLD).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k_BNLE = self.k(x_BLD).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        v_BNLE = self.v(x_BLD).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        out_BNLE = F.scaled_dot_product_attention(q_BNLE, k_BNLE, v_BNLE, attn_mask=bias_BNLL, scale=1.0)
        return self.o(out_BNLE.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


class T5GatedFFN(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential so its key is `gate.0.weight`."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False), GeluTanh())
        self.fc1 = nn.Linear(dim, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x_BLD) * self.gate(x_BLD))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # fp16 activations of T5 overflow; clamp just inside the finite range (no host sync: always applied)
    if x.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        return x.clamp(-limit, limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5GatedFFN(cfg.dim, cfg.ffn_dim)
        self.pos_embedding = T5RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(
        self, x_BLD: torch.Tensor, buckets_LL: torch.Tensor, pad_B11L: torch.Tensor | None
    ) -> torch.Tensor:
        bias_1NLL = self.pos_embedding(buckets_LL).to(x_BLD.dtype)
        # padded keys get exactly finfo.min (not bias + min, which overflows to -inf in bf16): a row with
        # no real key then stays finite, and the caller zeroes it anyway
        bias_BNLL = (
            bias_1NLL if pad_B11L is None else bias_1NLL.masked_fill(pad_B11L, torch.finfo(x_BLD.dtype).min)
        )
        x_BLD = _clamp_fp16(x_BLD + self.attn(self.norm1(x_BLD), bias_BNLL))
        return _clamp_fp16(x_BLD + self.ffn(self.norm2(x_BLD)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack. `forward(ids_BL, mask_BL) -> x_BLD` (padded rows are NOT zeroed here)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random T5 init (only for random-weight models; checkpoints overwrite everything)."""
        cfg = self.cfg
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        for block in self.blocks:
            nn.init.ones_(block.norm1.weight)
            nn.init.ones_(block.norm2.weight)
            nn.init.normal_(block.attn.q.weight, std=(cfg.dim * cfg.attn_dim) ** -0.5)
            nn.init.normal_(block.attn.k.weight, std=cfg.dim**-0.5)
            nn.init.normal_(block.attn.v.weight, std=cfg.dim**-0.5)
            nn.init.normal_(block.attn.o.weight, std=cfg.attn_dim**-0.5)
            nn.init.normal_(block.ffn.gate[0].weight, std=cfg.dim**-0.5)
            nn.init.normal_(block.ffn.fc1.weight, std=cfg.dim**-0.5)
            nn.init.normal_(block.ffn.fc2.weight, std=cfg.ffn_dim**-0.5)
            nn.init.normal_(
                block.pos_embedding.embedding.weight, std=(cfg.num_buckets * cfg.num_heads) ** -0.5
            )
        nn.init.ones_(self.norm.weight)

    def forward(self, ids_BL: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids. `mask_BL` (1 = real token) keeps every query from attending to padding keys."""
        B, L = ids_BL.shape
        x_BLD = self.token_embedding(ids_BL)
        buckets_LL = relative_position_buckets(
            L, L, num_buckets=self.cfg.num_buckets, max_distance=self.cfg.max_distance, device=ids_BL.device
        )
        pad_B11L = None if mask_BL is None else (mask_BL.view(B, 1, 1, L) == 0)
        for block in self.blocks:
            x_BLD = block(x_BLD, buckets_LL, pad_B11L)
        return self.norm(x_BLD)


# ------------------------------------------------------------------------------------------- front end


_WHITESPACE = re.compile(r"\s+")


def collapse_whitespace(text: str) -> str:
    """Runs of whitespace -> one space, stripped: 'a \n\t b ' -> 'a b'."""
    return _WHITESPACE.sub(" ", text).strip()


def clean_prompt(text: str) -> str:
    """The reference's 'whitespace' cleaning: ftfy fix, HTML-unescape twice, collapse whitespace, strip.

    >>> clean_prompt("a  &amp;amp; b\\n")
    'a & b'
    """
    try:
        import ftfy
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the umT5 text encoder needs ftfy: pip install 'weir[text]'") from exc

    return collapse_whitespace(html.unescape(html.unescape(ftfy.fix_text(text))).strip())


def load_tokenizer(folder: str | Path):
    """The Hugging Face tokenizer saved in `folder` (e.g. `.../google/umt5-xxl/`); never downloads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} does not exist (expected the umt5-xxl tokenizer files)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@dataclass(frozen=True)
class PromptCacheStats:
    hits: int
    """Prompts answered from the cache."""
    misses: int
    """Prompts that ran the encoder."""
    size: int
    """Prompts cached now."""
    capacity: int
    """Most prompts kept (least recently used dropped first)."""


class PromptEncoder(Protocol):
    """What the engine needs from a text encoder."""

    dim: int
    text_len: int

    def encode(self, prompt: str) -> torch.Tensor: ...

    def cache_stats(self) -> PromptCacheStats: ...


class _PromptCache:
    """A thread-safe LRU of cleaned prompt -> embedding with hit/miss counters."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache_size={capacity} must be >= 0 (0 disables the prompt cache)")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def stats(self) -> PromptCacheStats:
        with self._lock:
            return PromptCacheStats(self.hits, self.misses, len(self._entries), self.capacity)


class _CachedPromptEncoder:
    """Shared front: clean, look up the cache, else `_compute(cleaned)`. Results are shared: don't mutate."""

    dim: int
    text_len: int

    def __init__(self, cache_size: int) -> None:
        self._cache = _PromptCache(cache_size)

    def clean(self, prompt: str) -> str:
        return clean_prompt(prompt)

    def encode(self, prompt: str) -> torch.Tensor:
        """Embedding [1, text_len, dim] of `prompt`, rows past its token count zero. Cached by cleaned text."""
        cleaned = self.clean(prompt)
        cached = self._cache.get(cleaned)
        if cached is not None:
            return cached
        context_1LD = self._compute(cleaned)
        self._cache.put(cleaned, context_1LD)
        return context_1LD

    __call__ = encode

    def _compute(self, cleaned: str) -> torch.Tensor:
        raise NotImplementedError

    def cache_stats(self) -> PromptCacheStats:
        return self._cache.stats()

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @property
    def cache_misses(self) -> int:
        return self._cache.misses


class TextEncoder(_CachedPromptEncoder):
    """Prompt -> umT5 embedding [1, text_len, D] on the encoder's own device and dtype.

    The encoder may live on the CPU or on another GPU than the DiT; the caller moves the (small) result.
    Build from the published files with `TextEncoder.from_files(t5_path, tokenizer_dir, ...)`.
    """

    def __init__(self, model: UMT5Encoder, tokenizer, *, cache_size: int = 64) -> None:
        super().__init__(cache_size)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dim = model.cfg.dim
        self.text_len = model.cfg.text_len

    @classmethod
    def from_files(
        cls,
        t5_path: str | Path,
        tokenizer_dir: str | Path,
        *,
        cfg: T5Config = T5_PRESETS["umt5-xxl"],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        cache_size: int = 64,
    ) -> TextEncoder:
        """Build on the meta device, load the checkpoint strictly (cast to `dtype`), move to `device`."""
        from stages.checkpoints import load_t5

        with torch.device("meta"):
            model = UMT5Encoder(cfg)
        model.to(dtype=dtype)
        load_t5(model, t5_path)
        return cls(model.to(device), load_tokenizer(tokenizer_dir), cache_size=cache_size)

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    def tokenize(self, cleaned: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_1L, mask_1L) of an already cleaned prompt: `</s>` appended, padded/truncated to text_len."""
        batch = self.tokenizer(
            [cleaned],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def _compute(self, cleaned: str) -> torch.Tensor:
        ids_1L, mask_1L = self.tokenize(cleaned)
        ids_1L, mask_1L = ids_1L.to(self.device), mask_1L.to(self.device)
        context_1LD = self.model(ids_1L, mask_1L)
        # zero every row past the true length (token count = mask sum; padding is always on the right)
        context_1LD = context_1LD * mask_1L.unsqueeze(-1).to(context_1LD.dtype)
        return context_1LD


class RandomTextEncoder(_CachedPromptEncoder):
    """STAND-IN, NOT A MODEL: a seeded random embedding per prompt, for tests and benchmarks without weights.

    Deterministic across processes and machines: seed = blake2b(seed, cleaned prompt); the pseudo token
    count is (number of words + 1), capped at text_len; rows past it are zero. E.g. "a red fox" -> rows
    0..3 drawn from N(0, std^2), rows 4..511 zero.
    """

    def __init__(
        self,
        *,
        dim: int = 4096,
        text_len: int = 512,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        std: float = 0.1,
        cache_size: int = 64,
    ) -> None:
        super().__init__(cache_size)
        if dim < 1 or text_len < 1:
            raise ValueError(f"dim={dim} and text_len={text_len} must be >= 1")
        self.dim = dim
        self.text_len = text_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.std = std

    def clean(self, prompt: str) -> str:
        # whitespace only: the stand-in needs neither ftfy nor transformers
        return collapse_whitespace(prompt)

    def pseudo_length(self, cleaned: str) -> int:
        return min(len(cleaned.split()) + 1, self.text_len)

    def _compute(self, cleaned: str) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed}\x00{cleaned}".encode(), digest_size=8).digest()
        generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        num_tokens = self.pseudo_length(cleaned)
        context_1LD = torch.zeros(1, self.text_len, self.dim)
        context_1LD[:, :num_tokens] = torch.randn(1, num_tokens, self.dim, generator=generator) * self.std
        return context_1LD.to(device=self.device, dtype=self.dtype)


def build_text_encoder(
    checkpoint_dir: str | Path | None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    cache_size: int = 64,
    seed: int = 0,
) -> TextEncoder | RandomTextEncoder:
    """The real umT5-XXL encoder from a release folder, or the `RandomTextEncoder` stand-in when None."""
    if checkpoint_dir is None:
        return RandomTextEncoder(device=device, dtype=dtype, seed=seed, cache_size=cache_size)
    from stages.checkpoints import find_checkpoints

    layout = find_checkpoints(checkpoint_dir, dit=None)
    return TextEncoder.from_files(
        layout.t5, layout.tokenizer_dir, device=device, dtype=dtype, cache_size=cache_size
    )
