"""gRPC ingress: one bidirectional `Stream` RPC per client stream, plus Health, ListModels, GetStreamStats.

`IngressCore` holds the whole per-stream protocol and knows nothing of the transport: it takes an async
iterator of ClientMessage and yields ServerMessage, raising a WeirError when the stream must end. Two
transports drive it:

    Ingress              the Serve deployment behind Serve's gRPC proxy (bidi via gRPCInputStream)
    PlainIngressServicer a plain grpc.aio servicer (`serve_plain_grpc`), for when the proxy's per-message
                         actor call becomes the bottleneck

Both map errors through deployments.errors.status_of: the error is sent in-band as a StreamError, then
the call ends with the mapped status code and trailing metadata (e.g. "retry-after-ms").

Per stream: the reader task decodes frames (codec) and pushes them to the owning pipeline in order;
the writer relays the pipeline's output events. A client that goes away cancels both, and the
pipeline closes the stream (no other stream loses a frame).

Recordings (deployments.recording) live here, where every output frame passes: the writer hands each
frame to the stream's running recording (a non-blocking put; encoding is on the recording's thread),
Control.start_recording / stop_recording (or StreamOpen.record) start and stop one, each start and
each end is told to the client as a RecordingStatus, StreamEnded lists them all, and FetchRecording
streams a finished file back. Other transports (a web page) get all of it through `stream` and
`fetch_recording` unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from ray import serve
from ray.serve.grpc_util import gRPCInputStream

from deployments.codec import FrameCodec
from deployments.config import ServiceConfig
from deployments.errors import status_of, unwrap
from deployments.messages import AdmissionGrant, OpenRequest, StreamEvent
from deployments.pipeline import now_us
from deployments.recording import FAILED, FINISHED, RECORDING, RecordingInfo, RecordingStore, StreamRecordings
from deployments.tenants import TenantGate
from protos import weir_pb2, weir_pb2_grpc
from stages.errors import (
    AdmissionRefusedError,
    BadRequestError,
    SLOUnattainableError,
    StreamNotFoundError,
    UnauthenticatedError,
    WeirError,
)

log = logging.getLogger("weir.ingress")

_OUTCOME = {
    AdmissionRefusedError: "refused",
    SLOUnattainableError: "slo_unattainable",
    UnauthenticatedError: "unauthenticated",
    BadRequestError: "bad_request",
}


RECORDING_FINISH_TIMEOUT_S = 30.0
"""At a clean end, how long StreamEnded waits for the stream's recordings to be finished."""
OPEN_ATTEMPTS = 3
"""Placements of one stream before a full replica's refusal reaches the client (`IngressCore._place`)."""
OPEN_RETRY_S = 0.5
"""Pause between them: half the pipelines' load-report interval (1 s), so the router sees the full replica."""
_RECORDING_STATES = {RECORDING: weir_pb2.RECORDING_STARTED, FINISHED: weir_pb2.RECORDING_FINISHED,
                     FAILED: weir_pb2.RECORDING_FAILED}


class _End:
    """Sentinel: the output side finished cleanly."""


_CLEANUPS: set[asyncio.Task] = set()
"""Running stream cleanups (strong references, so a shielded cleanup is not collected mid-way)."""


class ChunkBatcher:
    """Groups a stream's input frames into the pipeline's chunks (the first `first` frames, then
    `chunk` at a time), so the ingress makes one push call per chunk instead of one per frame.

    This adds no latency: the pipeline cannot start a chunk before its last frame has arrived, and
    the ingress pushes the chunk as soon as that frame is decoded. Controls and the end flush a
    partial chunk first, so frames and controls keep their order. Each frame keeps its own receive
    time, so deadlines are unchanged.

    Example: ChunkBatcher(1, 4): frame 0 is pushed alone, then frames 1-4, 5-8, ...
    """

    def __init__(self, first: int, chunk: int) -> None:
        if first < 1 or chunk < 1:
            raise ValueError(f"first={first} and chunk={chunk} must be >= 1")
        self.first, self.chunk = first, chunk
        self.count = 0
        """Frames added so far."""
        self._pending: list = []

    def add(self, frame) -> bool:
        """Add one frame; True when it completes a chunk (then `take` it)."""
        self._pending.append(frame)
        self.count += 1
        return self.count == self.first or (self.count > self.first and (self.count - self.first) % self.chunk == 0)

    def take(self) -> list:
        """The frames added since the last take (possibly a partial chunk)."""
        frames, self._pending = self._pending, []
        return frames


