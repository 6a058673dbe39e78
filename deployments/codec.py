"""Wire <-> Weir conversion, independent of the transport: decode and validate frames, parse StreamOpen,
encode output frames and stats. Used by the Serve ingress, the plain grpc.aio ingress and the client.

JPEG goes through libavcodec's MJPEG codec (PyAV) with strict error detection, so a truncated or
corrupt JPEG is a BadFrameError rather than a silently concealed picture.
"""

from __future__ import annotations

import numpy as np

from deployments.messages import (
    DEFAULT_FRAME_DEADLINE_MS,
    DEFAULT_INPUT_FPS,
    DEFAULT_TTFF_MS,
    InFrame,
    OpenRequest,
    OutFrame,
    PromptChange,
    StreamStatsSnapshot,
)
from protos import weir_pb2
from stages.errors import BadFrameError, BadRequestError
from stages.prompts import MAX_PROMPTS, PromptMix, WeightedPrompt, check_blend_chunks

MAX_SIDE = 2048
MAX_FPS = 120.0
MAX_PROMPT_CHARS = 2000
BLEND_MODES = {weir_pb2.BLEND_MODE_UNSPECIFIED: "linear", weir_pb2.BLEND_LINEAR: "linear",
               weir_pb2.BLEND_SLERP: "slerp"}
"""Wire BlendMode -> stages.prompts mode."""


