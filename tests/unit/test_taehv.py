"""TAEHV: shapes, streaming == one-shot, parity with the reference, per-stream isolation."""

from __future__ import annotations

import pytest
import torch

from stages.taehv import TAEHV, TAEHV_PRESETS
from stages.vae_stage import VAEDecodeStage, VAEEncodeStage
from stages.wan_vae import LATENT_MEAN, LATENT_STD

H = W = 16
TOL = 1e-5


def _model(preset: str = "tiny", seed: int = 0) -> TAEHV:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TAEHV(TAEHV_PRESETS[preset]).eval()


def _frames_BTCHW(num_frames: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, num_frames, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _latents_BTCHW(num_latents: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, num_latents, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_stream_encode_shapes_and_equals_one_shot():
    model = _model()
    frames = _frames_BTCHW(9)
    cache = model.new_encode_cache()
    got = [model.stream_encode(frames[:, :1], cache), model.stream_encode(frames[:, 1:9], cache)]
    assert [g.shape for g in got] == [(1, 1, 16, H // 8, W // 8), (1, 2, 16, H // 8, W // 8)]
    # Weir's start feeds frame 0 four times, then the frames in order
    padded = torch.cat([frames[:, :1].expand(-1, 4, -1, -1, -1), frames[:, 1:]], dim=1)
    one_shot = model.encode_video(padded)
    assert (torch.cat(got, dim=1) - one_shot).abs().max().item() <= TOL
    # a reference-style first chunk of 1 + 4 frames gives the same first two latents
    cache5 = model.new_encode_cache()
    assert (model.stream_encode(frames[:, :5], cache5) - one_shot[:, :2]).abs().max().item() <= TOL


@torch.no_grad()
def test_stream_decode_exact_equals_one_shot():
    model = _model()
    z = _latents_BTCHW(5)
    cache = model.new_decode_cache()
    got = [model.stream_decode(z[:, :1], cache)] + [
        model.stream_decode(z[:, i : i + 2], cache) for i in (1, 3)
    ]
    assert [g.shape[1] for g in got] == [1, 8, 8]
    one_shot = model.decode_video(z)
    assert one_shot.shape == (1, 17, 3, H, W)
    assert (torch.cat(got, dim=1) - one_shot).abs().max().item() <= TOL


@torch.no_grad()
def test_context_decode_frame_counts():
    model = _model()
    z = _latents_BTCHW(4)
    ref_style = model.new_decode_cache()
    first = model.stream_decode(z[:, :2], ref_style, context_latents=3, emit_first_frame=False)
    assert first.shape[1] == 4  # the reference drops latent 0's frame: (T - 1) * 4
    assert model.stream_decode(z[:, 2:3], ref_style, context_latents=3).shape[1] == 4
    assert ref_style.context_BTCHW.shape[1] == 3
    weir = model.new_decode_cache()
    assert model.stream_decode(z[:, :1], weir, context_latents=3).shape[1] == 1
    assert model.stream_decode(z[:, 1:3], weir, context_latents=3).shape[1] == 8


@pytest.fixture(scope="module")
def reference_taehv(tmp_path_factory):
    """The reference TAEHV loaded (strictly) from a file holding our full-width random weights."""
    wrapper = pytest.importorskip("models.wan.taehv_wrapper")
    ours = _model("taew2_1", seed=3)
    path = tmp_path_factory.mktemp("taehv") / "taew2_1.pth"
    torch.save(ours.state_dict(), path)
    return wrapper, wrapper.TAEHV(checkpoint_path=str(path)).eval(), ours


@torch.no_grad()
def test_one_shot_matches_reference(reference_taehv):
    _, ref, ours = reference_taehv
    frames = _frames_BTCHW(8, seed=1)
    assert (ref.encode_video(frames, parallel=True) - ours.encode_video(frames)).abs().max().item() <= TOL
    z = _latents_BTCHW(3, seed=2)
    ref_raw = ref.decode_video(z, parallel=True)  # the reference does not trim here
    assert (ref_raw[:, 3:].clamp(0, 1) - ours.decode_video(z)).abs().max().item() <= TOL


@torch.no_grad()
def test_context_stream_decode_matches_reference_wrapper(reference_taehv):
    wrapper, ref, ours = reference_taehv
    # the reference wrapper without its Wan encoder and checkpoint download: only the decode state
    ref_stream = object.__new__(wrapper.TAEHVWanVAEWrapper)
    torch.nn.Module.__init__(ref_stream)
    ref_stream.taehv = ref
    ref_stream.model = type("State", (), {"first_encode": True, "first_decode": True})()
    ref_stream.decode_context_latents = 3
    ref_stream._decode_latent_cache = None
    ref_stream.use_tensorrt, ref_stream.parallel_decode = False, True  # parallel == sequential, faster
    ref_stream._tensorrt_decoder, ref_stream._tensorrt_failed = None, False

    z_BTCHW = _latents_BTCHW(5, seed=4)
    chunks = [z_BTCHW[:, :2]] + [z_BTCHW[:, i : i + 1] for i in range(2, 5)]
    expected = [ref_stream.stream_decode_to_pixel(c) for c in chunks]
    stage = VAEDecodeStage(
        "taehv", ours, "cpu", torch.float32, taehv_context_latents=3, taehv_emit_first_frame=False
    )
    stage.open_stream("s")
    got = [stage.decode("s", c.transpose(1, 2)).transpose(1, 2) for c in chunks]
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert (e - g).abs().max().item() <= TOL


@torch.no_grad()
def test_stage_scaling_and_isolation():
    model = _model(seed=5)
    raw = VAEEncodeStage("taehv", model, "cpu", torch.float32, "reference")
    sym = VAEEncodeStage("taehv", model, "cpu", torch.float32, "symmetric")
    dec = VAEDecodeStage("taehv", model, "cpu", torch.float32, taehv_context_latents=None)
    a = _frames_BTCHW(9, seed=6).transpose(1, 2) * 2 - 1
    b = _frames_BTCHW(9, seed=7).transpose(1, 2) * 2 - 1
    chunks = [(0, 1), (1, 5), (5, 9)]

    def alone(video):
        for stage in (raw, sym, dec):
            stage.open_stream("x")
        out = []
        for i, j in chunks:
            z_raw, z_sym = raw.encode("x", video[:, :, i:j]), sym.encode("x", video[:, :, i:j])
            mean = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
            std = torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)
            assert (z_raw - (z_sym * std + mean)).abs().max().item() <= TOL  # 'reference' maps to raw mu
            out.append(dec.decode("x", z_sym))
        for stage in (raw, sym, dec):
            stage.close_stream("x")
        return out

    expected_a, expected_b = alone(a), alone(b)
    assert [f.shape[2] for f in expected_a] == [1, 4, 4]
    assert all(f.min() >= -1 and f.max() <= 1 for f in expected_a)
    for stage in (sym, dec):
        stage.open_stream("a")
        stage.open_stream("b")
    for k, (i, j) in enumerate(chunks):
        got_a = dec.decode("a", sym.encode("a", a[:, :, i:j]))
        got_b = dec.decode("b", sym.encode("b", b[:, :, i:j]))
        assert torch.equal(got_a, expected_a[k]) and torch.equal(got_b, expected_b[k])
    dec.close_stream("a")
    assert dec.stream_ids == ["b"] and dec.cache_nbytes("b") > 0


@torch.no_grad()
def test_channels_last_gives_the_plain_results():
    """The GPU layout (weights and activations NHWC, TPool/TGrow regrouping in that order) computes
    what the plain layout computes, call after call, encode and decode."""
    import copy

    plain = _model()
    fast = copy.deepcopy(plain)
    fast.use_channels_last()
    frames = _frames_BTCHW(13, seed=4)
    caches = [(m.new_encode_cache(), m.new_decode_cache()) for m in (plain, fast)]
    for chunk in (frames[:, :1], frames[:, 1:5], frames[:, 5:13]):
        outs = []
        for model, (enc, dec) in zip((plain, fast), caches):
            z = model.stream_encode(chunk, enc)
            outs.append((z, model.stream_decode(z, dec)))
        (z_plain, y_plain), (z_fast, y_fast) = outs
        torch.testing.assert_close(z_fast, z_plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    assert fast.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    # the RGB input conv runs on 8 zero-padded channels (tensor-core kernels); the state dict is unchanged
    assert fast.encoder[0].padded_weight.shape[1] == 16 and fast.state_dict().keys() == plain.state_dict().keys()


@torch.no_grad()
def test_a_spare_cache_gives_a_fresh_streams_values_and_keeps_its_tensors():
    from stages.errors import BadRequestError

    model = _model(seed=3)
    none = dict(spare_streams=0)
    plain = (VAEEncodeStage("taehv", model, "cpu", torch.float32, **none),
             VAEDecodeStage("taehv", model, "cpu", torch.float32, **none))
    two = dict(spare_streams=2)
    spared = (VAEEncodeStage("taehv", model, "cpu", torch.float32, **two),
              VAEDecodeStage("taehv", model, "cpu", torch.float32, **two))
    chunks = [(0, 1), (1, 5), (5, 9)]

    def run(stages, sid, video):
        enc, dec = stages
        enc.open_stream(sid)
        dec.open_stream(sid)
        out = [dec.decode(sid, enc.encode(sid, video[:, :, i:j])) for i, j in chunks]
        addresses = [m.data_ptr() for m in enc._streams.get(sid).memory + dec._streams.get(sid).memory
                     if m is not None]
        enc.close_stream(sid)
        dec.close_stream(sid)
        return out, addresses

    a = _frames_BTCHW(9, seed=6).transpose(1, 2) * 2 - 1
    b = _frames_BTCHW(9, seed=7).transpose(1, 2) * 2 - 1
    _, a_addresses = run(spared, "a", a)
    assert [len(s.spares) for s in spared] == [1, 1]
    expected_b, _ = run(plain, "b", b)
    got_b, b_addresses = run(spared, "b", b)  # on a's zeroed caches
    assert all(torch.equal(x, y) for x, y in zip(got_b, expected_b))
    assert b_addresses == a_addresses and [s.spares.num_recycled for s in spared] == [1, 1]

    # another frame size does not take the spare; the spares are bounded; a NUL id is refused
    small = torch.rand(1, 3, 9, 8, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1
    for sid in ("c", "d"):
        enc, dec = spared
        enc.open_stream(sid)
        dec.open_stream(sid)
        dec.decode(sid, enc.encode(sid, small[:, :, :1]))
    assert [s.spares.num_recycled for s in spared] == [1, 1]
    for sid in ("c", "d"):
        for s in spared:
            s.close_stream(sid)
    assert [len(s.spares) for s in spared] == [2, 2]
    with pytest.raises(BadRequestError):
        spared[0].open_stream("\x00spare-0")
    spared[1].spares.clear()
    assert len(spared[1].spares) == 0
