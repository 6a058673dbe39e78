"""The wire codec (frames, StreamOpen) and the one error table. No Ray."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from deployments.codec import FrameCodec, decode_jpeg, encode_jpeg
from deployments.errors import (
    ERROR_CODE_KEY,
    ERROR_TABLE,
    RETRY_AFTER_KEY,
    _weir_error_classes,
    error_from_status,
    status_of,
    unwrap,
)
from deployments.messages import OutFrame, StreamStatsSnapshot
from protos import weir_pb2
from stages import errors as E

H, W = 32, 48


def _image(seed: int = 0) -> np.ndarray:
    """A smooth picture (JPEG-friendly): gradients plus a block."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([xx * 255 // W, yy * 255 // H, np.full((H, W), 90 + seed)], axis=-1).astype(np.uint8)
    img[8:16, 10:30] = (240, 40, 40)
    return img


def _raw(seq: int, img: np.ndarray, h: int = H, w: int = W) -> weir_pb2.InputFrame:
    return weir_pb2.InputFrame(seq=seq, capture_ts_us=123, encoding=weir_pb2.RAW_RGB24, height=h, width=w,
                               data=img.tobytes())


# ---- frames --------------------------------------------------------------------------------------------


def test_raw_frame_round_trips_exactly():
    img = _image()
    f = FrameCodec().decode_frame(_raw(7, img), H, W, received_ts_us=999)
    assert f.seq == 7 and f.capture_ts_us == 123 and f.received_ts_us == 999
    assert f.frame.dtype == np.uint8 and f.frame.shape == (H, W, 3)
    np.testing.assert_array_equal(f.frame, img)


def test_jpeg_frame_decodes_close_to_the_source():
    img = _image()
    msg = FrameCodec().frame_message(3, img, 55, jpeg=True).frame
    assert msg.encoding == weir_pb2.JPEG and msg.data[:2] == b"\xff\xd8"
    f = FrameCodec().decode_frame(msg, H, W, received_ts_us=0)
    assert f.frame.shape == (H, W, 3)
    assert np.abs(f.frame.astype(int) - img).mean() < 12


@pytest.mark.parametrize(
    "make",
    [
        lambda img: _raw(1, img[:, :-16], w=W - 16),           # declared size differs from the stream
        lambda img: _raw(1, img[:-1]),                          # right header, wrong byte count
        lambda img: weir_pb2.InputFrame(seq=1, encoding=weir_pb2.RAW_RGB24, data=b""),
        lambda img: weir_pb2.InputFrame(seq=1, encoding=weir_pb2.FRAME_ENCODING_UNSPECIFIED, data=img.tobytes()),
    ],
    ids=["declared-size", "byte-count", "empty", "no-encoding"],
)
def test_wrong_raw_frames_are_bad_frame_errors(make):
    with pytest.raises(E.BadFrameError) as err:
        FrameCodec().decode_frame(make(_image()), H, W, received_ts_us=0)
    assert err.value.details.get("seq") == 1


def test_jpeg_of_the_wrong_size_is_a_bad_frame_error():
    data = encode_jpeg(np.zeros((H * 2, W, 3), np.uint8))
    with pytest.raises(E.BadFrameError, match="decodes to 64x48"):
        FrameCodec().decode_frame(weir_pb2.InputFrame(seq=2, encoding=weir_pb2.JPEG, data=data), H, W, 0)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d[: len(d) // 2],                       # truncated
        lambda d: d[:150] + bytes(20) + d[170:],          # damaged Huffman / quantisation tables
        lambda d: b"\xff\xd8\xff\xe0" + bytes(300),       # a header and nothing else
        lambda d: b"not a jpeg at all",
        lambda d: b"",
    ],
    ids=["truncated", "damaged-tables", "header-only", "not-jpeg", "empty"],
)
def test_corrupt_jpeg_is_a_bad_frame_error(corrupt):
    data = corrupt(encode_jpeg(_image()))
    with pytest.raises(E.BadFrameError):
        FrameCodec().decode_frame(weir_pb2.InputFrame(seq=4, encoding=weir_pb2.JPEG, data=data), H, W, 0)
    with pytest.raises(E.BadFrameError):
        decode_jpeg(data)