class FrameCodec:
    """Stateless converter between protobuf messages and Weir's plain dataclasses."""

    # ---- client -> server -------------------------------------------------------------------------

    def parse_open(self, msg: weir_pb2.StreamOpen, *, tenant: str = "default", tier: str = "standard") -> OpenRequest:
        """Validate a StreamOpen and fill its defaults; raises BadRequestError naming the bad field."""
        num_steps = msg.num_steps or 2
        noise = msg.noise_strength or 0.8
        fps = msg.input_fps or DEFAULT_INPUT_FPS
        ttff = msg.slo.ttff_ms or DEFAULT_TTFF_MS
        deadline = msg.slo.frame_deadline_ms or DEFAULT_FRAME_DEADLINE_MS
        quality = msg.jpeg_quality or 85
        mix = self.parse_prompts(msg.prompt, msg.prompts, msg.blend)
        if not 1 <= num_steps <= 4:
            raise BadRequestError(f"num_steps={num_steps} must be 1..4", field="num_steps")
        if not 0.0 < noise <= 1.0:
            raise BadRequestError(f"noise_strength={noise} must be in (0, 1]", field="noise_strength")
        for name, side in (("height", msg.height), ("width", msg.width)):
            if side == 0 or side % 16 or side > MAX_SIDE:
                raise BadRequestError(f"{name}={side} must be a multiple of 16 in [16, {MAX_SIDE}]", field=name)
        if not 0.0 < fps <= MAX_FPS:
            raise BadRequestError(f"input_fps={fps} must be in (0, {MAX_FPS}]", field="input_fps")
        if ttff < 0 or deadline < 0:
            raise BadRequestError("SLO times must be >= 0 ms", field="slo")
        if msg.vae not in ("", "wan", "taehv"):
            raise BadRequestError(f"vae={msg.vae!r} must be 'wan' or 'taehv'", field="vae")
        if msg.output_encoding not in (weir_pb2.FRAME_ENCODING_UNSPECIFIED, weir_pb2.RAW_RGB24, weir_pb2.JPEG):
            raise BadRequestError(f"output_encoding={msg.output_encoding} is unknown", field="output_encoding")
        if not 1 <= quality <= 100:
            raise BadRequestError(f"jpeg_quality={quality} must be 1..100", field="jpeg_quality")
        return OpenRequest(
            prompt=msg.prompt or mix.describe(),
            num_steps=num_steps,
            noise_strength=float(noise),
            seed=int(msg.seed),
            height=int(msg.height),
            width=int(msg.width),
            input_fps=float(fps),
            model=msg.model,
            vae=msg.vae,
            ttff_ms=float(ttff),
            frame_deadline_ms=float(deadline),
            tenant=tenant,
            tier=tier,
            output_jpeg=msg.output_encoding == weir_pb2.JPEG,
            jpeg_quality=int(quality),
            client_label=msg.client_stream_id[:64],
            mix=mix if msg.prompts else None,
            record=bool(msg.record),
        )

    def parse_prompts(self, prompt: str, prompts, blend: int) -> PromptMix:
        """`prompt` or `prompts` (exactly one) and the BlendMode of a StreamOpen or SetPrompt, as a
        validated PromptMix; BadRequestError naming the field."""
        mode = BLEND_MODES.get(blend)
        if mode is None:
            raise BadRequestError(f"blend={blend} is not a known BlendMode", field="blend")
        if not prompts:
            if not prompt.strip():
                raise BadRequestError("prompt must not be empty", field="prompt")
            _check_prompt_length(prompt, "prompt")
            return PromptMix.of(prompt, mode)
        if prompt.strip():
            raise BadRequestError("set either prompt or prompts, not both", field="prompts")
        if len(prompts) > MAX_PROMPTS:
            raise BadRequestError(f"{len(prompts)} prompts: give 1..{MAX_PROMPTS}", field="prompts")
        for i, p in enumerate(prompts):
            if not p.prompt.strip():
                raise BadRequestError(f"prompts[{i}] is empty", field="prompts", index=i)
            _check_prompt_length(p.prompt, f"prompts[{i}]")
        return PromptMix(tuple(WeightedPrompt(p.prompt, float(p.weight)) for p in prompts), mode)

    def parse_set_prompt(self, msg: weir_pb2.SetPrompt) -> PromptChange:
        """A validated prompt change: the new prompt(s) and how many chunks to blend over."""
        mix = self.parse_prompts(msg.prompt, msg.prompts, msg.blend)
        return PromptChange(mix=mix, blend_chunks=check_blend_chunks(int(msg.blend_chunks)))

    def decode_frame(self, msg: weir_pb2.InputFrame, height: int, width: int, received_ts_us: int) -> InFrame:
        """Decode one input frame to uint8 [height, width, 3]; raises BadFrameError with the numbers."""
        if msg.encoding == weir_pb2.RAW_RGB24:
            expected = height * width * 3
            if (msg.height, msg.width) not in ((0, 0), (height, width)):
                raise BadFrameError(
                    f"frame {msg.seq} is {msg.height}x{msg.width}; the stream is {height}x{width}",
                    seq=msg.seq, expected=(height, width), got=(msg.height, msg.width),
                )
            if len(msg.data) != expected:
                raise BadFrameError(
                    f"frame {msg.seq} has {len(msg.data)} bytes; RAW_RGB24 {height}x{width} needs {expected}",
                    seq=msg.seq, expected=expected, got=len(msg.data),
                )
            frame = np.frombuffer(msg.data, dtype=np.uint8).reshape(height, width, 3)
        elif msg.encoding == weir_pb2.JPEG:
            frame = decode_jpeg(msg.data, seq=msg.seq)
            if frame.shape[:2] != (height, width):
                raise BadFrameError(
                    f"frame {msg.seq} decodes to {frame.shape[0]}x{frame.shape[1]}; the stream is {height}x{width}",
                    seq=msg.seq, expected=(height, width), got=frame.shape[:2],
                )
        else:
            raise BadFrameError(f"frame {msg.seq} has encoding {msg.encoding}; send RAW_RGB24 or JPEG", seq=msg.seq)
        return InFrame(seq=int(msg.seq), frame=frame, capture_ts_us=int(msg.capture_ts_us), received_ts_us=received_ts_us)

    # ---- server -> client -------------------------------------------------------------------------

    def encode_frame(self, out: OutFrame, *, jpeg: bool, quality: int = 85) -> weir_pb2.OutputFrame:
        h, w = out.frame.shape[:2]
        if jpeg:
            encoding, data = weir_pb2.JPEG, encode_jpeg(out.frame, quality)
        else:
            encoding, data = weir_pb2.RAW_RGB24, np.ascontiguousarray(out.frame, dtype=np.uint8).tobytes()
        return weir_pb2.OutputFrame(
            seq=out.seq,
            capture_ts_us=out.capture_ts_us,
            received_ts_us=out.received_ts_us,
            output_ts_us=out.output_ts_us,
            encoding=encoding,
            height=h,
            width=w,
            data=data,
        )

    def encode_stats(self, s: StreamStatsSnapshot) -> weir_pb2.StreamStats:
        return weir_pb2.StreamStats(
            stream_id=s.stream_id,
            frames_in=s.frames_in,
            frames_out=s.frames_out,
            frames_skipped=s.frames_skipped,
            frames_paused=s.frames_paused,
            deadline_misses=s.deadline_misses,
            ttff_ms=s.ttff_ms,
            latency_p50_ms=s.latency_p50_ms,
            latency_p99_ms=s.latency_p99_ms,
            jitter_ms=s.jitter_ms,
            output_fps=s.output_fps,
            queue_depth=s.queue_depth,
        )

    # ---- client helpers ---------------------------------------------------------------------------

    def frame_message(self, seq: int, frame: np.ndarray, capture_ts_us: int, *, jpeg: bool = False,
                      quality: int = 90) -> weir_pb2.ClientMessage:
        h, w = frame.shape[:2]
        if jpeg:
            msg = weir_pb2.InputFrame(seq=seq, capture_ts_us=capture_ts_us, encoding=weir_pb2.JPEG,
                                      data=encode_jpeg(frame, quality))
        else:
            msg = weir_pb2.InputFrame(seq=seq, capture_ts_us=capture_ts_us, encoding=weir_pb2.RAW_RGB24,
                                      height=h, width=w, data=np.ascontiguousarray(frame).tobytes())
        return weir_pb2.ClientMessage(frame=msg)

    def output_to_array(self, msg: weir_pb2.OutputFrame) -> np.ndarray:
        if msg.encoding == weir_pb2.JPEG:
            return decode_jpeg(msg.data, seq=msg.seq)
        return np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.width, 3)


