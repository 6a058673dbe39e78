"""A Weir gRPC client: open a stream, send frames paced at the input fps, collect the restyled frames.

    result = await stream_frames("localhost:9000", frames, OpenOptions(prompt="a watercolor city"))
    result.frames          # [(seq, uint8 HxWx3)] in arrival order
    result.ttff_ms         # open sent -> first output frame received, client clock
    result.open_ms         # open sent -> the server's "opened" (admission, placement), within ttff_ms
    result.latencies_ms    # per frame: capture (client clock) -> output received

Live controls go in through `extra_messages` (set_prompt_message, start_recording_message, ...); a
recording made with `OpenOptions(record=True)` or a start_recording control is listed in
`result.recordings` at the end and fetched with `fetch_recording`:

    result = await stream_frames(address, frames, OpenOptions(prompt="...", record=True),
                                 extra_messages=lambda i: [set_prompt_message("a dog", blend_chunks=4)] if i == 20 else [])
    await fetch_recording(address, result.recordings[0].recording_id, "out_server.mp4")

A refused or failed stream raises the typed WeirError rebuilt from the status code and trailing
metadata (AdmissionRefusedError carries retry_after_s). With `retry_for_s`, a refused stream is asked
for again after each refusal's retry hint until that much time has passed (a full service, or one
where other streams are still starting up, takes it a little later); `result.admission_wait_s` says
how long it waited, and its TTFF counts from the open that was admitted.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from deployments.codec import FrameCodec
from deployments.errors import error_from_status
from protos import weir_pb2, weir_pb2_grpc
from stages.errors import AdmissionRefusedError, WeirError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
BLEND = {"linear": weir_pb2.BLEND_LINEAR, "slerp": weir_pb2.BLEND_SLERP}


@dataclass(frozen=True)
class OpenOptions:
    """What the client asks for (see weir.proto StreamOpen)."""

    prompt: str
    height: int = 64
    width: int = 64
    fps: float = 16.0
    num_steps: int = 2
    noise_strength: float = 0.8
    seed: int = 0
    model: str = ""
    vae: str = ""
    ttff_ms: float = 0.0
    frame_deadline_ms: float = 0.0
    api_key: str = ""
    jpeg_in: bool = False
    jpeg_out: bool = False
    prompts: tuple[tuple[str, float], ...] = ()
    """(prompt, weight) pairs instead of `prompt` (leave `prompt` empty)."""
    blend: str = "linear"
    """How `prompts` are mixed: 'linear' or 'slerp'."""
    record: bool = False
    """Record the output on the server from the start (see fetch_recording)."""

    def message(self) -> weir_pb2.ClientMessage:
        return weir_pb2.ClientMessage(open=weir_pb2.StreamOpen(
            prompt=self.prompt, num_steps=self.num_steps, noise_strength=self.noise_strength, seed=self.seed,
            height=self.height, width=self.width, input_fps=self.fps, model=self.model, vae=self.vae,
            slo=weir_pb2.SLO(ttff_ms=self.ttff_ms, frame_deadline_ms=self.frame_deadline_ms),
            api_key=self.api_key,
            output_encoding=weir_pb2.JPEG if self.jpeg_out else weir_pb2.RAW_RGB24,
            prompts=_weighted(self.prompts), blend=BLEND[self.blend], record=self.record,
        ))


def _weighted(prompts: Sequence[tuple[str, float]]) -> list[weir_pb2.WeightedPrompt]:
    return [weir_pb2.WeightedPrompt(prompt=p, weight=w) for p, w in prompts]


def set_prompt_message(prompt: str | Sequence[tuple[str, float]], *, blend_chunks: int = 0,
                       blend: str = "linear") -> weir_pb2.ClientMessage:
    """A prompt change: one prompt, or (prompt, weight) pairs; at once, or blended over N chunks."""
    if isinstance(prompt, str):
        change = weir_pb2.SetPrompt(prompt=prompt, blend_chunks=blend_chunks, blend=BLEND[blend])
    else:
        change = weir_pb2.SetPrompt(prompts=_weighted(prompt), blend_chunks=blend_chunks, blend=BLEND[blend])
    return weir_pb2.ClientMessage(control=weir_pb2.Control(set_prompt=change))


def start_recording_message() -> weir_pb2.ClientMessage:
    return weir_pb2.ClientMessage(control=weir_pb2.Control(start_recording=weir_pb2.StartRecording()))


def stop_recording_message() -> weir_pb2.ClientMessage:
    return weir_pb2.ClientMessage(control=weir_pb2.Control(stop_recording=weir_pb2.StopRecording()))


@dataclass
class StreamResult:
    stream_id: str = ""
    frames: list[tuple[int, np.ndarray]] = field(default_factory=list)
    ttff_ms: float = 0.0
    open_ms: float = 0.0
    """Open sent -> the server's `opened` reply (admission and placement; the first frame is sent
    after it), client clock: the part of ttff_ms before frame 0 left."""
    latencies_ms: list[float] = field(default_factory=list)
    capture_us: list[int] = field(default_factory=list)
    """Per frame received, in order: its capture timestamp (client wall clock, microseconds)."""
    server_stats: weir_pb2.StreamStats | None = None
    recording_events: list[weir_pb2.RecordingStatus] = field(default_factory=list)
    """Every RecordingStatus the server sent during the stream, in order."""
    recordings: list[weir_pb2.RecordingStatus] = field(default_factory=list)
    """The stream's recordings as StreamEnded listed them (finished ones can be fetched)."""
    sent: int = 0
    started_s: float = 0.0
    finished_s: float = 0.0
    admission_retries: int = 0
    """Refusals (RESOURCE_EXHAUSTED) before the stream was admitted (with retry_for_s)."""
    admission_wait_s: float = 0.0
    """Time from the first open to the one that was admitted."""

    @property
    def seqs(self) -> list[int]:
        return [s for s, _ in self.frames]

    @property
    def fps(self) -> float:
        span = self.finished_s - self.started_s
        return len(self.frames) / span if span > 0 else 0.0


