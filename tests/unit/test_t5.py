"""umT5-XXL encoder: key/shape contract of the published file, tiny forward, prompt front end and cache."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from stages.checkpoints import load_t5
from stages.t5 import (
    T5_PRESETS,
    RandomTextEncoder,
    T5Config,
    TextEncoder,
    UMT5Encoder,
    build_text_encoder,
    clean_prompt,
    load_tokenizer,
    relative_position_buckets,
)

TINY = T5_PRESETS["tiny"]


def _published_t5_shapes() -> dict[str, tuple[int, ...]]:
    """The 242 keys of `models_t5_umt5-xxl-enc-bf16.pth`, written out from the spec."""
    shapes = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for i in range(24):
        b = f"blocks.{i}"
        shapes[f"{b}.norm1.weight"] = (4096,)
        shapes[f"{b}.norm2.weight"] = (4096,)
        for p in "qkvo":
            shapes[f"{b}.attn.{p}.weight"] = (4096, 4096)
        shapes[f"{b}.ffn.gate.0.weight"] = (10240, 4096)
        shapes[f"{b}.ffn.fc1.weight"] = (10240, 4096)
        shapes[f"{b}.ffn.fc2.weight"] = (4096, 10240)
        shapes[f"{b}.pos_embedding.embedding.weight"] = (32, 64)
    return shapes


def test_umt5_xxl_on_meta_matches_the_published_keys_and_shapes():
    with torch.device("meta"):
        model = UMT5Encoder(T5_PRESETS["umt5-xxl"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 242
    assert shapes == _published_t5_shapes()
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336 == T5_PRESETS["umt5-xxl"].num_params


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_buckets"):
        T5Config(num_buckets=7)
    with pytest.raises(ValueError, match="num_layers"):
        T5Config(num_layers=0)


def test_relative_position_buckets_worked_example():
    buckets = relative_position_buckets(1, 300, num_buckets=32, max_distance=128)[0]
    assert buckets[0].item() == 0
    assert buckets[7].item() == 16 + 7  # exact range, positive side (key after query) in the upper half
    assert buckets[20].item() == 26  # 16 + 8 + int(log(20/8) / log(16) * 8) = 16 + 8 + 2
    assert buckets[127].item() == 31 and buckets[299].item() == 31  # far range saturates
    back = relative_position_buckets(300, 1, num_buckets=32, max_distance=128)[:, 0]
    assert back[7].item() == 7 and back[20].item() == 10  # negative side: no +16 offset


def test_tiny_forward_shape_and_padding_is_masked():
    model = UMT5Encoder(TINY).eval()
    ids = torch.randint(3, TINY.vocab_size, (2, 40))
    mask = torch.zeros(2, 40, dtype=torch.long)
    mask[0, :7] = 1
    mask[1, :40] = 1
    with torch.no_grad():
        out = model(ids, mask)
        ids_other_pad = ids.clone()
        ids_other_pad[0, 7:] = 0
        out_other_pad = model(ids_other_pad, mask)
    assert out.shape == (2, 40, TINY.dim)
    assert torch.isfinite(out).all()
    # real tokens never see the padding
    torch.testing.assert_close(out[0, :7], out_other_pad[0, :7], rtol=0, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("models") is None, reason="reference package not installed")
def test_tiny_forward_matches_the_reference_encoder():
    from models.wan.wan_base.modules.t5 import T5Encoder

    ref = T5Encoder(
        vocab=TINY.vocab_size,
        dim=TINY.dim,
        dim_attn=TINY.attn_dim,
        dim_ffn=TINY.ffn_dim,
        num_heads=TINY.num_heads,
        num_layers=TINY.num_layers,
        num_buckets=TINY.num_buckets,
        shared_pos=False,
    ).eval()
    model = UMT5Encoder(TINY).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    ids = torch.randint(0, TINY.vocab_size, (2, 200))
    mask = torch.ones(2, 200, dtype=torch.long)
    mask[0, 13:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), ref(ids, mask), rtol=1e-5, atol=1e-5)


def test_clean_prompt():
    assert clean_prompt("  a  &amp;amp;\n\tcat ") == "a & cat"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake


# ------------------------------------------------------------------------------ tokenizer + front end


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny Unigram tokenizer saved as a Hugging Face folder (pad 0, </s> 1, unk 2, like umt5)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["a red fox jumps over the lazy dog", "a cat in the rain, neon city at night"] * 10
    trainer = trainers.UnigramTrainer(
        vocab_size=100, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    folder = tmp_path_factory.mktemp("umt5-tokenizer")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(str(folder))
    return folder


def _true_length(encoder: TextEncoder, prompt: str) -> int:
    _, mask = encoder.tokenize(clean_prompt(prompt))
    return int(mask.sum())


def test_tokenizer_from_a_local_folder_pads_to_512(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    encoder = TextEncoder(UMT5Encoder(TINY), tokenizer)
    ids, mask = encoder.tokenize("a red fox")
    assert ids.shape == mask.shape == (1, 512)
    length = int(mask.sum())
    assert 2 <= length < 20
    assert ids[0, length - 1].item() == tokenizer.eos_token_id == 1
    assert (ids[0, length:] == tokenizer.pad_token_id).all()
    ids_long, mask_long = encoder.tokenize(" ".join(["fox"] * 2000))
    assert ids_long.shape == (1, 512) and int(mask_long.sum()) == 512  # truncated


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        load_tokenizer(tmp_path / "nope")


def test_text_encoder_zeroes_past_length_and_caches(tokenizer_dir):
    encoder = TextEncoder(UMT5Encoder(TINY), load_tokenizer(tokenizer_dir), cache_size=2)
    context = encoder.encode("a red fox")
    length = _true_length(encoder, "a red fox")
    assert context.shape == (1, 512, TINY.dim)
    assert (context[0, length:] == 0).all()
    assert (context[0, :length].abs().sum(-1) > 0).all()
    assert encoder.cache_stats().misses == 1 and encoder.cache_stats().hits == 0

    again = encoder.encode("  a red   fox\n")  # same prompt after cleaning
    assert again is context
    assert (encoder.cache_hits, encoder.cache_misses) == (1, 1)

    encoder.encode("a cat")
    encoder.encode("the rain")  # capacity 2: evicts the least recently used ("a red fox")
    encoder.encode("a red fox")
    stats = encoder.cache_stats()
    assert (stats.hits, stats.misses, stats.size, stats.capacity) == (1, 4, 2, 2)


def test_text_encoder_from_files_loads_a_bf16_file_strictly(tokenizer_dir, tmp_path):
    source = UMT5Encoder(TINY)
    path = tmp_path / "t5.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}, path)
    encoder = TextEncoder.from_files(path, tokenizer_dir, cfg=TINY, dtype=torch.float32)
    assert encoder.dtype == torch.float32 and encoder.device.type == "cpu"
    torch.testing.assert_close(
        encoder.model.blocks[1].ffn.fc2.weight, source.blocks[1].ffn.fc2.weight.to(torch.bfloat16).float()
    )
    assert encoder.encode("a cat").shape == (1, 512, TINY.dim)

    torch.save({("x" + k if k == "norm.weight" else k): v for k, v in source.state_dict().items()}, path)
    from stages.errors import CheckpointError

    with torch.device("meta"):
        model = UMT5Encoder(TINY)
    with pytest.raises(CheckpointError, match="norm.weight") as info:
        load_t5(model, path)
    assert info.value.missing == ["norm.weight"] and info.value.unexpected == ["xnorm.weight"]


# ------------------------------------------------------------------------------------------ stand-in


def test_random_text_encoder_is_deterministic_and_zero_past_pseudo_length():
    a = RandomTextEncoder(seed=3)
    b = RandomTextEncoder(seed=3)
    x = a.encode("a red fox")
    assert x.shape == (1, 512, 4096) and x.dtype == torch.float32
    assert torch.equal(x, b.encode("a red fox"))
    assert (x[0, 4:] == 0).all() and (x[0, :4].abs().sum(-1) > 0).all()  # 3 words + 1
    assert not torch.equal(x, a.encode("a blue fox"))
    assert not torch.equal(x, RandomTextEncoder(seed=4).encode("a red fox"))
    assert a.encode("a red fox") is x and a.cache_hits == 1


def test_build_text_encoder_without_checkpoints_is_the_stand_in():
    encoder = build_text_encoder(None, dtype=torch.float32)
    assert isinstance(encoder, RandomTextEncoder)
    assert encoder.encode("x").shape == (1, 512, 4096)
