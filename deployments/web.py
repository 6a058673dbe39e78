"""The browser client: a web page served by Weir, streaming over WebRTC or a WebSocket.

A second Serve application on the HTTP proxy, beside the gRPC one (`deployments.app.start`):

    GET  {prefix}/              the page (deployments/static): camera or file in, the styled video out
    GET  {prefix}/config        what the page may offer: WebRTC or not, resolution presets, models
    POST {prefix}/offer         WebRTC signalling: {"sdp", "type": "offer", "open": StreamOpen} -> answer
    WS   {prefix}/ws            the WebSocket stream: JSON controls, binary JPEG frames both ways
    GET  {prefix}/recordings/ID a finished server-side recording's MP4 (API key in `x-api-key`)

Both transports drive `deployments.ingress.IngressCore` with the same weir.v1.ClientMessage protobufs
as a gRPC stream (see deployments/web_protocol.py), reaching the app's Router, pipelines and Metrics
through deployment handles: a browser stream is admitted, rate-limited, measured and refused exactly
like a gRPC one. Typed errors reach the page with the HTTP status matching their gRPC code.

YAML: add an application `{name: weir-web, route_prefix: /web, import_path: deployments.web:build_web_app,
args: <the gRPC app's args>, plus optionally web: {WebConfig fields}}`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations, and in
# a replica this module's classes arrive pickled by value, so string annotations could not be resolved.
import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from deployments.config import ServiceConfig
from deployments.errors import unwrap
from deployments.ingress import IngressCore
from deployments.pipeline import now_us
from deployments.web_protocol import (
    ClientFeed,
    applied_json,
    error_json,
    frame_bytes,
    json_object,
    open_message,
    parse_frame,
    parse_text,
    to_json,
)
from protos import weir_pb2
from stages.errors import AdmissionRefusedError, BadRequestError, WeirError

log = logging.getLogger("weir.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
MAX_OFFER_BYTES = 256 * 1024

RESOLUTION_PRESETS: tuple[tuple[str, int, int], ...] = (
    ("64 x 64 (tiny model)", 64, 64),
    ("32 x 32 (tiny model)", 32, 32),
    ("64 x 96 (tiny model)", 64, 96),
    ("480 x 832 (Wan landscape)", 480, 832),
    ("832 x 480 (Wan portrait)", 832, 480),
    ("512 x 512", 512, 512),
)
"""(label, height, width) the page offers; any multiple of 16 can still be asked for by a client."""


@dataclass(frozen=True)
class WebConfig:
    """The web ingress. Defaults: page and endpoints under /web, WebRTC where aiortc is installed."""

    route_prefix: str = "/web"
    """Where the page and its endpoints live on Serve's HTTP port (a path other than '/')."""
    webrtc: bool = True
    """Offer WebRTC (needs the `web` extra); without it the page streams over the WebSocket."""
    ice_addresses: tuple[str, ...] = ()
    """Local addresses WebRTC media may use, for the replica's candidates and the browser's alike.
    () = any (every non-loopback interface); ('127.0.0.1',) keeps media on loopback for a browser on
    the same host."""
    max_peers: int = 64
    """WebRTC streams one web replica holds at once (each decodes and encodes video); more are refused."""
    max_waiting_frames: int = 8
    """Input frames a stream may have waiting for its pipeline before the oldest is dropped."""
    jpeg_quality: int = 80
    """Quality (1..100) of the JPEG frames the WebSocket sends back, unless the page asks for another."""
    num_replicas: int = 1
    """Web ingress replicas (WebRTC media runs in them)."""

    def __post_init__(self) -> None:
        if not self.route_prefix.startswith("/") or self.route_prefix.rstrip("/") == "":
            raise ValueError(f"route_prefix={self.route_prefix!r} must be a path like '/web' (not '/': "
                             "the gRPC app's HTTP routes live there)")
        for address in self.ice_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"ice_addresses has {address!r}; give IP addresses like '127.0.0.1'") from None
        if self.max_peers < 1 or self.max_waiting_frames < 1 or self.num_replicas < 1:
            raise ValueError("max_peers, max_waiting_frames and num_replicas must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality} must be 1..100")

    @classmethod
    def from_dict(cls, data: dict | None) -> "WebConfig":
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown web option(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        if "ice_addresses" in data:
            data["ice_addresses"] = tuple(data["ice_addresses"])
        return cls(**data)


def webrtc_available() -> bool:
    try:
        import aiortc  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the deployment ------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress()
class WebIngress:
    """Serve's HTTP proxy -> the page, the WebSocket stream and WebRTC signalling."""

    def __init__(self, service: ServiceConfig, web: WebConfig) -> None:
        router = serve.get_deployment_handle("Router", service.app_name)
        pipelines = {n: serve.get_deployment_handle(n, service.app_name) for n in service.pipeline_names}
        metrics = serve.get_deployment_handle("Metrics", service.app_name)
        self.service = service
        self.web = web
        self.core = IngressCore(service, router, pipelines, metrics)
        self.webrtc = web.webrtc and webrtc_available()
        if self.webrtc and web.ice_addresses:
            from deployments.webrtc import use_host_addresses

            use_host_addresses(web.ice_addresses)
        self.peers: set = set()
        self.static = {p.name: p.read_bytes() for p in STATIC_DIR.iterdir() if p.suffix in STATIC_TYPES}

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="Weir", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/")
        async def page(request: Request) -> Response:
            base = request.scope.get("root_path", "").rstrip("/") + "/"
            html = self.static["index.html"].decode().replace("{{BASE}}", base)
            return Response(html, media_type=STATIC_TYPES[".html"], headers={"cache-control": "no-cache"})

        @app.get("/static/{name}")
        async def static(name: str) -> Response:
            if name not in self.static:
                return Response("not found\n", status_code=404, media_type="text/plain")
            return Response(self.static[name], media_type=STATIC_TYPES[Path(name).suffix],
                            headers={"cache-control": "no-cache"})

        @app.get("/config")
        async def config() -> JSONResponse:
            try:
                models = to_json(await self.core.list_models()).get("models", [])
            except Exception as exc:  # noqa: BLE001 - the page still loads; it shows the model as unknown
                log.warning("list_models failed: %s", exc)
                models = []
            return JSONResponse({
                "webrtc": self.webrtc,
                "presets": [{"label": label, "height": h, "width": w} for label, h, w in RESOLUTION_PRESETS],
                "models": models,
                "auth": not self.core.tenants.open_access,
                "stream_open_fields": sorted(weir_pb2.StreamOpen.DESCRIPTOR.fields_by_name),
                "control_fields": sorted(weir_pb2.Control.DESCRIPTOR.fields_by_name),
                "set_prompt_fields": sorted(weir_pb2.SetPrompt.DESCRIPTOR.fields_by_name),
            })

        @app.post("/offer")
        async def offer(request: Request) -> JSONResponse:
            try:
                answer = await self.answer_offer(await request.body())
            except Exception as exc:  # noqa: BLE001 - typed for the page
                body = error_json(unwrap(exc))
                return JSONResponse(body, status_code=body["http_status"])
            return JSONResponse(answer)

        @app.get("/recordings/{recording_id}")
        async def recording(recording_id: str, request: Request) -> Response:
            """A finished recording's MP4; the API key (if the server needs one) in `x-api-key`."""
            chunks = self.core.fetch_recording(recording_id, request.headers.get("x-api-key", ""))
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            except Exception as exc:  # noqa: BLE001 - typed for the page
                body = error_json(unwrap(exc))
                return JSONResponse(body, status_code=body["http_status"])

            async def body():
                if first is not None:
                    yield first.data
                async for chunk in chunks:
                    yield chunk.data

            return StreamingResponse(body(), media_type="video/mp4", headers={
                "content-disposition": f'attachment; filename="weir-{recording_id}.mp4"'})

        @app.websocket("/ws")
        async def ws(websocket: WebSocket) -> None:
            await WebSocketStream(self.core, websocket, self.web).run()

        return app

    # ---- WebRTC -------------------------------------------------------------------------------------------

    async def answer_offer(self, raw: bytes) -> dict:
        """Admit the stream described by the offer's `open`, then answer its SDP. Raises WeirError."""
        if not self.webrtc:
            raise BadRequestError("this server has no WebRTC (install the `web` extra); use the WebSocket",
                                  field="transport")
        body = json_object(raw, what="offer", field="sdp", max_size=MAX_OFFER_BYTES)
        if body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            raise BadRequestError('offer must be {"type": "offer", "sdp": "...", "open": {...}}', field="sdp")
        if len(self.peers) >= self.web.max_peers:
            raise AdmissionRefusedError(f"this web ingress holds {len(self.peers)} WebRTC streams, its maximum",
                                        retry_after_s=self.service.retry_after_s, max_peers=self.web.max_peers)
        from deployments.webrtc import PeerStream

        open_msg = open_message(body.get("open"), output_encoding=weir_pb2.RAW_RGB24)
        peer = PeerStream(self.core, addresses=self.web.ice_addresses,
                          max_waiting_frames=self.web.max_waiting_frames, on_closed=self.peers.discard)
        self.peers.add(peer)
        try:
            opened, sdp = await peer.start(open_msg, body["sdp"])
        except BaseException:
            self.peers.discard(peer)
            raise
        return {"type": "answer", "sdp": sdp, **to_json(opened)}


class WebSocketStream:
    """One browser stream over a WebSocket: the first text message is the open, then JSON and frames.

    One writer task sends everything, in order; a typed error is sent as JSON, then the socket closes
    with code 4000 + its HTTP status (e.g. 4429 for a refused stream).
    """

    def __init__(self, core: IngressCore, websocket, web: WebConfig) -> None:
        self.core = core
        self.websocket = websocket
        self.web = web
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.feed = ClientFeed(max_frames=web.max_waiting_frames,
                               on_applied=lambda control: self.outbox.put_nowait(applied_json(control)))

    async def run(self) -> None:
        await self.websocket.accept()
        receiver = asyncio.create_task(self._receive())
        writer = asyncio.create_task(self._write())
        close_code = 1000
        try:
            async for msg in self.core.stream(self.feed):
                if msg.WhichOneof("kind") == "frame":
                    self.outbox.put_nowait(frame_bytes(msg.frame))
                else:
                    self.outbox.put_nowait(to_json(msg))
        except asyncio.CancelledError:
            if not self.feed.is_cancelled():
                raise
            close_code = 0  # the page went away: nothing to send or close
        except BaseException as exc:  # noqa: BLE001 - every error reaches the page typed
            body = error_json(unwrap(exc))
            self.outbox.put_nowait(body)
            close_code = 4000 + body["http_status"]
        finally:
            receiver.cancel()
            self.outbox.put_nowait(None)
            if close_code:
                await asyncio.gather(writer, return_exceptions=True)
                await self._quietly(self.websocket.close(code=close_code))
            else:
                writer.cancel()

    async def _receive(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    self.feed.abandon()
                    return
                if message.get("bytes") is not None:
                    self.feed.put(parse_frame(message["bytes"]))
                elif message.get("text") is not None:
                    item = parse_text(message["text"], open_encoding=weir_pb2.JPEG,
                                      jpeg_quality=self.web.jpeg_quality)
                    if isinstance(item, int):
                        self.outbox.put_nowait({"sync": {"t": item, "server_us": now_us()}})
                    else:
                        self.feed.put(item)
        except WeirError as exc:
            self.feed.fail(exc)

    async def _write(self) -> None:
        while (item := await self.outbox.get()) is not None:
            if isinstance(item, bytes):
                await self.websocket.send_bytes(item)
            else:
                await self.websocket.send_text(json.dumps(item))

    @staticmethod
    async def _quietly(awaitable) -> None:
        try:
            await awaitable
        except Exception:  # noqa: BLE001 - the socket may already be gone
            pass


# ---- building ------------------------------------------------------------------------------------------


def web_app_name(service: ServiceConfig) -> str:
    return f"{service.app_name}-web"


def build_web_application(service: ServiceConfig, web: WebConfig | None = None):
    """The bound web application; run it beside the gRPC app (`serve.run(..., route_prefix=web.route_prefix)`)."""
    web = web or WebConfig()
    return WebIngress.options(num_replicas=web.num_replicas, ray_actor_options={"num_cpus": 0}).bind(service, web)


def build_web_app(args: dict | None = None):
    """Serve config entry point: `import_path: deployments.web:build_web_app`, `args:` = the gRPC app's
    args (ServiceConfig fields) plus an optional `web:` mapping of WebConfig fields."""
    args = dict(args or {})
    web = WebConfig.from_dict(args.pop("web", None))
    return build_web_application(ServiceConfig.from_dict(args), web)