def channel(address: str) -> grpc.aio.Channel:
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    return grpc.aio.insecure_channel(address, options=opts)


def metadata(app_name: str) -> tuple[tuple[str, str], ...]:
    return (("application", app_name),)


async def stream_frames(
    address: str,
    frames: Iterable[np.ndarray],
    opts: OpenOptions,
    *,
    app_name: str = "weir",
    on_frame: Callable[[int, np.ndarray, float], None] | None = None,
    extra_messages: Callable[[int], list[weir_pb2.ClientMessage]] | None = None,
    stop_after: int | None = None,
    pace: bool = True,
    retry_for_s: float = 0.0,
    on_refused: Callable[[AdmissionRefusedError, float], None] | None = None,
) -> StreamResult:
    """Run one stream to its end. `extra_messages(i)` may inject messages before frame i (e.g. controls,
    a corrupt frame); `stop_after=k` cancels the call after k frames were sent (a vanishing client);
    `retry_for_s` asks again after a refusal, at its retry hint, for up to that long (module docstring),
    calling `on_refused(error, seconds until the next try)` before each wait."""
    first_open = time.monotonic()
    retries = 0
    while True:
        try:
            result = await _stream_once(address, frames, opts, app_name=app_name, on_frame=on_frame,
                                        extra_messages=extra_messages, stop_after=stop_after, pace=pace)
        except AdmissionRefusedError as err:
            wait_s = max(0.1, err.retry_after_s or 1.0)
            if time.monotonic() + wait_s - first_open > retry_for_s:
                raise
            retries += 1
            if on_refused is not None:
                on_refused(err, wait_s)
            await asyncio.sleep(wait_s)
            continue
        result.admission_retries = retries
        result.admission_wait_s = result.started_s - first_open
        return result


