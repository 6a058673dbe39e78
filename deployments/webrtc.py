"""The page's WebRTC transport (aiortc, the `web` extra): camera track in, styled track out.

One `PeerStream` per browser stream, living in the web ingress replica:

    browser camera track --RTP--> sample at the stream's fps, fit to HxW --> ClientFeed --> IngressCore
    browser <--RTP-- StyledTrack <-- output frames                          <-- IngressCore
    browser <--data channel--> JSON (web_protocol): controls, sync probes, stats, per-frame timing

The stream is admitted before the SDP answer is made, so a refused stream is an HTTP error with its
retry hint and costs no media setup. No STUN server is used (aiortc would otherwise ask a public one):
the browser and the replica must reach each other directly, as on a LAN or the same host.

Latency on the page's clock: each input frame's capture time is estimated from its RTP timestamp (the
sender's 90 kHz capture clock), aligned to the server clock by the fastest arrival so far; the page maps
it to its own clock with the data channel's sync probes, and matches a displayed frame to its timing
message by the RTP timestamp of the output frame (`pts`, sent with the timing).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from fractions import Fraction

import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from cluster.video import fit_frame
from deployments.errors import unwrap
from deployments.ingress import IngressCore
from deployments.messages import DEFAULT_INPUT_FPS
from deployments.pipeline import now_us
from deployments.web_protocol import ClientFeed, applied_json, error_json, parse_text, to_json
from protos import weir_pb2
from stages.errors import BadRequestError, WeirError

log = logging.getLogger("weir.webrtc")

VIDEO_TIME_BASE = Fraction(1, 90_000)
"""RTP's video clock: output pts are in 90 kHz ticks, as the page reads them back."""
MAX_QUEUED_OUTPUT = 8
"""Output frames waiting to be sent (two chunks); older ones are dropped (the page sees a skip, not lag)."""
PACE_FACTOR = 0.9
"""Frames leave at this fraction of the stream's frame interval, so a backlog drains instead of growing."""
CONNECT_TIMEOUT_S = 10.0
"""A peer not connected this long after its answer is closed, freeing its admitted stream slot."""
CLOSE_GRACE_S = 2.0
"""After a stream ends, how long the data channel stays up for the last messages to reach the page."""


def use_host_addresses(addresses: tuple[str, ...]) -> None:
    """Gather WebRTC host candidates only on `addresses`, in this process.

    aioice offers every non-loopback interface and has no setting to choose; a replica that serves a
    browser on the same host ('127.0.0.1') or on one chosen interface replaces its address lookup.
    """
    import aioice.ice

    chosen = [str(ipaddress.ip_address(a)) for a in addresses]

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in chosen if (use_ipv4 if ipaddress.ip_address(a).version == 4 else use_ipv6)]

    aioice.ice.get_host_addresses = host_addresses


def keep_candidates(sdp: str, addresses: tuple[str, ...]) -> str:
    """The SDP without the ICE candidates whose address is not one of `addresses` (all kept when empty)."""
    if not addresses:
        return sdp
    allowed = {str(ipaddress.ip_address(a)) for a in addresses}
    kept = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) < 6 or fields[4] not in allowed:
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


class CaptureClock:
    """Capture time (server clock, us) of a received frame, from its RTP timestamp.

    The offset between the sender's RTP clock and the server clock is the smallest (arrival - pts)
    seen so far, so the estimate carries no network jitter and leaves out only the shortest uplink
    delay. Example: pts 0 arrives at 1_000_050 us, pts 250_000 at 1_250_080 us -> the second frame was
    captured at 1_250_050 us.
    """

    def __init__(self) -> None:
        self.offset_us: int | None = None
        self._last_pts_us: int | None = None

    def capture_us(self, pts_us: int, arrival_us: int) -> int:
        if self._last_pts_us is not None and pts_us < self._last_pts_us - 60_000_000:
            self.offset_us = None  # the 32-bit RTP clock wrapped (every 13 h): start over
        self._last_pts_us = pts_us
        offset = arrival_us - pts_us
        if self.offset_us is None or offset < self.offset_us:
            self.offset_us = offset
        return pts_us + self.offset_us


