from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_ENCODING_UNSPECIFIED: _ClassVar[FrameEncoding]
    RAW_RGB24: _ClassVar[FrameEncoding]
    JPEG: _ClassVar[FrameEncoding]

class BlendMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLEND_MODE_UNSPECIFIED: _ClassVar[BlendMode]
    BLEND_LINEAR: _ClassVar[BlendMode]
    BLEND_SLERP: _ClassVar[BlendMode]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ADMISSION_REFUSED: _ClassVar[ErrorCode]
    BAD_FRAME: _ClassVar[ErrorCode]
    BAD_REQUEST: _ClassVar[ErrorCode]
    SLO_UNATTAINABLE: _ClassVar[ErrorCode]
    UNAUTHENTICATED: _ClassVar[ErrorCode]
    STREAM_NOT_FOUND: _ClassVar[ErrorCode]
    PIPELINE_FAILED: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    RECORDING_NOT_FOUND: _ClassVar[ErrorCode]

class RecordingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORDING_STATE_UNSPECIFIED: _ClassVar[RecordingState]
    RECORDING_STARTED: _ClassVar[RecordingState]
    RECORDING_FINISHED: _ClassVar[RecordingState]
    RECORDING_FAILED: _ClassVar[RecordingState]
FRAME_ENCODING_UNSPECIFIED: FrameEncoding
RAW_RGB24: FrameEncoding
JPEG: FrameEncoding
BLEND_MODE_UNSPECIFIED: BlendMode
BLEND_LINEAR: BlendMode
BLEND_SLERP: BlendMode
ERROR_CODE_UNSPECIFIED: ErrorCode
ADMISSION_REFUSED: ErrorCode
BAD_FRAME: ErrorCode
BAD_REQUEST: ErrorCode
SLO_UNATTAINABLE: ErrorCode
UNAUTHENTICATED: ErrorCode
STREAM_NOT_FOUND: ErrorCode
PIPELINE_FAILED: ErrorCode
INTERNAL: ErrorCode
RECORDING_NOT_FOUND: ErrorCode
RECORDING_STATE_UNSPECIFIED: RecordingState
RECORDING_STARTED: RecordingState
RECORDING_FINISHED: RecordingState
RECORDING_FAILED: RecordingState

class ClientMessage(_message.Message):
    __slots__ = ("open", "frame", "control")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    open: StreamOpen
    frame: InputFrame
    control: Control
    def __init__(self, open: _Optional[_Union[StreamOpen, _Mapping]] = ..., frame: _Optional[_Union[InputFrame, _Mapping]] = ..., control: _Optional[_Union[Control, _Mapping]] = ...) -> None: ...

class SLO(_message.Message):
    __slots__ = ("ttff_ms", "frame_deadline_ms")
    TTFF_MS_FIELD_NUMBER: _ClassVar[int]
    FRAME_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ttff_ms: float
    frame_deadline_ms: float
    def __init__(self, ttff_ms: _Optional[float] = ..., frame_deadline_ms: _Optional[float] = ...) -> None: ...

class StreamOpen(_message.Message):
    __slots__ = ("prompt", "num_steps", "noise_strength", "seed", "height", "width", "input_fps", "model", "vae", "slo", "api_key", "output_encoding", "jpeg_quality", "client_stream_id", "prompts", "blend", "record")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NOISE_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_FPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VAE_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BLEND_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    num_steps: int
    noise_strength: float
    seed: int
    height: int
    width: int
    input_fps: float
    model: str
    vae: str
    slo: SLO
    api_key: str
    output_encoding: FrameEncoding
    jpeg_quality: int
    client_stream_id: str
    prompts: _containers.RepeatedCompositeFieldContainer[WeightedPrompt]
    blend: BlendMode
    record: bool
    def __init__(self, prompt: _Optional[str] = ..., num_steps: _Optional[int] = ..., noise_strength: _Optional[float] = ..., seed: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., input_fps: _Optional[float] = ..., model: _Optional[str] = ..., vae: _Optional[str] = ..., slo: _Optional[_Union[SLO, _Mapping]] = ..., api_key: _Optional[str] = ..., output_encoding: _Optional[_Union[FrameEncoding, str]] = ..., jpeg_quality: _Optional[int] = ..., client_stream_id: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[WeightedPrompt, _Mapping]]] = ..., blend: _Optional[_Union[BlendMode, str]] = ..., record: _Optional[bool] = ...) -> None: ...