def test_output_frames_encode_raw_and_jpeg():
    codec = FrameCodec()
    out = OutFrame(seq=9, frame=_image(), capture_ts_us=1, received_ts_us=2, output_ts_us=3)
    raw = codec.encode_frame(out, jpeg=False)
    assert (raw.seq, raw.capture_ts_us, raw.received_ts_us, raw.output_ts_us) == (9, 1, 2, 3)
    np.testing.assert_array_equal(codec.output_to_array(raw), out.frame)
    jpg = codec.encode_frame(out, jpeg=True, quality=90)
    assert jpg.encoding == weir_pb2.JPEG and len(jpg.data) < out.frame.nbytes
    assert np.abs(codec.output_to_array(jpg).astype(int) - out.frame).mean() < 12
    stats = codec.encode_stats(StreamStatsSnapshot(stream_id="s", frames_in=5, frames_skipped=1, ttff_ms=12.5))
    assert (stats.frames_in, stats.frames_skipped, stats.ttff_ms) == (5, 1, 12.5)


# ---- StreamOpen ----------------------------------------------------------------------------------------


def _open(**kw) -> weir_pb2.StreamOpen:
    base = dict(prompt="a watercolor street", height=64, width=96)
    base.update(kw)
    return weir_pb2.StreamOpen(**base)


def test_open_fills_defaults():
    req = FrameCodec().parse_open(_open(), tenant="acme", tier="premium")
    assert (req.num_steps, req.noise_strength, req.input_fps) == (2, pytest.approx(0.8), 16.0)
    assert req.ttff_ms > 0 and req.frame_deadline_ms > 0
    assert (req.tenant, req.tier, req.output_jpeg) == ("acme", "premium", False)


@pytest.mark.parametrize(
    "field,kw",
    [
        ("prompt", {"prompt": "  "}),
        ("num_steps", {"num_steps": 5}),
        ("noise_strength", {"noise_strength": 1.5}),
        ("height", {"height": 100}),
        ("width", {"width": 0}),
        ("input_fps", {"input_fps": 500}),
        ("vae", {"vae": "sdxl"}),
        ("jpeg_quality", {"jpeg_quality": 101}),
    ],
)
def test_open_rejects_out_of_range_fields(field, kw):
    with pytest.raises(E.BadRequestError) as err:
        FrameCodec().parse_open(_open(**kw))
    assert err.value.details["field"] == field


# ---- the error table -----------------------------------------------------------------------------------


def test_every_weir_error_has_a_row():
    missing = [cls.__name__ for cls in _weir_error_classes() if cls.code not in ERROR_TABLE]
    assert not missing, f"add these to deployments.errors.ERROR_TABLE: {missing}"


