"""Strict loaders for the published Wan2.1 / StreamDiffusionV2 files, and the release folder layout.

Every loader compares the file's keys and shapes with the model's `state_dict()` BEFORE touching the
model and raises `CheckpointError` naming each missing, unexpected and mis-shaped key. There is no
non-strict retry: the reference retries a failed strict load with strict=False and only logs a
warning, which turns a wrong file into a silently half-random model. Weir fails loudly instead.

    file                                   loader                 what it holds
    ckpts/wan_causal_dmd_v2v/model.pt      load_dit_checkpoint    {generator | generator_ema | state_dict: sd}
                                                                  or sd; keys with or without `model.`
    Wan2.1_VAE.pth                         load_wan_vae           raw sd, 194 keys (fp32)
    models_t5_umt5-xxl-enc-bf16.pth        load_t5                raw sd, 242 keys (bf16, cast to the model)
    taew2_1.pth                            load_taehv             raw sd of the tiny Wan decoder/encoder

A DiT *shard* (a WanDiT holding only some blocks, under their global indices) loads the same
model.pt: file keys the shard does not own are skipped, as long as they belong to the full model's
published layout (`dit_state_dict_shapes`); a key that belongs to no part of the full model is an error.

Models built on the meta device are loaded with `assign=True` (the file's tensors become the
parameters, cast to the model's dtype), so a 5.7B-parameter T5 never exists twice in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stages.config import DiTConfig
from stages.errors import CheckpointError

logger = logging.getLogger(__name__)

DIT_WRAPPER_ENTRIES: tuple[str, ...] = ("generator", "generator_ema", "state_dict")
"""Entries of a training checkpoint that hold the DiT weights, in order of preference."""

_DIT_PREFIX = "model."
_FSDP_INFIX = "_fsdp_wrapped_module."
_LISTED = 8
"""Keys named in an error message per category (the exception's lists hold all of them)."""


@dataclass(frozen=True)
class LoadReport:
    """What a successful load did (for logs and tests)."""

    path: str | None
    """File loaded, or None for an in-memory state dict."""
    num_loaded: int
    """Tensors copied or assigned into the model."""
    num_skipped: int = 0
    """File keys owned by other DiT shards (0 for a full model)."""
    entry: str | None = None
    """Wrapper entry the weights came from ('generator', ...), None for a bare state dict."""
    stripped: tuple[str, ...] = ()
    """Key prefixes removed (e.g. 'model.')."""


# --------------------------------------------------------------------------------------------- reading


def load_file(path: str | Path, *, allow_pickle: bool = False) -> object:
    """The object stored in a `.pt`/`.pth` (or the tensors of a `.safetensors`), on the CPU.

    `.pt`/`.pth` go through `torch.load(weights_only=True)`, memory-mapped when the file format allows.
    A file that needs arbitrary unpickling is refused unless `allow_pickle=True` (only for files you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist", path=str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path), device="cpu")
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, so it cannot be loaded with "
                f"weights_only=True ({exc}). If you trust the file, pass allow_pickle=True.",
                path=str(path),
            ) from exc
        logger.warning("loading %s with full unpickling (allow_pickle=True)", path)
        return _torch_load(path, weights_only=False)


def _torch_load(path: Path, *, weights_only: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        # legacy (pre-zipfile) torch.save format cannot be memory-mapped; anything else is a real error
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a `.pt`/`.pth`/`.safetensors` file; CheckpointError otherwise."""
    obj = load_file(path, allow_pickle=allow_pickle)
    return _as_state_dict(obj, path=str(path))


def _as_state_dict(obj: object, *, path: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path or 'state dict'} holds a {type(obj).__name__}, not a state dict", path=path
        )
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in obj.items()
        if not (isinstance(k, str) and torch.is_tensor(v))
    ]
    if bad:
        raise CheckpointError(
            f"{path or 'state dict'} is not a flat name -> tensor mapping; offending entries: {_listing(bad)}",
            unexpected=[str(b) for b in bad],
            path=path,
        )
    return dict(obj)


# --------------------------------------------------------------------------------------- strict loading


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    path: str | None = None,
    assign: bool | None = None,
    what: str | None = None,
) -> LoadReport:
    """Load `state_dict` into `model` only if keys and shapes match exactly; CheckpointError otherwise.

    Floating-point tensors are cast to the dtype of the model tensor they replace. `assign=None` means
    "assign when the model has meta tensors" (then the file's tensors become the parameters).
    """
    expected = model.state_dict(keep_vars=True)
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    _check(model, state_dict, expected, missing=missing, unexpected=unexpected, path=path, what=what)
    _load_matched(model, state_dict, expected, assign=assign)
    return LoadReport(path=path, num_loaded=len(expected))


