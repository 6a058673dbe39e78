"""Weir's typed errors. Pure Python (no torch), so every room may import it.

Each error carries the numbers that explain it and a stable `code`; deployments/errors.py maps the
codes to gRPC status codes in one table. Bad configuration raises ValueError instead.
"""

from __future__ import annotations


class WeirError(Exception):
    """Base of every error a client can be told about."""

    code: str = "INTERNAL"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadFrameError(WeirError):
    """A frame that cannot be used: wrong size, wrong channel count, undecodable bytes."""

    code = "BAD_FRAME"


class BadRequestError(WeirError):
    """A request whose fields are out of range (steps, resolution, noise strength, unknown model)."""

    code = "BAD_REQUEST"


class CheckpointError(WeirError):
    """A checkpoint file that does not match the model: missing, unexpected or mis-shaped keys."""

    code = "BAD_CHECKPOINT"

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message, missing=missing, unexpected=unexpected, mismatched=mismatched, path=path)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        self.path = path


class StreamNotFoundError(WeirError):
    """An operation on a stream id that is not open (never opened, closed, or its client vanished)."""

    code = "STREAM_NOT_FOUND"


class StreamExistsError(WeirError):
    """Opening a stream id that is already open."""

    code = "STREAM_EXISTS"


class AdmissionRefusedError(WeirError):
    """No capacity can meet the stream's SLO (or a quota is reached); retry after `retry_after_s`."""

    code = "ADMISSION_REFUSED"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **details: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class SLOUnattainableError(WeirError):
    """The requested SLO cannot be met by any configuration (e.g. TTFF below the processing floor)."""

    code = "SLO_UNATTAINABLE"


class UnauthenticatedError(WeirError):
    """Missing, unknown or revoked API key. The message never contains the key."""

    code = "UNAUTHENTICATED"


class PipelineFailedError(WeirError):
    """A stage of the pipeline died; the stream cannot continue on this replica."""

    code = "PIPELINE_FAILED"


class RecordingNotFoundError(WeirError):
    """A recording id that is unknown, not finished yet, or another tenant's (never told apart)."""

    code = "RECORDING_NOT_FOUND"