@pytest.mark.parametrize(
    "exc,code",
    [
        (E.AdmissionRefusedError("full", retry_after_s=2.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (E.BadFrameError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (E.BadRequestError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (E.SLOUnattainableError("no"), grpc.StatusCode.FAILED_PRECONDITION),
        (E.UnauthenticatedError("who"), grpc.StatusCode.UNAUTHENTICATED),
        (E.StreamNotFoundError("gone"), grpc.StatusCode.NOT_FOUND),
        (E.PipelineFailedError("dead"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_status_codes_and_round_trip(exc, code):
    status = status_of(exc)
    assert status.code == code
    trailing = dict(status.trailing_metadata)
    assert trailing[ERROR_CODE_KEY] == exc.code
    assert status.error.message == exc.message
    back = error_from_status(status.code, status.details, trailing)
    assert type(back) is type(exc)


def test_admission_refusal_carries_the_retry_hint():
    status = status_of(E.AdmissionRefusedError("full", retry_after_s=2.5))
    assert dict(status.trailing_metadata)[RETRY_AFTER_KEY] == "2500"
    assert status.error.code == weir_pb2.ADMISSION_REFUSED and status.error.retry_after_s == 2.5
    back = error_from_status(status.code, status.details, dict(status.trailing_metadata))
    assert back.retry_after_s == pytest.approx(2.5)


def test_unknown_exceptions_are_internal_and_say_only_their_type():
    status = status_of(RuntimeError("secret path /home/x"))
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.details and "RuntimeError" in status.details


def test_status_without_weir_metadata_falls_back_to_the_grpc_code():
    assert type(error_from_status(grpc.StatusCode.NOT_FOUND, "x", {})) is E.StreamNotFoundError
    assert type(error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", {})) is E.AdmissionRefusedError


def test_unwrap_finds_the_replica_exception():
    inner = E.BadFrameError("bad")

    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    assert unwrap(Wrapper(Wrapper(inner))) is inner
    assert unwrap(inner) is inner


# ---- the stubs, prompts and blends -----------------------------------------------------------------------


def test_committed_stubs_are_exactly_what_protos_generate_writes(tmp_path):
    from protos.generate import ROOT, STUBS, generate

    assert generate(tmp_path) == 0
    for name in STUBS:
        fresh = (tmp_path / "protos" / name).read_bytes()
        assert fresh == (ROOT / "protos" / name).read_bytes(), f"protos/{name} is stale: run python -m protos.generate"


def _wp(prompt: str, weight: float) -> weir_pb2.WeightedPrompt:
    return weir_pb2.WeightedPrompt(prompt=prompt, weight=weight)


def test_weighted_prompts_blends_and_the_record_flag_parse():
    codec = FrameCodec()
    req = codec.parse_open(_open(prompt="", prompts=[_wp("a cat", 3), _wp("a dog", 1)],
                                 blend=weir_pb2.BLEND_SLERP, record=True))
    assert req.prompt_mix.active == (("a cat", 0.75), ("a dog", 0.25)) and req.prompt_mix.mode == "slerp"
    assert req.record and req.prompt  # a readable label for logs
    single = codec.parse_open(_open())
    assert single.mix is None and not single.record
    assert single.prompt_mix.active == (("a watercolor street", 1.0),)
    change = codec.parse_set_prompt(weir_pb2.SetPrompt(prompt="a dog", blend_chunks=8))
    assert (change.blend_chunks, change.mix.mode, change.mix.active) == (8, "linear", (("a dog", 1.0),))
    mixed = codec.parse_set_prompt(weir_pb2.SetPrompt(prompts=[_wp("a", 1), _wp("b", 0)], blend=weir_pb2.BLEND_LINEAR))
    assert mixed.mix.active == (("a", 1.0),) and mixed.blend_chunks == 0


@pytest.mark.parametrize(
    "kw,field",
    [
        ({}, "prompt"),
        ({"prompt": "a", "prompts": [_wp("b", 1)]}, "prompts"),
        ({"prompts": [_wp(f"p{i}", 1) for i in range(9)]}, "prompts"),
        ({"prompts": [_wp("a", 0), _wp("b", 0)]}, "prompts"),
        ({"prompts": [_wp("a", -1)]}, "prompts"),
        ({"prompts": [_wp("a", float("nan"))]}, "prompts"),
        ({"prompts": [_wp(" ", 1)]}, "prompts"),
        ({"prompts": [_wp("a", 1), _wp("b", 1), _wp("c", 1)], "blend": weir_pb2.BLEND_SLERP}, "blend"),
        ({"prompt": "a", "blend": 7}, "blend"),
        ({"prompt": "a", "blend_chunks": 65}, "blend_chunks"),
        ({"prompt": "a" * 2001}, "prompt"),
    ],
    ids=["empty", "both", "nine", "all-zero", "negative", "nan", "blank", "slerp-three", "unknown-mode",
         "too-long-blend", "too-long-prompt"],
)
def test_bad_prompt_changes_are_bad_requests(kw, field):
    with pytest.raises(E.BadRequestError) as err:
        FrameCodec().parse_set_prompt(weir_pb2.SetPrompt(**kw))
    assert err.value.details["field"] == field