def _check(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    missing: list[str],
    unexpected: list[str],
    path: str | None,
    what: str | None,
) -> None:
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        shapes = [f"{k} (file {list(f)} vs model {list(m)})" for k, f, m in mismatched]
        parts.append(f"{len(mismatched)} mis-shaped tensor(s): {_listing(shapes)}")
    source = path or "the state dict"
    target = what or type(model).__name__
    raise CheckpointError(
        f"{source} does not match {target}: " + "; ".join(parts) + " (Weir loads strictly; fix the file or "
        "the model config, there is no non-strict fallback)",
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        path=path,
    )


def _load_matched(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    assign: bool | None,
) -> None:
    if assign is None:
        assign = any(t.is_meta for t in expected.values())
    cast = {}
    for k, target in expected.items():
        tensor = state_dict[k]
        if tensor.is_floating_point() and target.is_floating_point() and tensor.dtype != target.dtype:
            tensor = tensor.to(target.dtype)
        cast[k] = tensor
    # keys and shapes were checked above, so strict=True cannot fail on names here
    model.load_state_dict(cast, strict=True, assign=assign)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


# --------------------------------------------------------------------------------------------- the DiT


def dit_state_dict_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the published Wan2.1 DiT state dict with its shape: 27 per block + 15 others.

    wan-1.3b: 30 * 27 + 15 = 825 keys, 1,418,996,800 parameters; wan-14b: 1095 keys, 14,288,491,584.
    """
    d, f = cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_dim, pt, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        shapes[f"{b}.modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                shapes[f"{b}.{attn}.{proj}.weight"] = (d, d)
                shapes[f"{b}.{attn}.{proj}.bias"] = (d,)
            shapes[f"{b}.{attn}.norm_q.weight"] = (d,)
            shapes[f"{b}.{attn}.norm_k.weight"] = (d,)
        shapes[f"{b}.norm3.weight"] = (d,)
        shapes[f"{b}.norm3.bias"] = (d,)
        shapes[f"{b}.ffn.0.weight"] = (f, d)
        shapes[f"{b}.ffn.0.bias"] = (f,)
        shapes[f"{b}.ffn.2.weight"] = (d, f)
        shapes[f"{b}.ffn.2.bias"] = (d,)
    shapes["head.modulation"] = (1, 2, d)
    shapes["head.head.weight"] = (cfg.out_dim * pt * ph * pw, d)
    shapes["head.head.bias"] = (cfg.out_dim * pt * ph * pw,)
    return shapes


def unwrap_dit_state_dict(
    obj: object, *, path: str | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The DiT state dict inside a StreamDiffusionV2 `model.pt` object, with wrapper prefixes removed.

    1. A dict holding 'generator', else 'generator_ema', else 'state_dict' -> that entry; else the object.
    2. Every '_fsdp_wrapped_module.' is removed, then one leading 'model.'.
       'model.blocks.0.ffn.0.weight' -> 'blocks.0.ffn.0.weight'.
    The returned report carries `entry` and `stripped` (num_loaded is 0 until loaded).
    """
    entry = None
    if isinstance(obj, Mapping):
        for name in DIT_WRAPPER_ENTRIES:
            if name in obj:
                entry, obj = name, obj[name]
                break
    state_dict = _as_state_dict(obj, path=path)
    stripped: set[str] = set()
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = key
        if _FSDP_INFIX in new:
            new = new.replace(_FSDP_INFIX, "")
            stripped.add(_FSDP_INFIX)
        if new.startswith(_DIT_PREFIX):
            new = new[len(_DIT_PREFIX) :]
            stripped.add(_DIT_PREFIX)
        if new in renamed:
            raise CheckpointError(
                f"{path or 'state dict'}: key {key!r} collides with another key as {new!r} after removing "
                "wrapper prefixes",
                unexpected=[key],
                path=path,
            )
        renamed[new] = tensor
    return renamed, LoadReport(path=path, num_loaded=0, entry=entry, stripped=tuple(sorted(stripped)))


