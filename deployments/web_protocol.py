"""The browser's side of a stream, turned into IngressCore's protobuf stream and back.

A browser speaks JSON text messages and binary frames (over a WebSocket, or JSON over a WebRTC data
channel beside the media tracks). Every JSON message is either a bridge message or a weir.v1
ClientMessage in protobuf's JSON mapping, so a field added to weir.proto reaches the page unchanged:

    browser -> server   {"open": {"prompt": "a watercolor city", "num_steps": 2, "height": 64, ...}}
                        {"control": {"set_prompt": {"prompt": "an oil painting"}}}
                        {"sync": 1730000000123456}                 bridge: clock probe, page time in us
                        binary  FRAME_IN header (seq, capture_ts_us) + one JPEG          (WebSocket)
    server -> browser   {"opened": {...}} {"stats": {...}} {"ended": {...}}     ServerMessage as JSON
                        {"error": {"code": "ADMISSION_REFUSED", "message": ..., "retry_after_s": 2.5},
                         "http_status": 429}
                        {"applied": {"set_prompt": {...}}}    bridge: the pipeline took the control
                        {"sync": {"t": <page us>, "server_us": <server us>}}
                        binary  FRAME_OUT header (seq, capture, received, output us) + JPEG  (WebSocket)

`ClientFeed` is the async iterator IngressCore reads. It also tells the transport when a control
message has been applied: IngressCore asks for its next message only after the previous one went
through the pipeline, so the next `__anext__` is the acknowledgement.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import struct
from collections.abc import Callable

import grpc
from google.protobuf import json_format

from deployments.errors import status_of
from protos import weir_pb2
from stages.errors import BadFrameError, BadRequestError

log = logging.getLogger("weir.web")

FRAME_IN = struct.Struct("<Qq")
"""Header of a browser frame: seq (u64), capture_ts_us (i64, page clock); the JPEG follows."""
FRAME_OUT = struct.Struct("<Qqqq")
"""Header of a frame sent back: seq, capture_ts_us (echoed), received_ts_us, output_ts_us; the JPEG follows."""
MAX_TEXT_CHARS = 64 * 1024
"""Longest JSON message a browser may send (a prompt is at most 2,000 characters)."""
MAX_FRAME_BYTES = 8 * 1024 * 1024

HTTP_STATUS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}
"""The HTTP status that tells a browser what deployments.errors.status_of tells a gRPC client."""


# ---- browser -> server ---------------------------------------------------------------------------------


def parse_text(text: str, *, open_encoding: int | None = None, jpeg_quality: int = 0) -> weir_pb2.ClientMessage | int:
    """One JSON message from the page: a ClientMessage, or the page clock (us) of a sync probe.

    Only `control` and `open` messages may come as JSON (frames travel as binary or on the media track);
    `open` only where the transport takes it in-band (`open_encoding`, the output encoding it needs).
    Raises BadRequestError naming what is wrong.
    """
    obj = json_object(text, what="message", field="message", max_size=MAX_TEXT_CHARS)
    if set(obj) == {"sync"}:
        if not isinstance(obj["sync"], (int, float)) or isinstance(obj["sync"], bool):
            raise BadRequestError("sync must be the page clock in microseconds", field="sync")
        return int(obj["sync"])
    if set(obj) == {"open"} and open_encoding is not None:
        return open_message(obj["open"], output_encoding=open_encoding, jpeg_quality=jpeg_quality)
    try:
        msg = json_format.ParseDict(obj, weir_pb2.ClientMessage())
    except json_format.ParseError as exc:
        raise BadRequestError(f"message is not a weir.v1.ClientMessage: {exc}", field="message") from None
    if msg.WhichOneof("kind") != "control":
        raise BadRequestError(f"a JSON message here must be a control, not {msg.WhichOneof('kind')!r}",
                              field="message")
    return msg


def json_object(raw: str | bytes, *, what: str, field: str, max_size: int) -> dict:
    """Parse one JSON object of at most `max_size` characters (bytes); BadRequestError otherwise."""
    if len(raw) > max_size:
        raise BadRequestError(f"{what} has {len(raw)} characters; at most {max_size}", field=field)
    try:
        obj = json.loads(raw)
    except ValueError:
        raise BadRequestError(f"{what} is not JSON", field=field) from None
    if not isinstance(obj, dict):
        raise BadRequestError(f"{what} must be a JSON object", field=field)
    return obj


def open_message(obj: object, *, output_encoding: int, jpeg_quality: int = 0) -> weir_pb2.ClientMessage:
    """The StreamOpen of a page (protobuf JSON), with the output encoding its transport needs."""
    if not isinstance(obj, dict):
        raise BadRequestError("open must be a JSON object (weir.v1.StreamOpen)", field="open")
    try:
        msg = json_format.ParseDict(obj, weir_pb2.StreamOpen())
    except json_format.ParseError as exc:
        raise BadRequestError(f"open is not a weir.v1.StreamOpen: {exc}", field="open") from None
    msg.output_encoding = output_encoding
    if jpeg_quality and not msg.jpeg_quality:
        msg.jpeg_quality = jpeg_quality
    return weir_pb2.ClientMessage(open=msg)


def parse_frame(data: bytes) -> weir_pb2.ClientMessage:
    """A binary frame from the page: FRAME_IN header, then a JPEG."""
    if len(data) <= FRAME_IN.size:
        raise BadFrameError(f"binary frame has {len(data)} bytes; it needs a {FRAME_IN.size}-byte header and a JPEG",
                            got=len(data))
    if len(data) > MAX_FRAME_BYTES:
        raise BadFrameError(f"binary frame has {len(data)} bytes; at most {MAX_FRAME_BYTES}", got=len(data))
    seq, capture_ts_us = FRAME_IN.unpack_from(data)
    return weir_pb2.ClientMessage(frame=weir_pb2.InputFrame(
        seq=seq, capture_ts_us=capture_ts_us, encoding=weir_pb2.JPEG, data=data[FRAME_IN.size:]))


# ---- server -> browser ---------------------------------------------------------------------------------


def to_json(msg) -> dict:
    """A protobuf message as the page reads it (field names as in weir.proto; int64 as strings)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def frame_bytes(frame: weir_pb2.OutputFrame) -> bytes:
    """A JPEG output frame as one binary WebSocket message."""
    return FRAME_OUT.pack(frame.seq, frame.capture_ts_us, frame.received_ts_us, frame.output_ts_us) + frame.data