class IngressCore:
    """The stream protocol over injected router / pipeline / metrics clients (Serve deployment handles)."""

    def __init__(self, service: ServiceConfig, router, pipelines: dict, metrics=None,
                 codec: FrameCodec | None = None, recordings: RecordingStore | None = None) -> None:
        self.service = service
        self.router = router
        self.pipelines = pipelines
        self.metrics = metrics
        self.codec = codec or FrameCodec()
        self.tenants = TenantGate(service.tenants)
        self.recordings = recordings or RecordingStore.from_service(service)

    # ---- the bidi stream -------------------------------------------------------------------------------

    async def stream(self, requests: AsyncIterator[weir_pb2.ClientMessage]) -> AsyncIterator[weir_pb2.ServerMessage]:
        """Run one stream. Raises WeirError (mapped by the transport) when it cannot go on."""
        opened_us = now_us()
        req, grant = await self._open(requests, opened_us)
        pipeline = self.pipelines[grant.pipeline]
        stream_id = grant.stream_id
        yield weir_pb2.ServerMessage(opened=weir_pb2.StreamOpened(
            stream_id=stream_id, model=req.model or self.service.pipelines[0].model,
            first_chunk_frames=grant.first_chunk_frames, chunk_frames=grant.chunk_frames,
            predicted_ttff_ms=grant.predicted_ttff_ms,
        ))
        out: asyncio.Queue = asyncio.Queue()
        recordings = StreamRecordings(
            self.recordings, tenant=req.tenant, stream_id=stream_id, fps=req.input_fps, height=req.height,
            width=req.width, notify=lambda info: out.put_nowait(_recording_message(info)),
        )
        if req.record:
            out.put_nowait(_recording_message(recordings.start()))
        batcher = ChunkBatcher(grant.first_chunk_frames, grant.chunk_frames)
        reader = asyncio.create_task(self._read(requests, pipeline, stream_id, req, out, recordings, batcher))
        writer = asyncio.create_task(self._write(pipeline, stream_id, req, out, recordings))
        clean = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, _End):
                    clean = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            writer.cancel()
            recordings.abandon()  # a running recording is finished and published on its own thread
            # Its own task, shielded: a transport that cancels the task running this stream while it
            # cleans up (a WebRTC peer closing right after the end) must not cancel the release too,
            # or the stream's slot and its tenant's quota would stay taken.
            cleanup = asyncio.ensure_future(self._release(pipeline, stream_id, close=not clean))
            _CLEANUPS.add(cleanup)
            cleanup.add_done_callback(_CLEANUPS.discard)
            await asyncio.shield(cleanup)

    async def _release(self, pipeline, stream_id: str, *, close: bool) -> None:
        """Close the stream on its pipeline (when it did not end cleanly) and free its router slot."""
        if close:
            await self._quietly(pipeline.close.remote(stream_id))
        await self._quietly(self.router.release.remote(stream_id))  # also the tenant's stream quota

    async def _open(self, requests, opened_us: int) -> tuple[OpenRequest, AdmissionGrant]:
        tier = "standard"
        try:
            try:
                first = await requests.__anext__()
            except StopAsyncIteration:
                raise BadRequestError("the stream ended before its StreamOpen message", field="open") from None
            if first.WhichOneof("kind") != "open":
                raise BadRequestError("the first message of a stream must be StreamOpen", field="open")
            # scrypt off the event loop; raises UnauthenticatedError, whose message never holds the key
            tenant = await asyncio.to_thread(self.tenants.authenticate, first.open.api_key)
            tier = tenant.tier
            req = self.codec.parse_open(first.open, tenant=tenant.name, tier=tier)
            self.tenants.check(tenant, height=req.height, width=req.width, num_steps=req.num_steps)
            stream_id = uuid.uuid4().hex[:16]
            grant = await self._place(stream_id, req, opened_us)
        except BaseException as exc:
            outcome = next((o for t, o in _OUTCOME.items() if isinstance(exc, t)), "error")
            if isinstance(exc, WeirError) and "quota" in exc.details:
                outcome = "over_quota"
            self._record_open(tier, outcome)
            raise
        self._record_open(tier, "admitted")
        return req, grant

    async def _place(self, stream_id: str, req: OpenRequest, opened_us: int) -> AdmissionGrant:
        """Admit the stream at the router (which counts the tenant's concurrent streams across ingress
        replicas and picks the replica), then open it there.

        A replica can turn out to be full after the router granted it a stream: its last load report
        lagged behind a stream it has just taken, or the grant named only the pool and Serve routed
        the call to a busy replica. Then the grant is given back and the stream is placed again, up to
        OPEN_ATTEMPTS times, OPEN_RETRY_S apart, before the client hears RESOURCE_EXHAUSTED: a slot
        that exists must not be refused. Any other error gives the grant back and ends the open.
        """
        for attempt in range(OPEN_ATTEMPTS):
            grant = await _call(self.router.admit.remote(stream_id, req))
            try:
                await _call(self.pipelines[grant.pipeline].open.remote(stream_id, req, opened_us,
                                                                       replica=grant.replica))
                return grant
            except AdmissionRefusedError as exc:
                await self._quietly(self.router.release.remote(stream_id))
                if "pipeline" not in exc.details or attempt == OPEN_ATTEMPTS - 1:
                    raise
                log.info("stream %s: pipeline %s was full after its grant; placing it again", stream_id,
                         exc.details["pipeline"])
                await asyncio.sleep(OPEN_RETRY_S)
            except BaseException:
                await self._quietly(self.router.release.remote(stream_id))
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _read(self, requests, pipeline, stream_id: str, req: OpenRequest, out: asyncio.Queue,
                    recordings: StreamRecordings, batcher: ChunkBatcher | None = None) -> None:
        """Client -> pipeline, in order, a chunk's frames per push (ChunkBatcher). Any error ends the
        stream through `out`."""
        batcher = batcher or ChunkBatcher(1, 1)
        paused, paused_frames = False, 0

        async def flush() -> None:
            frames = batcher.take()
            if frames:
                await _call(pipeline.push.remote(stream_id, frames))

        try:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                if kind == "frame":
                    if paused:
                        paused_frames += 1
                        continue
                    frame = self.codec.decode_frame(msg.frame, req.height, req.width, now_us())
                    if batcher.add(frame):
                        await flush()
                    continue
                await flush()  # a control applies after every frame sent before it
                if kind == "control":
                    op = msg.control.WhichOneof("kind")
                    if op == "set_prompt":
                        change = self.codec.parse_set_prompt(msg.control.set_prompt)
                        await _call(pipeline.control.remote(stream_id, "prompt", change))
                    elif op == "start_recording":
                        out.put_nowait(_recording_message(recordings.start()))
                    elif op == "stop_recording":
                        reply = recordings.stop()
                        if reply is not None:
                            out.put_nowait(_recording_message(reply))
                    elif op == "set_steps":
                        n = msg.control.set_steps.num_steps
                        if not 1 <= n <= 4:
                            raise BadRequestError(f"num_steps={n} must be 1..4", field="num_steps")
                        await _call(pipeline.control.remote(stream_id, "steps", n))
                    elif op == "pause":
                        paused = True
                    elif op == "resume":
                        paused = False
                        if paused_frames:
                            await _call(pipeline.control.remote(stream_id, "paused", paused_frames))
                            paused_frames = 0
                    elif op == "end":
                        break
                elif kind == "open":
                    raise BadRequestError("StreamOpen may only be the first message", field="open")
            if getattr(requests, "is_cancelled", lambda: False)():
                out.put_nowait(asyncio.CancelledError())  # the client went away: nothing more to send
                return
            await flush()
            if paused_frames:
                await _call(pipeline.control.remote(stream_id, "paused", paused_frames))
            await _call(pipeline.control.remote(stream_id, "end"))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the stream to map
            out.put_nowait(unwrap(exc))

    async def _write(self, pipeline, stream_id: str, req: OpenRequest, out: asyncio.Queue,
                     recordings: StreamRecordings) -> None:
        """Pipeline -> client: frames (encoded as the client asked; the running recording gets each
        one too), stats, the end (after the stream's recordings are finished)."""
        try:
            gen = pipeline.options(stream=True).events.remote(stream_id)
            async for ev in gen:
                ev: StreamEvent
                for f in ev.frames:
                    recordings.add(f.frame)
                    out.put_nowait(weir_pb2.ServerMessage(
                        frame=self.codec.encode_frame(f, jpeg=req.output_jpeg, quality=req.jpeg_quality)))
                if ev.error is not None:
                    out.put_nowait(unwrap(ev.error))
                    return
                if ev.ended:
                    stats = self.codec.encode_stats(ev.stats) if ev.stats else weir_pb2.StreamStats()
                    infos = await recordings.finish(RECORDING_FINISH_TIMEOUT_S)
                    out.put_nowait(weir_pb2.ServerMessage(ended=weir_pb2.StreamEnded(
                        stats=stats, recordings=[_recording_status(i) for i in infos])))
                    out.put_nowait(_End())
                    return
                if ev.stats is not None:
                    out.put_nowait(weir_pb2.ServerMessage(stats=self.codec.encode_stats(ev.stats)))
            out.put_nowait(_End())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            out.put_nowait(unwrap(exc))

    # ---- unary ------------------------------------------------------------------------------------------

    async def health(self) -> weir_pb2.HealthResponse:
        cap = await _call(self.router.capacity.remote())
        return weir_pb2.HealthResponse(
            healthy=cap["healthy_pipelines"] > 0, pipelines=cap["pipelines"],
            healthy_pipelines=cap["healthy_pipelines"], active_streams=cap["active_streams"],
            free_stream_slots=cap["free_stream_slots"],
        )

    async def list_models(self) -> weir_pb2.ListModelsResponse:
        rows = await _call(self.router.models.remote())
        return weir_pb2.ListModelsResponse(models=[
            weir_pb2.ModelInfo(model=r["model"], vaes=r["vaes"], device=r["device"], gpu_type=r["gpu_type"],
                               pipelines=r["pipelines"], free_stream_slots=r["free_stream_slots"], max_side=2048)
            for r in rows
        ])

    async def stream_stats(self, stream_id: str) -> weir_pb2.StreamStats:
        name = await _call(self.router.locate.remote(stream_id))
        if name is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open", stream_id=stream_id)
        return self.codec.encode_stats(await _call(self.pipelines[name].stream_stats.remote(stream_id)))

    async def fetch_recording(self, recording_id: str, api_key: str = "") -> AsyncIterator[weir_pb2.RecordingChunk]:
        """A finished recording of the caller's tenant as RecordingChunk messages (1 MiB each), in order.
        Raises UnauthenticatedError, BadRequestError (malformed id), RecordingNotFoundError."""
        tenant = await asyncio.to_thread(self.tenants.authenticate, api_key)
        async for offset, total, data in self.recordings.read(recording_id, tenant.name):
            yield weir_pb2.RecordingChunk(recording_id=recording_id, offset=offset, total_bytes=total, data=data)

    # ---- helpers -----------------------------------------------------------------------------------------

    def _record_open(self, tier: str, outcome: str) -> None:
        if self.metrics is not None:
            try:
                self.metrics.record_open.remote(tier, outcome)
            except Exception:  # noqa: BLE001 - metrics never fail a stream
                pass

    @staticmethod
    async def _quietly(awaitable, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(_call(awaitable), timeout)
        except BaseException:  # noqa: BLE001 - best-effort cleanup
            pass


def _recording_status(info: RecordingInfo) -> weir_pb2.RecordingStatus:
    return weir_pb2.RecordingStatus(
        recording_id=info.recording_id, state=_RECORDING_STATES[info.state], frames=info.frames,
        bytes=info.bytes, frames_dropped=info.frames_dropped, message=info.message,
    )


def _recording_message(info: RecordingInfo) -> weir_pb2.ServerMessage:
    return weir_pb2.ServerMessage(recording=_recording_status(info))


async def _call(awaitable):
    """Await a handle call, re-raising the replica's own exception instead of Ray's wrapper."""
    try:
        return await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        inner = unwrap(exc)
        if inner is exc:
            raise
        raise inner from None


# ---- Serve transport -----------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1024)
class Ingress:
    """The Serve gRPC servicer: method names match weir.proto's service `Weir`."""

    def __init__(self, service: ServiceConfig, router, pipelines: dict, metrics=None) -> None:
        self.core = IngressCore(service, router, pipelines, metrics)

    async def __call__(self, request):
        """HTTP: GET /metrics is the Prometheus endpoint (rendered by the Metrics deployment)."""
        from starlette.responses import PlainTextResponse, Response

        if request.url.path.rstrip("/").endswith("/metrics") and self.core.metrics is not None:
            body = await self.core.metrics.render.remote()
            return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
        return PlainTextResponse("Weir speaks gRPC (service weir.v1.Weir); metrics at /metrics\n", status_code=404)

    async def Stream(self, request_stream: gRPCInputStream, grpc_context):  # noqa: N802 - gRPC method name
        try:
            async for msg in self.core.stream(request_stream):
                yield msg
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every error ends the call with its mapped status
            status = _set_status(grpc_context, exc)
            _log_status(status, exc)
            yield weir_pb2.ServerMessage(error=status.error)

    async def Health(self, request: weir_pb2.HealthRequest, grpc_context) -> weir_pb2.HealthResponse:  # noqa: N802
        return await self._unary(self.core.health(), weir_pb2.HealthResponse, grpc_context)

    async def ListModels(self, request, grpc_context) -> weir_pb2.ListModelsResponse:  # noqa: N802
        return await self._unary(self.core.list_models(), weir_pb2.ListModelsResponse, grpc_context)

    async def GetStreamStats(self, request, grpc_context) -> weir_pb2.StreamStats:  # noqa: N802
        return await self._unary(self.core.stream_stats(request.stream_id), weir_pb2.StreamStats, grpc_context)

    async def FetchRecording(self, request: weir_pb2.FetchRecordingRequest, grpc_context):  # noqa: N802
        try:
            async for chunk in self.core.fetch_recording(request.recording_id, request.api_key):
                yield chunk
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the call ends with the mapped status
            _set_status(grpc_context, exc)
            # the proxy applies a status only with a message: one empty chunk carries it (as Stream's
            # StreamError does); clients ignore chunks without data
            yield weir_pb2.RecordingChunk(recording_id=request.recording_id)

    @staticmethod
    async def _unary(coro, empty_type, grpc_context):
        try:
            return await coro
        except BaseException as exc:  # noqa: BLE001
            _set_status(grpc_context, exc)
            return empty_type()


def _set_status(grpc_context, exc: BaseException):
    """Set the mapped status of `exc` on a call's context (applied with the next message); returns it."""
    status = status_of(unwrap(exc))
    grpc_context.set_code(status.code)
    grpc_context.set_details(status.details)
    grpc_context.set_trailing_metadata(list(status.trailing_metadata))
    return status


def _log_status(status, exc: BaseException) -> None:
    if status.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
        log.error("stream failed: %s", status.details, exc_info=exc)
    else:
        log.info("stream ended with %s: %s", status.code.name, status.details)


# ---- plain grpc.aio transport --------------------------------------------------------------------------


class PlainIngressServicer(weir_pb2_grpc.WeirServicer):
    """The same protocol on a plain grpc.aio server (no Serve proxy hop); see `serve_plain_grpc`."""

    def __init__(self, core: IngressCore) -> None:
        self.core = core

    async def Stream(self, request_iterator, context):  # noqa: N802
        try:
            async for msg in self.core.stream(request_iterator.__aiter__()):
                yield msg
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            status = _set_status(context, exc)
            _log_status(status, exc)
            yield weir_pb2.ServerMessage(error=status.error)

    async def Health(self, request, context):  # noqa: N802
        return await self._unary(self.core.health(), context)

    async def ListModels(self, request, context):  # noqa: N802
        return await self._unary(self.core.list_models(), context)

    async def GetStreamStats(self, request, context):  # noqa: N802
        return await self._unary(self.core.stream_stats(request.stream_id), context)

    async def FetchRecording(self, request, context):  # noqa: N802
        try:
            async for chunk in self.core.fetch_recording(request.recording_id, request.api_key):
                yield chunk
        except WeirError as exc:
            status = status_of(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)

    @staticmethod
    async def _unary(coro, context):
        try:
            return await coro
        except WeirError as exc:
            status = status_of(exc)
            await context.abort(status.code, status.details, status.trailing_metadata)


async def serve_plain_grpc(service: ServiceConfig, port: int, host: str = "[::]") -> grpc.aio.Server:
    """Start a plain grpc.aio ingress in this process, talking to a running Weir app through handles."""
    router = serve.get_deployment_handle("Router", service.app_name)
    pipelines = {n: serve.get_deployment_handle(n, service.app_name) for n in service.pipeline_names}
    metrics = serve.get_deployment_handle("Metrics", service.app_name)
    server = grpc.aio.server()
    weir_pb2_grpc.add_WeirServicer_to_server(PlainIngressServicer(IngressCore(service, router, pipelines, metrics)),
                                             server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server
