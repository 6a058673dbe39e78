"""The page's wire format and the bridge pieces, without a browser or Ray (fast)."""

from __future__ import annotations

import asyncio
import json

import pytest

from deployments.web import WebConfig
from deployments.web_protocol import (
    FRAME_IN,
    FRAME_OUT,
    ClientFeed,
    error_json,
    frame_bytes,
    parse_frame,
    parse_text,
)
from protos import weir_pb2
from stages.errors import AdmissionRefusedError, BadFrameError, BadRequestError, UnauthenticatedError


def test_text_messages_are_client_messages_in_protobuf_json():
    msg = parse_text(json.dumps({"control": {"set_prompt": {"prompt": "an oil painting"}}}))
    assert msg.control.set_prompt.prompt == "an oil painting"
    assert parse_text('{"sync": 1730000000123456}') == 1730000000123456
    opened = parse_text(json.dumps({"open": {"prompt": "a city", "height": 64, "width": 64, "seed": "7"}}),
                        open_encoding=weir_pb2.JPEG, jpeg_quality=70)
    assert opened.open.output_encoding == weir_pb2.JPEG and opened.open.jpeg_quality == 70
    assert opened.open.seed == 7


@pytest.mark.parametrize("text, words", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"control": {"set_colour": {}}}', "not a weir.v1.ClientMessage"),
    ('{"frame": {"seq": 1}}', "must be a control"),
    ('{"open": {"prompt": "x"}}', "must be a control"),  # open goes with the WebRTC offer, not in-band
    ('{"sync": "soon"}', "sync must be"),
    ('{"control": {"set_prompt": {"prompt": "' + "x" * 70_000 + '"}}}', "at most"),
])
def test_unusable_text_is_a_bad_request(text, words):
    with pytest.raises(BadRequestError, match=words):
        parse_text(text)


def test_binary_frames_carry_seq_and_capture_time():
    jpeg = b"\xff\xd8" + bytes(50)
    msg = parse_frame(FRAME_IN.pack(5, 1_730_000_000_000_000) + jpeg)
    assert (msg.frame.seq, msg.frame.capture_ts_us, msg.frame.encoding, msg.frame.data) == (
        5, 1_730_000_000_000_000, weir_pb2.JPEG, jpeg)
    with pytest.raises(BadFrameError):
        parse_frame(b"\x00" * FRAME_IN.size)
    out = weir_pb2.OutputFrame(seq=5, capture_ts_us=1, received_ts_us=2, output_ts_us=3, data=b"jpeg")
    data = frame_bytes(out)
    assert FRAME_OUT.unpack_from(data) == (5, 1, 2, 3) and data[FRAME_OUT.size:] == b"jpeg"


def test_errors_reach_the_page_typed_with_their_http_status():
    refused = error_json(AdmissionRefusedError("full", retry_after_s=2.5))
    assert refused["http_status"] == 429
    assert refused["error"]["code"] == "ADMISSION_REFUSED" and refused["error"]["retry_after_s"] == 2.5
    assert error_json(UnauthenticatedError("no key"))["http_status"] == 401
    assert error_json(BadRequestError("bad"))["http_status"] == 400
    internal = error_json(RuntimeError("secret detail"))
    assert internal["http_status"] == 500 and "secret" not in internal["error"]["message"]


def _frame(seq: int) -> weir_pb2.ClientMessage:
    return weir_pb2.ClientMessage(frame=weir_pb2.InputFrame(seq=seq))


def _control(prompt: str) -> weir_pb2.ClientMessage:
    return weir_pb2.ClientMessage(control=weir_pb2.Control(set_prompt=weir_pb2.SetPrompt(prompt=prompt)))


def test_feed_acknowledges_a_control_when_the_next_message_is_asked_for():
    async def run():
        applied = []
        feed = ClientFeed(on_applied=lambda c: applied.append(c.set_prompt.prompt))
        feed.put(_control("a"))
        feed.put(_frame(0))
        assert (await feed.__anext__()).control.set_prompt.prompt == "a"
        assert applied == []  # not yet through the pipeline
        assert (await feed.__anext__()).frame.seq == 0
        assert applied == ["a"]
        feed.finish()
        with pytest.raises(StopAsyncIteration):
            await feed.__anext__()
        assert not feed.is_cancelled()

    asyncio.run(run())


def test_feed_drops_the_oldest_waiting_frame_and_never_a_control():
    async def run():
        feed = ClientFeed(max_frames=2)
        feed.put(_frame(0))
        feed.put(_control("b"))
        feed.put(_frame(1))
        feed.put(_frame(2))
        feed.abandon()
        got = [m async for m in feed]
        return feed, got

    feed, got = asyncio.run(run())
    assert [m.WhichOneof("kind") for m in got] == ["control", "frame", "frame"]
    assert [m.frame.seq for m in got if m.HasField("frame")] == [1, 2]
    assert feed.frames_dropped == 1 and feed.is_cancelled()


def test_feed_hands_a_bad_message_to_the_stream_as_its_error():
    async def run():
        feed = ClientFeed()
        feed.fail(BadRequestError("bad", field="message"))
        with pytest.raises(BadRequestError):
            await feed.__anext__()

    asyncio.run(run())


def test_web_config_is_checked():
    assert WebConfig.from_dict({"ice_addresses": ["127.0.0.1"]}).ice_addresses == ("127.0.0.1",)
    for bad in ({"route_prefix": "/"}, {"route_prefix": "web"}, {"ice_addresses": ["localhost"]},
                {"jpeg_quality": 0}, {"max_peers": 0}, {"colour": "blue"}):
        with pytest.raises(ValueError):
            WebConfig.from_dict(bad)


def test_candidates_outside_the_allowed_addresses_are_dropped():
    webrtc = pytest.importorskip("deployments.webrtc")
    sdp = ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
           "a=candidate:1 1 udp 2122260223 192.0.2.2 50000 typ host\r\n"
           "a=candidate:2 1 udp 2122194687 127.0.0.1 50001 typ host\r\n"
           "a=candidate:3 1 udp 2122129151 abcd.local 50002 typ host\r\n")
    kept = webrtc.keep_candidates(sdp, ("127.0.0.1",))
    assert "127.0.0.1 50001" in kept and "192.0.2.2" not in kept and ".local" not in kept
    assert webrtc.keep_candidates(sdp, ()) == sdp


def test_capture_clock_aligns_rtp_time_by_the_fastest_arrival():
    webrtc = pytest.importorskip("deployments.webrtc")
    clock = webrtc.CaptureClock()
    assert clock.capture_us(0, 1_000_080) == 1_000_080
    assert clock.capture_us(250_000, 1_250_050) == 1_250_050  # faster: the new offset
    assert clock.capture_us(500_000, 1_500_400) == 1_500_050  # late by jitter: still its capture time


def test_web_app_builds_from_serve_config_args():
    from deployments.web import build_web_app

    app = build_web_app({"app_name": "weir", "web": {"ice_addresses": ["127.0.0.1"], "num_replicas": 2}})
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown web option"):
        build_web_app({"web": {"port": 1}})