def _check_prompt_length(text: str, name: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise BadRequestError(f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARS}", field="prompt")


def decode_jpeg(data: bytes, *, seq: int = -1) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] RGB; BadFrameError for anything libavcodec finds corrupt."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        raise BadFrameError(f"frame {seq} is not a JPEG (no SOI marker)", seq=seq, got=len(data))
    import av  # JPEG only: raw RGB streams need no codec library

    try:
        decoder = av.CodecContext.create("mjpeg", "r")
        decoder.options = {"err_detect": "explode"}
        frames = decoder.decode(av.Packet(data))
        frames = frames or decoder.decode(None)
    except (av.FFmpegError, ValueError) as exc:
        raise BadFrameError(f"frame {seq} is a corrupt JPEG ({type(exc).__name__})", seq=seq) from exc
    if not frames:
        raise BadFrameError(f"frame {seq} is a JPEG with no picture", seq=seq)
    return frames[0].to_ndarray(format="rgb24")


def encode_jpeg(frame_HWC: np.ndarray, quality: int = 85) -> bytes:
    """uint8 [H, W, 3] RGB -> baseline JPEG bytes (4:2:0). quality 1..100 maps onto MJPEG's qscale 31..2."""
    import av

    h, w = frame_HWC.shape[:2]
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = w, h, "yuvj420p"
    encoder.qmin = encoder.qmax = max(2, min(31, round(31 - (quality - 1) * 29 / 99)))
    picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC, dtype=np.uint8), format="rgb24")
    packets = encoder.encode(picture.reformat(format="yuvj420p")) + encoder.encode(None)
    return b"".join(bytes(p) for p in packets)