class StyledTrack(MediaStreamTrack):
    """The video track back to the page; announces each frame's timing as the encoder takes it.

    A pipeline returns frames a chunk (4 frames) at a time; sent at once, a browser would show only the
    last of them. The track paces them out at the stream's frame interval instead.
    """

    kind = "video"

    def __init__(self, to_array: Callable, announce: Callable[[dict], None]) -> None:
        super().__init__()
        self._to_array = to_array
        self._announce = announce
        self.interval_s = 0.0
        self._next_release = 0.0
        self._queue: collections.deque[weir_pb2.OutputFrame] = collections.deque()
        self._ready = asyncio.Event()
        self._t0 = time.monotonic()
        self._last_pts = -1
        self.frames_dropped = 0

    def put(self, frame: weir_pb2.OutputFrame) -> None:
        if len(self._queue) >= MAX_QUEUED_OUTPUT:
            self._queue.popleft()
            self.frames_dropped += 1
        self._queue.append(frame)
        self._ready.set()

    async def recv(self) -> av.VideoFrame:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        wait = self._next_release - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._next_release = max(time.monotonic(), self._next_release) + self.interval_s * PACE_FACTOR
        if not self._queue:  # stopped while waiting
            raise MediaStreamError
        out = self._queue.popleft()
        picture = av.VideoFrame.from_ndarray(self._to_array(out), format="rgb24")
        pts = max(self._last_pts + 1, round((time.monotonic() - self._t0) * 90_000))
        self._last_pts = pts
        picture.pts, picture.time_base = pts, VIDEO_TIME_BASE
        self._announce({"frame": {"seq": out.seq, "pts": pts, "capture_ts_us": out.capture_ts_us,
                                  "received_ts_us": out.received_ts_us, "output_ts_us": out.output_ts_us}})
        return picture

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class PeerStream:
    """One browser stream over WebRTC, bridged onto IngressCore (see the module docstring)."""

    def __init__(self, core: IngressCore, *, addresses: tuple[str, ...] = (), max_waiting_frames: int = 8,
                 on_closed: Callable[[PeerStream], None] | None = None) -> None:
        self.core = core
        self.addresses = addresses
        self.on_closed = on_closed
        self.feed = ClientFeed(max_frames=max_waiting_frames,
                               on_applied=lambda control: self.send_json(applied_json(control)))
        self.output = StyledTrack(core.codec.output_to_array, self.send_json)
        self.clock = CaptureClock()
        self.pc: RTCPeerConnection | None = None
        self.channel = None
        self._pending_json: list[str] = []
        self._tasks: set[asyncio.Task] = set()
        self._stream = None
        self._height = self._width = 0
        self._fps = DEFAULT_INPUT_FPS
        self._closed = False

    async def start(self, open_msg: weir_pb2.ClientMessage, offer_sdp: str) -> tuple[weir_pb2.ServerMessage, str]:
        """Admit the stream, then answer the offer. Raises WeirError (the stream is then not open)."""
        self.feed.put(open_msg)
        self._stream = self.core.stream(self.feed)
        opened = await self._stream.__anext__()  # admission: raises AdmissionRefusedError and the like
        req = open_msg.open
        self._height, self._width = int(req.height), int(req.width)
        self._fps = float(req.input_fps or DEFAULT_INPUT_FPS)
        self.output.interval_s = 1.0 / self._fps
        try:
            self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            self.pc.on("track", self._on_track)
            self.pc.on("datachannel", self._on_channel)
            self.pc.on("connectionstatechange", self._on_state)
            try:
                offer = RTCSessionDescription(sdp=keep_candidates(offer_sdp, self.addresses), type="offer")
                await self.pc.setRemoteDescription(offer)
            except ValueError as exc:
                raise BadRequestError(f"the SDP offer cannot be used: {exc}", field="sdp") from None
            if not any(t.kind == "video" for t in self.pc.getTransceivers()):
                raise BadRequestError("the SDP offer has no video track", field="sdp")
            self.pc.addTrack(self.output)
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except BaseException:
            await self.close()
            raise
        self._spawn(self._relay())
        self._spawn(self._watch_connect())
        return opened, self.pc.localDescription.sdp

    # ---- events ------------------------------------------------------------------------------------------

    def _on_track(self, track) -> None:
        if track.kind == "video":
            self._spawn(self._sample(track))

    def _on_channel(self, channel) -> None:
        self.channel = channel
        channel.on("message", self._on_message)
        for text in self._pending_json:
            channel.send(text)
        self._pending_json.clear()

    def _on_message(self, message) -> None:
        try:
            if not isinstance(message, str):
                raise BadRequestError("data channel messages are JSON text", field="message")
            item = parse_text(message)
        except WeirError as exc:
            self.feed.fail(exc)
            return
        if isinstance(item, int):
            self.send_json({"sync": {"t": item, "server_us": now_us()}})
        else:
            self.feed.put(item)

    async def _on_state(self) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            await self.close()

    async def _watch_connect(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT_S)
        if self.pc is not None and self.pc.connectionState != "connected":
            log.info("WebRTC peer did not connect in %.0f s; closing its stream", CONNECT_TIMEOUT_S)
            await self.close()

    def send_json(self, obj: dict) -> None:
        text = json.dumps(obj)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
        elif len(self._pending_json) < 64:
            self._pending_json.append(text)

    # ---- media -------------------------------------------------------------------------------------------

    async def _sample(self, track) -> None:
        """Camera frames -> the feed, at most the stream's fps, fitted to its size."""
        interval_us = 1_000_000 / self._fps
        next_due = 0.0
        seq = 0
        try:
            while True:
                frame = await track.recv()
                arrival = now_us()
                if arrival < next_due:
                    continue
                next_due = (arrival if arrival - next_due > interval_us else next_due) + interval_us
                rgb = fit_frame(frame.to_ndarray(format="rgb24"), self._height, self._width)
                capture = self.clock.capture_us(int(frame.pts * frame.time_base * 1_000_000), arrival)
                self.feed.put(self.core.codec.frame_message(seq, rgb, capture))
                seq += 1
        except MediaStreamError:
            self.feed.finish()  # the page stopped its camera: finish the frames in flight

    async def _relay(self) -> None:
        """IngressCore's messages -> the styled track (frames) and the data channel (the rest)."""
        try:
            async for msg in self._stream:
                if msg.WhichOneof("kind") == "frame":
                    self.output.put(msg.frame)
                else:
                    self.send_json(to_json(msg))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every error reaches the page typed
            self.send_json(error_json(unwrap(exc)))
        await asyncio.sleep(CLOSE_GRACE_S)
        await self.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """End the stream (the pipeline closes it if it is still open) and the peer connection."""
        if self._closed:
            return
        self._closed = True
        self.feed.abandon()
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._stream is not None:
            await self._stream.aclose()  # runs IngressCore's cleanup: pipeline close, router release
        self.output.stop()
        if self.pc is not None:
            await self.pc.close()
        if self.on_closed is not None:
            self.on_closed(self)
