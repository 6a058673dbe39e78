"""Strict checkpoint loading: published key names at tiny sizes load; every kind of mismatch is named."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from stages.checkpoints import (
    DIT_FILES,
    CheckpointLayout,
    dit_state_dict_shapes,
    find_checkpoints,
    load_dit_checkpoint,
    load_file,
    load_state_dict_strict,
    load_t5,
    load_taehv,
    load_wan_vae,
    read_state_dict,
)
from stages.config import DIT_PRESETS, VAE_PRESETS, DiTConfig
from stages.errors import CheckpointError

TINY_DIT = DIT_PRESETS["tiny"]
HAVE_DIT = importlib.util.find_spec("stages.dit") is not None


def _module_from_shapes(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """An nn.Module whose parameters are exactly `shapes` (nested by the dots of the names)."""
    root = nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, nn.Parameter(torch.randn(shape)))
    return root


def _make_dit(block_range: tuple[int, int] | None = None) -> nn.Module:
    """The tiny WanDiT (a shard when block_range is given); a stand-in with the published keys otherwise."""
    if HAVE_DIT:
        from stages.dit import WanDiT

        return WanDiT(TINY_DIT, block_range=block_range)
    shapes = dit_state_dict_shapes(TINY_DIT)
    if block_range is not None:
        lo, hi = block_range
        shapes = {
            k: s for k, s in shapes.items() if k.startswith("blocks.") and lo <= int(k.split(".")[1]) < hi
        }
    model = _module_from_shapes(shapes)
    model.cfg = TINY_DIT
    return model


def _randomised(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def _assert_loaded(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) <= set(expected)
    for k, v in got.items():
        assert torch.equal(v, expected[k].to(v.dtype)), k


# ---------------------------------------------------------------------------------------- published DiT


@pytest.mark.parametrize(
    ("preset", "num_keys", "num_params"),
    [("wan-1.3b", 825, 1_418_996_800), ("wan-14b", 1095, 14_288_491_584)],
)
def test_published_dit_layout(preset, num_keys, num_params):
    shapes = dit_state_dict_shapes(DIT_PRESETS[preset])
    assert len(shapes) == num_keys
    assert sum(torch.Size(s).numel() for s in shapes.values()) == num_params
    assert len([k for k in shapes if k.startswith("blocks.0.")]) == 27


@pytest.mark.skipif(not HAVE_DIT, reason="stages/dit.py not present")
def test_tiny_wandit_has_the_published_layout():
    model = _make_dit()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dit_state_dict_shapes(TINY_DIT)


# ------------------------------------------------------------------------------------------- model.pt


@pytest.fixture(scope="module")
def dit_weights() -> dict[str, torch.Tensor]:
    return _randomised(_make_dit())


@pytest.mark.parametrize(
    ("entry", "prefix"),
    [
        ("generator", "model."),
        ("generator", ""),
        ("generator_ema", ""),
        ("state_dict", "model._fsdp_wrapped_module."),
        (None, "model."),
        (None, ""),
    ],
)
def test_dit_model_pt_variants_load(tmp_path, dit_weights, entry, prefix):
    keys = {prefix + k: v for k, v in dit_weights.items()}
    obj = keys if entry is None else {entry: keys, "step": torch.tensor(1000)}
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    model = _make_dit()
    report = load_dit_checkpoint(model, path)
    _assert_loaded(model, dit_weights)
    assert report.entry == entry and report.num_loaded == len(dit_weights) and report.num_skipped == 0
    assert ("model." in report.stripped) == bool(prefix)


def test_generator_is_preferred_over_generator_ema(dit_weights):
    other = {k: v + 1 for k, v in dit_weights.items()}
    model = _make_dit()
    report = load_dit_checkpoint(model, {"generator_ema": other, "generator": dit_weights})
    assert report.entry == "generator"
    _assert_loaded(model, dit_weights)


def test_dit_safetensors_loads(tmp_path, dit_weights):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in dit_weights.items()}, str(path))
    model = _make_dit()
    load_dit_checkpoint(model, path)
    _assert_loaded(model, dit_weights)
    assert read_state_dict(path).keys() == {"model." + k for k in dit_weights}


def test_dit_shard_loads_its_slice_of_the_full_file(dit_weights):
    shard = _make_dit(block_range=(1, 3))
    report = load_dit_checkpoint(shard, {"generator": dict(dit_weights)})
    _assert_loaded(shard, dit_weights)
    own = shard.state_dict()
    assert any(k.startswith("blocks.1.") for k in own) and not any(k.startswith("blocks.0.") for k in own)
    assert report.num_loaded == len(own) and report.num_skipped == len(dit_weights) - len(own)


def test_dit_shard_still_rejects_keys_of_no_part_of_the_model(dit_weights):
    shard = _make_dit(block_range=(1, 3))
    bad = dict(dit_weights)
    bad["blocks.4.ffn.0.weight"] = bad["blocks.0.ffn.0.weight"]  # tiny has blocks 0..3 only
    bad["blocks.0.ffn.9.weight"] = bad["blocks.0.ffn.0.weight"]
    with pytest.raises(CheckpointError) as info:
        load_dit_checkpoint(shard, bad)
    assert info.value.unexpected == ["blocks.0.ffn.9.weight", "blocks.4.ffn.0.weight"]
    assert "blocks.4.ffn.0.weight" in str(info.value)


def test_dit_shard_missing_its_own_block_is_an_error(dit_weights):
    shard = _make_dit(block_range=(1, 3))
    partial = {k: v for k, v in dit_weights.items() if k != "blocks.2.self_attn.norm_k.weight"}
    with pytest.raises(CheckpointError, match=r"blocks\.2\.self_attn\.norm_k\.weight") as info:
        load_dit_checkpoint(shard, partial)
    assert info.value.missing == ["blocks.2.self_attn.norm_k.weight"]


def _renamed(sd, old, new):
    return {(new if k == old else k): v for k, v in sd.items()}


@pytest.mark.parametrize("kind", ["renamed", "missing", "extra", "misshaped"])
def test_dit_mismatch_raises_naming_the_key(tmp_path, dit_weights, kind):
    key = "blocks.3.cross_attn.k.weight"
    sd = dict(dit_weights)
    if kind == "renamed":
        sd = _renamed(sd, key, "blocks.3.cross_attn.key.weight")
    elif kind == "missing":
        del sd[key]
    elif kind == "extra":
        sd["blocks.3.cross_attn.extra"] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(7, 7)
    path = tmp_path / "model.pt"
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, path)
    model = _make_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_dit_checkpoint(model, path)
    err = info.value
    assert err.path == str(path) and "no non-strict fallback" in str(err)
    if kind == "renamed":
        assert err.missing == [key] and err.unexpected == ["blocks.3.cross_attn.key.weight"]
    elif kind == "missing":
        assert err.missing == [key] and not err.unexpected
    elif kind == "extra":
        assert err.unexpected == ["blocks.3.cross_attn.extra"] and not err.missing
    else:
        assert err.mismatched == [(key, (7, 7), tuple(before[key].shape))]
    assert key in str(err) or "blocks.3.cross_attn.extra" in str(err)
    # nothing was half-loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_colliding_prefixes_are_an_error(dit_weights):
    sd = {
        "model.head.head.bias": dit_weights["head.head.bias"],
        "head.head.bias": dit_weights["head.head.bias"],
    }
    with pytest.raises(CheckpointError, match="collides"):
        load_dit_checkpoint(_make_dit(), sd)


def test_a_bare_module_without_cfg_is_its_own_full_model():
    model = _module_from_shapes({"blocks.0.ffn.0.weight": (2, 2)})
    sd = {"blocks.0.ffn.0.weight": torch.ones(2, 2), "blocks.1.ffn.0.weight": torch.ones(2, 2)}
    with pytest.raises(CheckpointError) as info:
        load_dit_checkpoint(model, sd)
    assert info.value.unexpected == ["blocks.1.ffn.0.weight"]
    load_dit_checkpoint(model, sd, full_model_keys=sd)  # told what the full model holds: skipped


def test_a_small_dit_config_with_meta_assign(tmp_path):
    cfg = DiTConfig(dim=128, ffn_dim=64, num_heads=1, num_layers=1, text_dim=8, freq_dim=8)
    source = _module_from_shapes(dit_state_dict_shapes(cfg))
    path = tmp_path / "model.pt"
    torch.save({"generator": source.state_dict()}, path)
    with torch.device("meta"):
        target = _module_from_shapes(dit_state_dict_shapes(cfg))
    target.cfg = cfg
    target.to(torch.bfloat16)
    load_dit_checkpoint(target, path)
    weight = target.get_submodule("blocks.0.ffn.0").weight
    assert weight.device.type == "cpu" and weight.dtype == torch.bfloat16
    assert torch.equal(weight, source.get_submodule("blocks.0.ffn.0").weight.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------- raw files


class _NotATensor:
    pass


def test_files_needing_arbitrary_unpickling_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_file(path)
    assert isinstance(load_file(path, allow_pickle=True)["obj"], _NotATensor)


def test_read_state_dict_rejects_nested_and_missing(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"generator": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="generator"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")


def test_legacy_torch_save_format_loads_without_mmap(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)["w"], torch.arange(3.0))


# --------------------------------------------------------------------------------------------- VAE


def _vae(meta: bool = False) -> nn.Module:
    from stages.wan_vae import WanVAE

    if meta:
        with torch.device("meta"):
            return WanVAE(VAE_PRESETS["tiny"])
    return WanVAE(VAE_PRESETS["tiny"])


@pytest.mark.skipif(
    importlib.util.find_spec("stages.wan_vae") is None, reason="stages/wan_vae.py not present"
)
def test_wan_vae_file_assigns_into_a_meta_model(tmp_path):
    weights = _randomised(_vae())
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(weights, path)
    model = _vae(meta=True)
    report = load_wan_vae(model, path)
    assert report.num_loaded == len(weights) == 194
    assert not any(p.is_meta for p in model.parameters())
    _assert_loaded(model, weights)

    torch.save(_renamed(weights, "decoder.head.2.weight", "decoder.head.3.weight"), path)
    with pytest.raises(CheckpointError, match=r"decoder\.head\.2\.weight") as info:
        load_wan_vae(_vae(meta=True), path)
    assert info.value.missing == ["decoder.head.2.weight"]


def test_the_published_wan_vae_on_meta_has_194_keys():
    pytest.importorskip("stages.wan_vae")
    from stages.wan_vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(VAE_PRESETS["wan"])
    assert len(model.state_dict()) == 194
    assert sum(p.numel() for p in model.parameters()) == 126_892_531


# ----------------------------------------------------------------------------------------- T5, TAEHV


def test_t5_bf16_file_is_cast_to_the_model_dtype(tmp_path):
    from stages.t5 import T5_PRESETS, UMT5Encoder

    source = UMT5Encoder(T5_PRESETS["tiny"])
    path = tmp_path / "t5.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}, path)
    model = UMT5Encoder(T5_PRESETS["tiny"])  # fp32, not meta: copied in place
    load_t5(model, path)
    assert model.norm.weight.dtype == torch.float32
    _assert_loaded(model, {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()})


@pytest.mark.skipif(importlib.util.find_spec("stages.taehv") is None, reason="stages/taehv.py not present")
def test_taehv_file_with_a_wider_tgrow_is_trimmed_and_otherwise_strict(tmp_path):
    from stages.taehv import TAEHV, TAEHV_PRESETS

    weights = _randomised(TAEHV(TAEHV_PRESETS["tiny"]))
    tgrow = "decoder.7.conv.weight"  # stride-1 TGrow: the published file stores it with stride 2
    stored = dict(weights)
    stored[tgrow] = torch.cat([torch.randn_like(weights[tgrow]), weights[tgrow]])
    path = tmp_path / "taew2_1.pth"
    torch.save(stored, path)
    with torch.device("meta"):
        model = TAEHV(TAEHV_PRESETS["tiny"])
    load_taehv(model, path)
    _assert_loaded(model, weights)

    stored["decoder.8.weight"] = torch.zeros(3, 3)
    torch.save(stored, path)
    with pytest.raises(CheckpointError, match=r"decoder\.8\.weight"):
        load_taehv(TAEHV(TAEHV_PRESETS["tiny"]), path)


def test_strict_loader_lists_every_category_at_once():
    model = _module_from_shapes({"a.weight": (2,), "b.weight": (2,), "c.weight": (2,)})
    sd = {"a.weight": torch.ones(2), "b.weight": torch.ones(3), "d.weight": torch.ones(2)}
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, sd)
    err = info.value
    assert (err.missing, err.unexpected, err.mismatched) == (
        ["c.weight"],
        ["d.weight"],
        [("b.weight", (3,), (2,))],
    )
    assert all(name in str(err) for name in ("c.weight", "d.weight", "b.weight"))


# -------------------------------------------------------------------------------------------- layout


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_find_checkpoints_lists_everything_missing(tmp_path):
    _touch(tmp_path / "wan_models/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError) as info:
        find_checkpoints(tmp_path, dit=["wan-1.3b", "wan-14b"], require_taehv=True)
    missing = info.value.missing
    assert missing[0] == "wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"
    assert missing[1].startswith("wan_models/Wan2.1-T2V-1.3B/google/umt5-xxl/")
    assert missing[2:] == [DIT_FILES["wan-1.3b"], DIT_FILES["wan-14b"], "taew2_1.pth"]
    assert all(m.split(" ")[0] in str(info.value) for m in missing)


def test_find_checkpoints_on_a_complete_release(tmp_path):
    base = tmp_path / "wan_models/Wan2.1-T2V-1.3B"
    for rel in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json"):
        _touch(base / rel)
    _touch(tmp_path / DIT_FILES["wan-1.3b"])
    layout = find_checkpoints(tmp_path)
    assert isinstance(layout, CheckpointLayout)
    assert layout.vae == base / "Wan2.1_VAE.pth" and layout.tokenizer_dir == base / "google/umt5-xxl"
    assert layout.dit_checkpoint("wan-1.3b") == tmp_path / DIT_FILES["wan-1.3b"]
    assert layout.taehv is None
    with pytest.raises(CheckpointError, match="wan_causal_dmd_v2v_14b"):
        layout.dit_checkpoint("wan-14b")
    with pytest.raises(ValueError, match="tiny"):
        find_checkpoints(tmp_path, dit="tiny")