async def _stream_once(address: str, frames: Iterable[np.ndarray], opts: OpenOptions, *, app_name: str,
                       on_frame, extra_messages, stop_after: int | None, pace: bool) -> StreamResult:
    """One open of a stream, run to its end (stream_frames without the retries)."""
    codec = FrameCodec()
    result = StreamResult()
    capture_us: dict[int, int] = {}
    async with channel(address) as ch:
        stub = weir_pb2_grpc.WeirStub(ch)
        opened = asyncio.Event()

        async def write_requests() -> None:
            """The client's side of the call, written by this task (not a request generator: gRPC
            closes one when the call ends, which fails while it waits inside, on `opened` or a pacing
            sleep; a writing task is cancelled here instead)."""
            await call.write(opts.message())
            await opened.wait()
            t0 = time.monotonic()
            for i, frame in enumerate(frames):
                if stop_after is not None and i >= stop_after:
                    call.cancel()
                    return
                for extra in extra_messages(i) if extra_messages else []:
                    await call.write(extra)
                if pace:
                    delay = t0 + i / opts.fps - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                ts = time.time_ns() // 1000
                capture_us[i] = ts
                await call.write(codec.frame_message(i, frame, ts, jpeg=opts.jpeg_in))
                result.sent += 1
            await call.write(weir_pb2.ClientMessage(control=weir_pb2.Control(end=weir_pb2.End())))
            await call.done_writing()

        result.started_s = time.monotonic()
        call = stub.Stream(metadata=metadata(app_name))
        writer = asyncio.create_task(write_requests())
        writer.add_done_callback(lambda task: _cancel_on_failure(task, call))
        try:
            async for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "opened":
                    result.stream_id = msg.opened.stream_id
                    result.open_ms = (time.monotonic() - result.started_s) * 1000
                    opened.set()
                elif kind == "frame":
                    now = time.monotonic()
                    if not result.frames:
                        result.ttff_ms = (now - result.started_s) * 1000
                    img = codec.output_to_array(msg.frame)
                    result.frames.append((msg.frame.seq, img))
                    result.latencies_ms.append((time.time_ns() // 1000 - msg.frame.capture_ts_us) / 1000)
                    result.capture_us.append(msg.frame.capture_ts_us)
                    if on_frame is not None:
                        on_frame(msg.frame.seq, img, result.latencies_ms[-1])
                elif kind == "stats":
                    result.server_stats = msg.stats
                elif kind == "recording":
                    result.recording_events.append(msg.recording)
                elif kind == "ended":
                    result.server_stats = msg.ended.stats
                    result.recordings = list(msg.ended.recordings)
                elif kind == "error":
                    pass  # the status code that follows carries it
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and stop_after is not None:
                result.finished_s = time.monotonic()
                return result
            raise error_from_status(err.code(), err.details() or "", dict(err.trailing_metadata() or ())) from err
        except asyncio.CancelledError:
            if stop_after is None:
                raise
        finally:
            await _finish_writer(writer)
        result.finished_s = time.monotonic()
    return result


_CALL_ENDED = (asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)
"""What a stream's writing task fails with when its call ends under it."""


def _cancel_on_failure(writer: asyncio.Task, call) -> None:
    """A writing task that failed on its own (its frames, say) cancels the call, so the reading side
    stops waiting for a server that waits for frames; `_finish_writer` then raises the failure."""
    if not writer.cancelled() and writer.exception() is not None and not isinstance(writer.exception(), _CALL_ENDED):
        call.cancel()


async def _finish_writer(writer: asyncio.Task) -> None:
    """Stop a stream's writing task once its call has ended, and raise what it failed with, unless
    that is the call having ended under it (the call's own status says how it ended)."""
    if not writer.done():
        writer.cancel()
    try:
        await writer
    except _CALL_ENDED:
        pass


async def unary(address: str, method: str, request, *, app_name: str = "weir"):
    """Call a unary RPC (Health, ListModels, GetStreamStats); typed errors as in stream_frames."""
    async with channel(address) as ch:
        stub = weir_pb2_grpc.WeirStub(ch)
        try:
            return await getattr(stub, method)(request, metadata=metadata(app_name))
        except grpc.aio.AioRpcError as err:
            raise error_from_status(err.code(), err.details() or "", dict(err.trailing_metadata() or ())) from err


async def fetch_recording(address: str, recording_id: str, path: str, *, api_key: str = "",
                          app_name: str = "weir") -> int:
    """Download a finished recording to `path` (written to a temporary name, renamed when complete);
    returns its size. Typed errors as in stream_frames (RecordingNotFoundError for an unknown id)."""
    tmp = f"{path}.part"
    size = expected = 0
    try:
        async with channel(address) as ch:
            stub = weir_pb2_grpc.WeirStub(ch)
            request = weir_pb2.FetchRecordingRequest(recording_id=recording_id, api_key=api_key)
            with open(tmp, "wb") as f:
                async for chunk in stub.FetchRecording(request, metadata=metadata(app_name)):
                    if not chunk.data:
                        continue  # a failed call's status carrier
                    if chunk.offset != size:
                        raise WeirError(f"recording {recording_id}: chunk at offset {chunk.offset}, expected {size}")
                    f.write(chunk.data)
                    size += len(chunk.data)
                    expected = chunk.total_bytes
        if size == 0 or size != expected:
            raise WeirError(f"recording {recording_id}: received {size} of {expected} bytes")
        os.replace(tmp, path)
        return size
    except grpc.aio.AioRpcError as err:
        raise error_from_status(err.code(), err.details() or "", dict(err.trailing_metadata() or ())) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
