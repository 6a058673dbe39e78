"""Wan VAE streaming encode/decode against the reference (same random weights, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from stages.config import VAE_PRESETS
from stages.errors import StreamExistsError, StreamNotFoundError
from stages.vae_stage import VAEDecodeStage, VAEEncodeStage, frames_model_to_uint8, frames_uint8_to_model
from stages.wan_vae import LATENT_MEAN, LATENT_STD, WanVAE

ref_vae = pytest.importorskip("models.wan.wan_base.modules.vae")

TOL = 1e-5
H = W = 16


@pytest.fixture(scope="module")
def models():
    """The reference WanVAE_(dim=8, z_dim=16) and ours, holding the same random weights."""
    gen = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        ref = ref_vae.WanVAE_(
            dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
            temperal_downsample=[False, True, True],
        ).eval()  # fmt: skip
    with torch.no_grad():  # init leaves gains at 1 and attention projections at 0: randomise them
        for name, param in ref.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
            elif ".proj." in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    ours = WanVAE(VAE_PRESETS["tiny"]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _ref_scale():
    return [torch.tensor(LATENT_MEAN), 1.0 / torch.tensor(LATENT_STD)]


def _video(num_frames: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, num_frames, H, W, generator=gen) * 2 - 1


def _stages(ours, scaling="reference"):
    enc = VAEEncodeStage("wan", ours, "cpu", torch.float32, scaling)
    dec = VAEDecodeStage("wan", ours, "cpu", torch.float32, scaling)
    return enc, dec


@torch.no_grad()
def test_stream_encode_chunks_5_4_4_4_match_reference(models):
    ref, ours = models
    video = _video(17)
    ref.first_encode = True
    chunks = [video[:, :, :5]] + [video[:, :, i : i + 4] for i in range(5, 17, 4)]
    expected = [ref.stream_encode(c, None) for c in chunks]
    enc, _ = _stages(ours)
    enc.open_stream("s")
    got = [enc.encode("s", c) for c in chunks]
    assert [g.shape[2] for g in got] == [2, 1, 1, 1]
    for e, g in zip(expected, got):
        assert g.shape == e.shape == (1, 16, e.shape[2], H // 8, W // 8)
        assert (e - g).abs().max().item() <= TOL


@torch.no_grad()
def test_stream_decode_matches_reference(models):
    ref, ours = models
    z = torch.randn(1, 16, 5, H // 8, W // 8, generator=torch.Generator().manual_seed(5))
    ref.first_decode = True
    chunks = [z[:, :, :2]] + [z[:, :, i : i + 1] for i in range(2, 5)]
    expected = [ref.stream_decode(c, _ref_scale()).clamp(-1, 1) for c in chunks]
    _, dec = _stages(ours)
    dec.open_stream("s")
    got = [dec.decode("s", c) for c in chunks]
    assert [g.shape[2] for g in got] == [5, 4, 4, 4]
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == torch.float32
        assert (e - g).abs().max().item() <= TOL
    assert max(g.abs().max().item() for g in got) <= 1.0


@torch.no_grad()
def test_weir_first_chunk_of_one_frame_equals_one_shot_encode(models):
    ref, ours = models
    video = _video(9, seed=1)
    one_shot = ref.encode(video, [0.0, 1.0])  # the reference's whole-clip causal encode, raw mu
    enc, _ = _stages(ours)
    enc.open_stream("s")
    streamed = torch.cat([enc.encode("s", video[:, :, :1]), enc.encode("s", video[:, :, 1:5]),
                          enc.encode("s", video[:, :, 5:9])], dim=2)  # fmt: skip
    assert streamed.shape == one_shot.shape == (1, 16, 3, H // 8, W // 8)
    assert (streamed - one_shot).abs().max().item() <= TOL
    # several groups of 4 in one call give the same latents
    enc.open_stream("t")
    grouped = torch.cat([enc.encode("t", video[:, :, :1]), enc.encode("t", video[:, :, 1:9])], dim=2)
    assert (grouped - one_shot).abs().max().item() <= TOL


@torch.no_grad()
def test_weir_decode_one_latent_per_call_equals_one_shot_decode(models):
    ref, ours = models
    z = torch.randn(1, 16, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(7))
    one_shot = ref.decode(z, _ref_scale()).clamp(-1, 1)
    _, dec = _stages(ours)
    dec.open_stream("s")
    got = [dec.decode("s", z[:, :, i : i + 1]) for i in range(4)]
    assert [g.shape[2] for g in got] == [1, 4, 4, 4]
    assert (torch.cat(got, dim=2) - one_shot).abs().max().item() <= TOL


@torch.no_grad()
def test_symmetric_scaling_normalises_on_encode(models):
    _, ours = models
    video = _video(5, seed=2)
    raw, _ = _stages(ours, "reference")
    sym, _ = _stages(ours, "symmetric")
    raw.open_stream("s")
    sym.open_stream("s")
    mu = raw.encode("s", video)
    mean = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)
    assert (sym.encode("s", video) - (mu - mean) / std).abs().max().item() <= TOL


@torch.no_grad()
def test_streams_are_isolated(models):
    _, ours = models
    a, b = _video(9, seed=3), _video(9, seed=4)
    enc, dec = _stages(ours)
    chunks = [(0, 1), (1, 5), (5, 9)]

    def alone(video):
        enc.open_stream("x")
        dec.open_stream("x")
        out = [dec.decode("x", enc.encode("x", video[:, :, i:j])) for i, j in chunks]
        enc.close_stream("x")
        dec.close_stream("x")
        return out

    expected_a, expected_b = alone(a), alone(b)
    for sid in ("a", "b"):
        enc.open_stream(sid)
        dec.open_stream(sid)
    for k, (i, j) in enumerate(chunks):
        got_a = dec.decode("a", enc.encode("a", a[:, :, i:j]))
        got_b = dec.decode("b", enc.encode("b", b[:, :, i:j]))
        assert torch.equal(got_a, expected_a[k]) and torch.equal(got_b, expected_b[k])
    assert enc.cache_nbytes("a") > 0 and sorted(enc.stream_ids) == ["a", "b"]


def test_frame_counts_and_stream_errors(models):
    _, ours = models
    enc, dec = _stages(ours)
    with pytest.raises(StreamNotFoundError):
        enc.encode("nope", _video(1))
    enc.open_stream("s")
    with pytest.raises(StreamExistsError):
        enc.open_stream("s")
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        enc.encode("s", _video(4))
    enc.encode("s", _video(1))
    with pytest.raises(ValueError, match="multiple of 4"):
        enc.encode("s", _video(3))
    enc.close_stream("s")
    with pytest.raises(StreamNotFoundError):
        enc.close_stream("s")
    with pytest.raises(ValueError):
        VAEEncodeStage("taehv", ours, "cpu", torch.float32)
    with pytest.raises(ValueError):
        VAEDecodeStage("wan", ours, "cpu", torch.float32, "sideways")


def test_uint8_round_trip():
    frames_THWC = torch.randint(0, 256, (3, 8, 16, 3), dtype=torch.uint8)
    model_BCTHW = frames_uint8_to_model(frames_THWC)
    assert model_BCTHW.shape == (1, 3, 3, 8, 16)
    assert model_BCTHW.min() >= -1 and model_BCTHW.max() <= 1
    assert torch.equal(frames_model_to_uint8(model_BCTHW)[0], frames_THWC)


@torch.no_grad()
def test_bf16_runs_on_cpu():
    enc = VAEEncodeStage("wan", WanVAE(VAE_PRESETS["tiny"]), "cpu", torch.bfloat16)
    dec = VAEDecodeStage("wan", enc.model, "cpu", torch.bfloat16)
    enc.open_stream("s")
    dec.open_stream("s")
    frames = dec.decode("s", enc.encode("s", _video(1)))
    assert frames.shape == (1, 3, 1, H, W) and torch.isfinite(frames).all()


@torch.no_grad()
@pytest.mark.parametrize(("subpixel", "head_fold"), [(False, 1), (True, 1), (True, 2), (False, 4)])
def test_folded_biases_and_channels_last_give_the_plain_results(models, subpixel, head_fold):
    """The GPU path (stages.fused.VAEOps with the biases folded into the elementwise kernels, weights
    and activations channels-last-3d, the upsample convs as phase convs or not, the decoder's head
    folded over output pixels or not) computes what the plain path computes, call after call."""
    import copy
    import dataclasses

    from stages.fused import EAGER_VAE_OPS, channels_last_weights_

    _, ours = models
    fast = channels_last_weights_(copy.deepcopy(ours))
    fast.use_ops(dataclasses.replace(EAGER_VAE_OPS, fold_bias=True, subpixel_upsample=subpixel,
                                     head_pixel_fold=head_fold))
    head_weight = fast.decoder.head[2]._buffers.get("folded_weight")
    assert (head_weight is None) == (head_fold == 1)
    if head_weight is not None:
        assert head_weight.shape == (3 * head_fold**2, fast.decoder.head[2].in_channels, 3, head_fold + 2, head_fold + 2)
    assert all(hasattr(m, "phase_weight") == (subpixel and m.mode.startswith("up"))
               for m in fast.modules() if type(m).__name__ == "Resample")
    assert fast.encoder.conv1.padded_weight.shape[1] == 16  # the RGB input conv on padded channels
    assert all(("pad_free_weight" in m._buffers) == m.mode.startswith("down")
               for m in fast.modules() if type(m).__name__ == "Resample")
    assert fast.state_dict().keys() == ours.state_dict().keys()
    video = _video(13, seed=3)
    chunks = [video[:, :, :1]] + [video[:, :, i : i + 4] for i in range(1, 13, 4)]
    caches = [(m.new_encode_cache(), m.new_decode_cache()) for m in (ours, fast)]
    for chunk in chunks:
        outs = []
        for model, (enc, dec) in zip((ours, fast), caches):
            x = chunk if model is ours else chunk.contiguous(memory_format=torch.channels_last_3d)
            z = model.stream_encode(x, enc)
            outs.append((z, model.stream_decode(z, dec)))
        (z_plain, y_plain), (z_fast, y_fast) = outs
        torch.testing.assert_close(z_fast, z_plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(8, 12), (7, 9)])
def test_a_one_sided_pad_then_a_stride_2_conv_is_the_pad_free_4x4_conv(height, width):
    """stages.fused.one_sided_pad_kernel: ZeroPad2d((0, 1, 0, 1)) then a 3x3 stride-2 conv equals the
    4x4 kernel with padding 1 on the unpadded input, in fp64, for even and odd sizes alike."""
    import torch.nn.functional as F

    from stages.fused import one_sided_pad_kernel

    g = torch.Generator().manual_seed(height)
    x = torch.randn(2, 5, height, width, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), w, bias, stride=2)
    got = F.conv2d(x, one_sided_pad_kernel(w), bias, stride=2, padding=1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factor", [2, 4])
def test_a_conv_folded_over_output_pixels_gives_the_conv(factor):
    """stages.fused.fold_output_pixels / unfold_output_pixels: the folded conv (stride f, f*f as many
    outputs) then the unfold equal the 3x3 conv with its bias, in fp64, channels-last out."""
    import torch.nn.functional as F

    from stages.fused import fold_output_pixels, unfold_output_pixels

    g = torch.Generator().manual_seed(factor)
    x = torch.randn(1, 5, 4, 8, 12, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    expected = F.conv3d(x, w, bias, 1, (0, 1, 1))
    folded = F.conv3d(x, fold_output_pixels(w, factor), None, (1, factor, factor), (0, 1, 1))
    assert folded.shape == (1, 3 * factor**2, 2, 8 // factor, 12 // factor)
    got = unfold_output_pixels(folded, bias, factor)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_time_interleave_keeps_channels_last_and_values():
    from stages.wan_vae import interleave_time_halves

    y = torch.randn(1, 6, 3, 4, 5)
    plain = interleave_time_halves(y)
    fast = interleave_time_halves(y.contiguous(memory_format=torch.channels_last_3d))
    assert fast.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(fast, plain)
    assert torch.equal(plain[:, :, 0::2], y[:, :3]) and torch.equal(plain[:, :, 1::2], y[:, 3:])


@torch.no_grad()
def test_streams_interleaved_through_one_stage_keep_their_own_conv_windows(models):
    """On the GPU path the residual blocks' convs read windows kept in the stream's cache slots
    (stages.wan_vae "Windows"): two streams interleaved through one stage get what each gets alone on
    the plain path, share no slot tensor, and count their windows in their cache bytes."""
    import copy
    import dataclasses

    from stages.fused import EAGER_VAE_OPS

    _, ours = models
    fast = copy.deepcopy(ours)
    fast.use_ops(dataclasses.replace(EAGER_VAE_OPS, fold_bias=True))
    videos = {"a": _video(9, seed=5), "b": _video(9, seed=6)}
    chunks = [(0, 1), (1, 5), (5, 9)]
    plain_enc, plain_dec = _stages(ours)
    expected = {}
    for sid, video in videos.items():
        plain_enc.open_stream(sid)
        plain_dec.open_stream(sid)
        expected[sid] = [plain_dec.decode(sid, plain_enc.encode(sid, video[:, :, i:j])) for i, j in chunks]
    enc, dec = _stages(fast)
    for sid in videos:
        enc.open_stream(sid)
        dec.open_stream(sid)
    for k, (i, j) in enumerate(chunks):
        for sid, video in videos.items():
            got = dec.decode(sid, enc.encode(sid, video[:, :, i:j]))
            torch.testing.assert_close(got, expected[sid][k], rtol=1e-5, atol=1e-5)
    for stage, plain in ((enc, plain_enc), (dec, plain_dec)):
        slots_a, slots_b = ([id(t) for t in stage._streams.get(sid).slots if isinstance(t, torch.Tensor)]
                            for sid in ("a", "b"))
        assert not set(slots_a) & set(slots_b)
        assert stage.cache_nbytes("a") > plain.cache_nbytes("a")


@pytest.mark.parametrize("fold_bias", [False, True])
@torch.no_grad()
def test_steady_calls_overwrite_the_cache_slots_in_place(models, fold_bias):
    """From a stream's third call on, encode and decode allocate no cache slot: every slot keeps its
    tensor (what a CUDA graph of the call bakes in), on the plain path and the windowed one. The first
    two calls do allocate (they change the slots' frame counts), so a graph is never captured there."""
    import copy
    import dataclasses

    from stages.fused import EAGER_VAE_OPS

    _, ours = models
    model = copy.deepcopy(ours)
    if fold_bias:
        model.use_ops(dataclasses.replace(EAGER_VAE_OPS, fold_bias=True))
    enc, dec = _stages(model)
    enc.open_stream("s")
    dec.open_stream("s")
    video = _video(17, seed=7)
    seen = []
    for i, j in ((0, 1), (1, 5), (5, 9), (9, 13), (13, 17)):
        dec.decode("s", enc.encode("s", video[:, :, i:j]))
        caches = (enc._streams.get("s"), dec._streams.get("s"))
        seen.append(([c.new_slots for c in caches],
                     [[s.data_ptr() for s in c.slots if isinstance(s, torch.Tensor)] for c in caches]))
    assert all(n > 0 for n in seen[0][0]) and all(n > 0 for n in seen[1][0])
    assert seen[2][0] == seen[3][0] == seen[4][0] == [0, 0]
    assert seen[2][1] == seen[3][1] == seen[4][1]


def test_a_head_fold_that_does_not_divide_the_upscale_is_refused(models):
    import copy
    import dataclasses

    from stages.fused import EAGER_VAE_OPS

    fast = copy.deepcopy(models[1])
    with pytest.raises(ValueError, match="head pixel fold 3"):
        fast.use_ops(dataclasses.replace(EAGER_VAE_OPS, fold_bias=True, head_pixel_fold=3))