def load_dit_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, object],
    *,
    full_model_keys: Iterable[str] | None = None,
    allow_pickle: bool = False,
    assign: bool | None = None,
) -> LoadReport:
    """Load a StreamDiffusionV2 `model.pt` (or an in-memory object of the same form) into a WanDiT.

    `model` may be a shard: it must find all of ITS keys (`model.state_dict()`) in the file, with the
    right shapes; file keys it does not own are skipped if they are part of the full model, i.e. of
    `full_model_keys` (default: the published layout of the model's DiTConfig, `model.cfg` or
    `model.config`, see `dit_state_dict_shapes`).
    Anything else in the file is unexpected. With `model.cfg` absent and no `full_model_keys`, the
    model itself is taken as the full model (no key may be skipped).
    """
    if isinstance(path_or_state_dict, (str, Path)):
        path: str | None = str(path_or_state_dict)
        obj = load_file(path_or_state_dict, allow_pickle=allow_pickle)
    else:
        path, obj = None, path_or_state_dict
    state_dict, unwrapped = unwrap_dit_state_dict(obj, path=path)
    report = load_dit_state_dict(model, state_dict, full_model_keys=full_model_keys, path=path, assign=assign)
    return dataclasses.replace(report, entry=unwrapped.entry, stripped=unwrapped.stripped)


def load_dit_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    full_model_keys: Iterable[str] | None = None,
    path: str | None = None,
    assign: bool | None = None,
) -> LoadReport:
    """Strictly load an unwrapped full-model (or shard-sized) DiT state dict into a WanDiT or a shard:
    every key the model owns must be there with its shape; keys of the full model it does not own are
    skipped; any other key is unexpected. Raises CheckpointError naming the keys; the model is
    untouched on failure."""
    expected = model.state_dict(keep_vars=True)
    if full_model_keys is None:
        cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
        full = set(dit_state_dict_shapes(cfg)) if isinstance(cfg, DiTConfig) else set()
    else:
        full = set(full_model_keys)
    full |= set(expected)

    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in full)
    _check(model, state_dict, expected, missing=missing, unexpected=unexpected, path=path, what=None)
    owned = {k: state_dict[k] for k in expected}
    _load_matched(model, owned, expected, assign=assign)
    return LoadReport(path=path, num_loaded=len(owned), num_skipped=len(state_dict) - len(owned))


# ------------------------------------------------------------------------------ VAE, T5, TAEHV files


def load_wan_vae(model: nn.Module, path: str | Path, *, assign: bool | None = None) -> LoadReport:
    """`Wan2.1_VAE.pth` (raw state dict, 194 keys) into a Weir WanVAE; build it on meta to skip init."""
    return load_state_dict_strict(model, read_state_dict(path), path=str(path), assign=assign)


def load_t5(model: nn.Module, path: str | Path, *, assign: bool | None = None) -> LoadReport:
    """`models_t5_umt5-xxl-enc-bf16.pth` (raw bf16 state dict, 242 keys), cast to the model's dtype."""
    return load_state_dict_strict(model, read_state_dict(path), path=str(path), assign=assign)


_TGROW_CONV = re.compile(r"^decoder\.(\d+)\.conv\.weight$")


def load_taehv(model: nn.Module, path: str | Path, *, assign: bool | None = None) -> LoadReport:
    """`taew2_1.pth` into a Weir TAEHV (keys `encoder.{i}...`, `decoder.{i}...`).

    One documented adaptation, as in the published loader: a decoder built with a temporal upscale
    turned off has a TGrow conv with fewer output channels than the file; its weight is then the LAST
    rows of the file's (the file's [C*stride, C, 1, 1] keeps the newest frame last). Only a
    `decoder.{i}.conv.weight` whose module is a TGrow (by class name) and whose row count divides the
    file's is adapted; every other difference is an error.
    """
    state_dict = read_state_dict(path)
    expected = model.state_dict(keep_vars=True)
    decoder = getattr(model, "decoder", None)
    for key, tensor in list(state_dict.items()):
        match = _TGROW_CONV.match(key)
        if not match or key not in expected or decoder is None:
            continue
        index = int(match.group(1))
        is_tgrow = isinstance(decoder, nn.Sequential) and type(decoder[index]).__name__ == "TGrow"
        rows = expected[key].shape[0]
        if (
            is_tgrow
            and tensor.shape[0] > rows
            and tensor.shape[0] % rows == 0
            and tensor.shape[1:] == expected[key].shape[1:]
        ):
            state_dict[key] = tensor[-rows:]
    return load_state_dict_strict(model, state_dict, path=str(path), assign=assign)