def error_json(exc: BaseException) -> dict:
    """A typed error as the page shows it: the wire StreamError plus the matching HTTP status."""
    status = status_of(exc)
    return {"error": to_json(status.error), "http_status": HTTP_STATUS.get(status.code, 500)}


def applied_json(control: weir_pb2.Control) -> dict:
    return {"applied": to_json(control)}


# ---- the stream IngressCore reads ----------------------------------------------------------------------


class _End:
    """Sentinel: the page finished sending."""


class ClientFeed:
    """The ClientMessage iterator of one browser stream; the transport `put`s into it.

    Frames are bounded: when `max_frames` are waiting (the pipeline is slower than the page sends),
    the oldest waiting frame is dropped, so a slow stream lags by at most that many frames and the
    replica's memory stays bounded. Control messages are never dropped.
    """

    def __init__(self, *, max_frames: int = 8, on_applied: Callable[[weir_pb2.Control], None] | None = None) -> None:
        self.max_frames = max_frames
        self.on_applied = on_applied
        self.frames_dropped = 0
        self._items: collections.deque = collections.deque()
        self._ready = asyncio.Event()
        self._gone = False
        self._in_flight: weir_pb2.ClientMessage | None = None

    def put(self, msg: weir_pb2.ClientMessage) -> None:
        if msg.WhichOneof("kind") == "frame":
            waiting = [m for m in self._items if isinstance(m, weir_pb2.ClientMessage) and m.HasField("frame")]
            if len(waiting) >= self.max_frames:
                self._items.remove(waiting[0])
                self.frames_dropped += 1
        self._items.append(msg)
        self._ready.set()

    def finish(self) -> None:
        """The page ended the stream cleanly: IngressCore finishes the frames in flight."""
        self._items.append(_End())
        self._ready.set()

    def abandon(self) -> None:
        """The page went away: IngressCore closes the stream without waiting for its frames."""
        self._gone = True
        self.finish()

    def fail(self, exc: BaseException) -> None:
        """The page sent something unusable: IngressCore ends the stream with this typed error."""
        self._items.append(exc)
        self._ready.set()

    def is_cancelled(self) -> bool:
        """Read by IngressCore when the feed ends: True means nobody is left to send frames to."""
        return self._gone

    def __aiter__(self) -> ClientFeed:
        return self

    async def __anext__(self) -> weir_pb2.ClientMessage:
        done, self._in_flight = self._in_flight, None
        if done is not None and self.on_applied is not None:
            self.on_applied(done.control)
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, _End):
            self._items.appendleft(item)  # ended for good: every later call ends too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        if item.WhichOneof("kind") == "control":
            self._in_flight = item
        return item
