"""The ONE table from Weir's typed errors to gRPC status codes, wire error codes and trailing metadata.

Every transport (the Serve gRPC proxy ingress, the plain grpc.aio ingress, the client) goes through
`status_of`, so a refused stream reads the same everywhere:

    AdmissionRefusedError(retry_after_s=2.5)
        -> StatusCode.RESOURCE_EXHAUSTED, ErrorCode.ADMISSION_REFUSED, trailing ("retry-after-ms", "2500")
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos import weir_pb2
from stages import errors as E

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing-metadata key of the admission retry hint (integer milliseconds)."""
ERROR_CODE_KEY = "weir-error-code"
"""Trailing-metadata key carrying the stable Weir error code (e.g. 'ADMISSION_REFUSED')."""


@dataclass(frozen=True)
class ErrorMapping:
    grpc_code: grpc.StatusCode
    wire_code: int
    """A weir_pb2.ErrorCode value."""


ERROR_TABLE: dict[str, ErrorMapping] = {
    E.AdmissionRefusedError.code: ErrorMapping(grpc.StatusCode.RESOURCE_EXHAUSTED, weir_pb2.ADMISSION_REFUSED),
    E.BadFrameError.code: ErrorMapping(grpc.StatusCode.INVALID_ARGUMENT, weir_pb2.BAD_FRAME),
    E.BadRequestError.code: ErrorMapping(grpc.StatusCode.INVALID_ARGUMENT, weir_pb2.BAD_REQUEST),
    E.SLOUnattainableError.code: ErrorMapping(grpc.StatusCode.FAILED_PRECONDITION, weir_pb2.SLO_UNATTAINABLE),
    E.UnauthenticatedError.code: ErrorMapping(grpc.StatusCode.UNAUTHENTICATED, weir_pb2.UNAUTHENTICATED),
    E.StreamNotFoundError.code: ErrorMapping(grpc.StatusCode.NOT_FOUND, weir_pb2.STREAM_NOT_FOUND),
    E.StreamExistsError.code: ErrorMapping(grpc.StatusCode.ALREADY_EXISTS, weir_pb2.BAD_REQUEST),
    E.PipelineFailedError.code: ErrorMapping(grpc.StatusCode.UNAVAILABLE, weir_pb2.PIPELINE_FAILED),
    E.RecordingNotFoundError.code: ErrorMapping(grpc.StatusCode.NOT_FOUND, weir_pb2.RECORDING_NOT_FOUND),
    E.CheckpointError.code: ErrorMapping(grpc.StatusCode.INTERNAL, weir_pb2.INTERNAL),
    E.WeirError.code: ErrorMapping(grpc.StatusCode.INTERNAL, weir_pb2.INTERNAL),
}
"""WeirError.code -> mapping. A test checks every WeirError subclass has a row."""


@dataclass(frozen=True)
class Status:
    """How one error is told to a gRPC client."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str], ...]
    error: weir_pb2.StreamError
    """The in-band error message sent on a stream before it ends."""


def status_of(exc: BaseException) -> Status:
    """Map any exception to its gRPC status. Non-Weir exceptions are INTERNAL and say only their type."""
    if isinstance(exc, E.WeirError):
        mapping = ERROR_TABLE.get(exc.code, ERROR_TABLE[E.WeirError.code])
        code_name, message = exc.code, exc.message
    else:
        mapping = ERROR_TABLE[E.WeirError.code]
        code_name, message = E.WeirError.code, f"internal error ({type(exc).__name__})"
    metadata = [(ERROR_CODE_KEY, code_name)]
    retry_after_s = 0.0
    if isinstance(exc, E.AdmissionRefusedError):
        retry_after_s = float(exc.retry_after_s)
        metadata.append((RETRY_AFTER_KEY, str(max(1, round(retry_after_s * 1000)))))
    error = weir_pb2.StreamError(code=mapping.wire_code, message=message, retry_after_s=retry_after_s)
    return Status(mapping.grpc_code, message, tuple(metadata), error)


def error_from_status(code: grpc.StatusCode, details: str, trailing: dict[str, str]) -> E.WeirError:
    """Client side: rebuild the typed error from a failed call (inverse of status_of, best effort)."""
    name = trailing.get(ERROR_CODE_KEY)
    classes = {cls.code: cls for cls in _weir_error_classes()}
    cls = classes.get(name or "")
    if cls is None:
        by_grpc = {m.grpc_code: c for c, m in ERROR_TABLE.items()
                   if c not in (E.StreamExistsError.code, E.RecordingNotFoundError.code)}
        cls = classes.get(by_grpc.get(code, E.WeirError.code), E.WeirError)
    if cls is E.AdmissionRefusedError:
        retry_ms = float(trailing.get(RETRY_AFTER_KEY, "1000"))
        return E.AdmissionRefusedError(details, retry_after_s=retry_ms / 1000.0)
    if cls is E.CheckpointError:
        return E.CheckpointError(details)
    return cls(details)


def _weir_error_classes() -> list[type[E.WeirError]]:
    found: list[type[E.WeirError]] = [E.WeirError]
    stack = [E.WeirError]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.append(sub)
            stack.append(sub)
    return found


def unwrap(exc: BaseException) -> BaseException:
    """The user exception inside Ray's task-error wrappers (a replica's WeirError reaches callers wrapped)."""
    seen = 0
    while seen < 8 and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause  # type: ignore[attr-defined]
        seen += 1
    return exc