class WeightedPrompt(_message.Message):
    __slots__ = ("prompt", "weight")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    weight: float
    def __init__(self, prompt: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class InputFrame(_message.Message):
    __slots__ = ("seq", "capture_ts_us", "encoding", "height", "width", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TS_US_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    capture_ts_us: int
    encoding: FrameEncoding
    height: int
    width: int
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., capture_ts_us: _Optional[int] = ..., encoding: _Optional[_Union[FrameEncoding, str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("set_prompt", "set_steps", "pause", "resume", "end", "start_recording", "stop_recording")
    SET_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SET_STEPS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    START_RECORDING_FIELD_NUMBER: _ClassVar[int]
    STOP_RECORDING_FIELD_NUMBER: _ClassVar[int]
    set_prompt: SetPrompt
    set_steps: SetSteps
    pause: Pause
    resume: Resume
    end: End
    start_recording: StartRecording
    stop_recording: StopRecording
    def __init__(self, set_prompt: _Optional[_Union[SetPrompt, _Mapping]] = ..., set_steps: _Optional[_Union[SetSteps, _Mapping]] = ..., pause: _Optional[_Union[Pause, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ..., start_recording: _Optional[_Union[StartRecording, _Mapping]] = ..., stop_recording: _Optional[_Union[StopRecording, _Mapping]] = ...) -> None: ...

class SetPrompt(_message.Message):
    __slots__ = ("prompt", "prompts", "blend_chunks", "blend")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BLEND_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BLEND_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompts: _containers.RepeatedCompositeFieldContainer[WeightedPrompt]
    blend_chunks: int
    blend: BlendMode
    def __init__(self, prompt: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[WeightedPrompt, _Mapping]]] = ..., blend_chunks: _Optional[int] = ..., blend: _Optional[_Union[BlendMode, str]] = ...) -> None: ...

class StartRecording(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopRecording(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetSteps(_message.Message):
    __slots__ = ("num_steps",)
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    num_steps: int
    def __init__(self, num_steps: _Optional[int] = ...) -> None: ...

class Pause(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Resume(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class End(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("opened", "frame", "stats", "error", "ended", "recording")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    RECORDING_FIELD_NUMBER: _ClassVar[int]
    opened: StreamOpened
    frame: OutputFrame
    stats: StreamStats
    error: StreamError
    ended: StreamEnded
    recording: RecordingStatus
    def __init__(self, opened: _Optional[_Union[StreamOpened, _Mapping]] = ..., frame: _Optional[_Union[OutputFrame, _Mapping]] = ..., stats: _Optional[_Union[StreamStats, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., ended: _Optional[_Union[StreamEnded, _Mapping]] = ..., recording: _Optional[_Union[RecordingStatus, _Mapping]] = ...) -> None: ...

class StreamOpened(_message.Message):
    __slots__ = ("stream_id", "model", "first_chunk_frames", "chunk_frames", "predicted_ttff_ms")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFF_MS_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    model: str
    first_chunk_frames: int
    chunk_frames: int
    predicted_ttff_ms: float
    def __init__(self, stream_id: _Optional[str] = ..., model: _Optional[str] = ..., first_chunk_frames: _Optional[int] = ..., chunk_frames: _Optional[int] = ..., predicted_ttff_ms: _Optional[float] = ...) -> None: ...

class OutputFrame(_message.Message):
    __slots__ = ("seq", "capture_ts_us", "received_ts_us", "output_ts_us", "encoding", "height", "width", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TS_US_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_TS_US_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TS_US_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    capture_ts_us: int
    received_ts_us: int
    output_ts_us: int
    encoding: FrameEncoding
    height: int
    width: int
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., capture_ts_us: _Optional[int] = ..., received_ts_us: _Optional[int] = ..., output_ts_us: _Optional[int] = ..., encoding: _Optional[_Union[FrameEncoding, str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamStats(_message.Message):
    __slots__ = ("stream_id", "frames_in", "frames_out", "frames_skipped", "frames_paused", "deadline_misses", "ttff_ms", "latency_p50_ms", "latency_p99_ms", "jitter_ms", "output_fps", "queue_depth")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PAUSED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MISSES_FIELD_NUMBER: _ClassVar[int]
    TTFF_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    JITTER_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FPS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    frames_in: int
    frames_out: int
    frames_skipped: int
    frames_paused: int
    deadline_misses: int
    ttff_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    jitter_ms: float
    output_fps: float
    queue_depth: int
    def __init__(self, stream_id: _Optional[str] = ..., frames_in: _Optional[int] = ..., frames_out: _Optional[int] = ..., frames_skipped: _Optional[int] = ..., frames_paused: _Optional[int] = ..., deadline_misses: _Optional[int] = ..., ttff_ms: _Optional[float] = ..., latency_p50_ms: _Optional[float] = ..., latency_p99_ms: _Optional[float] = ..., jitter_ms: _Optional[float] = ..., output_fps: _Optional[float] = ..., queue_depth: _Optional[int] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "retry_after_s")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    retry_after_s: float
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class StreamEnded(_message.Message):
    __slots__ = ("stats", "recordings")
    STATS_FIELD_NUMBER: _ClassVar[int]
    RECORDINGS_FIELD_NUMBER: _ClassVar[int]
    stats: StreamStats
    recordings: _containers.RepeatedCompositeFieldContainer[RecordingStatus]
    def __init__(self, stats: _Optional[_Union[StreamStats, _Mapping]] = ..., recordings: _Optional[_Iterable[_Union[RecordingStatus, _Mapping]]] = ...) -> None: ...

class RecordingStatus(_message.Message):
    __slots__ = ("recording_id", "state", "frames", "bytes", "frames_dropped", "message")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    state: RecordingState
    frames: int
    bytes: int
    frames_dropped: int
    message: str
    def __init__(self, recording_id: _Optional[str] = ..., state: _Optional[_Union[RecordingState, str]] = ..., frames: _Optional[int] = ..., bytes: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("healthy", "pipelines", "healthy_pipelines", "active_streams", "free_stream_slots")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_PIPELINES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    FREE_STREAM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    pipelines: int
    healthy_pipelines: int
    active_streams: int
    free_stream_slots: int
    def __init__(self, healthy: _Optional[bool] = ..., pipelines: _Optional[int] = ..., healthy_pipelines: _Optional[int] = ..., active_streams: _Optional[int] = ..., free_stream_slots: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "vaes", "device", "gpu_type", "pipelines", "free_stream_slots", "max_side")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VAES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    FREE_STREAM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    model: str
    vaes: _containers.RepeatedScalarFieldContainer[str]
    device: str
    gpu_type: str
    pipelines: int
    free_stream_slots: int
    max_side: int
    def __init__(self, model: _Optional[str] = ..., vaes: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., gpu_type: _Optional[str] = ..., pipelines: _Optional[int] = ..., free_stream_slots: _Optional[int] = ..., max_side: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetStreamStatsRequest(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class FetchRecordingRequest(_message.Message):
    __slots__ = ("recording_id", "api_key")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    api_key: str
    def __init__(self, recording_id: _Optional[str] = ..., api_key: _Optional[str] = ...) -> None: ...

class RecordingChunk(_message.Message):
    __slots__ = ("recording_id", "offset", "total_bytes", "data")
    RECORDING_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    recording_id: str
    offset: int
    total_bytes: int
    data: bytes
    def __init__(self, recording_id: _Optional[str] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