# ------------------------------------------------------------------------------------- folder layout

WAN_BASE_DIRS: tuple[str, ...] = ("wan_models/Wan2.1-T2V-1.3B", "wan_models/Wan2.1-T2V-14B")
"""Folders holding the shared VAE / T5 / tokenizer files, searched in order (both releases ship the same)."""

DIT_FILES: dict[str, str] = {
    "wan-1.3b": "ckpts/wan_causal_dmd_v2v/model.pt",
    "wan-14b": "ckpts/wan_causal_dmd_v2v_14b/model.pt",
}
"""DiT preset -> StreamDiffusionV2 checkpoint, relative to the release folder."""

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
"""A tokenizer folder must hold at least one of these."""
TAEHV_FILES: tuple[str, ...] = ("taew2_1.pth", "ckpts/taew2_1.pth", "checkpoints/taew2_1.pth")
"""Places the optional TAEHV decoder weights are looked for, in order."""


@dataclass(frozen=True)
class CheckpointLayout:
    """Absolute paths of the files of a release folder laid out like the published one:

    root/
      wan_models/Wan2.1-T2V-1.3B/{Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/}
      ckpts/wan_causal_dmd_v2v/model.pt          (1.3B)
      ckpts/wan_causal_dmd_v2v_14b/model.pt      (14B)
      taew2_1.pth                                (optional)
    """

    root: Path
    vae: Path
    t5: Path
    tokenizer_dir: Path
    dit: dict[str, Path]
    """DiT preset -> model.pt, only for the checkpoints present."""
    taehv: Path | None
    """The TAEHV weights, None when absent."""

    def dit_checkpoint(self, preset: str) -> Path:
        if preset not in self.dit:
            wanted = DIT_FILES.get(preset, f"(no published checkpoint for preset {preset!r})")
            raise CheckpointError(f"{self.root}: missing {wanted}", missing=[wanted], path=str(self.root))
        return self.dit[preset]


def find_checkpoints(
    root: str | Path, *, dit: str | Iterable[str] | None = "wan-1.3b", require_taehv: bool = False
) -> CheckpointLayout:
    """Locate the release files under `root`; CheckpointError listing EVERY required file that is missing.

    `dit` names the DiT preset(s) whose model.pt is required (None: none required; present ones are
    still listed). The VAE, the T5 weights and the tokenizer are always required.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist", path=str(root))
    required_dit = [] if dit is None else [dit] if isinstance(dit, str) else list(dit)
    for preset in required_dit:
        if preset not in DIT_FILES:
            raise ValueError(f"dit={preset!r} has no published checkpoint; choose one of {sorted(DIT_FILES)}")

    missing: list[str] = []

    def base_file(name: str, is_ok) -> Path:
        for base in WAN_BASE_DIRS:
            candidate = root / base / name
            if is_ok(candidate):
                return candidate
        missing.append(f"{WAN_BASE_DIRS[0]}/{name}")
        return root / WAN_BASE_DIRS[0] / name

    vae = base_file(VAE_FILE, Path.is_file)
    t5 = base_file(T5_FILE, Path.is_file)
    tokenizer_dir = base_file(
        TOKENIZER_DIR, lambda p: p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)
    )
    if missing and missing[-1].endswith(TOKENIZER_DIR):
        missing[-1] += f"/ (with one of {', '.join(TOKENIZER_FILES)})"

    dits = {preset: root / rel for preset, rel in DIT_FILES.items() if (root / rel).is_file()}
    missing += [DIT_FILES[p] for p in required_dit if p not in dits]

    taehv = next((root / rel for rel in TAEHV_FILES if (root / rel).is_file()), None)
    if require_taehv and taehv is None:
        missing.append(TAEHV_FILES[0])

    if missing:
        raise CheckpointError(
            f"checkpoint folder {root} is missing {len(missing)} file(s): {', '.join(missing)}. Expected the "
            "published layout: the Wan-AI/Wan2.1-T2V-1.3B release under wan_models/Wan2.1-T2V-1.3B/ and the "
            "StreamDiffusionV2 checkpoints under ckpts/",
            missing=missing,
            path=str(root),
        )
    return CheckpointLayout(root=root, vae=vae, t5=t5, tokenizer_dir=tokenizer_dir, dit=dits, taehv=taehv)
