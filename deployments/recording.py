"""Stream recordings: a stream's output frames written to an MP4 on the server, fetched later by id.

    RecordingStore     the service's recordings folder and limits (ServiceConfig.recordings_dir, ...):
                       starts recordings, publishes finished files, finds one for a fetch, prunes
    Recording          one MP4 being written: a bounded frame queue drained by its own encoder thread
    StreamRecordings   one stream's recordings, for the ingress: at most one running, every start and
                       every end reported as a RecordingInfo

A recording never slows or breaks its stream: `add` never blocks (a full queue drops the frame from
the recording and counts it); encoding and file I/O run on the recording's thread, off the event
loop; an encoder or disk error ends that recording (state 'failed', reported), nothing else. Memory
per recording is bounded by recording_queue_frames frames (plus the encoder's few frames of lookahead).

Files, in recordings_dir: <id>.partial.mp4 while writing; on a clean finish the sidecar <id>.json
(tenant, stream, frames, size, fps, dimensions) is written first, then the MP4 is renamed to
<id>.mp4, so a fetch only ever sees complete files. Ids are 32 hex digits (uuid4); a fetch of an
unknown id, an unfinished recording or another tenant's is the same RecordingNotFoundError.

Frames are written at the stream's input fps, one after another: output frames the pipeline skipped
(late chunks) or the recorder dropped are absent, so such a video is shorter than the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.errors import AdmissionRefusedError, BadRequestError, RecordingNotFoundError, WeirError

log = logging.getLogger("weir.recording")

RECORDING, FINISHED, FAILED = "recording", "finished", "failed"
"""The states of a recording (weir.proto RecordingState: STARTED, FINISHED, FAILED)."""
CHUNK_BYTES = 1 << 20
"""Bytes per FetchRecording message."""
RETRY_AFTER_S = 30.0
"""Retry hint of a recording refused because the service is writing its maximum."""
_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class RecordingInfo:
    """What a client is told about one recording."""

    recording_id: str
    state: str
    """RECORDING, FINISHED or FAILED."""
    frames: int = 0
    bytes: int = 0
    frames_dropped: int = 0
    message: str = ""
    """Why it failed, or why it stopped early (the size limit)."""


VideoWriterFactory = Callable[[str, float, int, int], object]
"""(path, fps, height, width) -> an object with write(uint8 HxWx3) and close() (cluster.video.VideoWriter)."""


def _default_writer(path: str, fps: float, height: int, width: int):
    from cluster.video import VideoWriter

    return VideoWriter(path, fps, height, width)


class RecordingStore:
    """The recordings folder of one ingress replica, with the service's limits.

    Args:
        directory: where recordings go; None = recording off (`start` raises BadRequestError).
        max_active: recordings written at once; one more raises AdmissionRefusedError.
        max_bytes: a recording stops (finished, marked as cut short) once its file reaches this size.
        queue_frames: frames buffered per recording before frames are dropped from it.
        max_kept: finished recordings kept; publishing one more deletes the oldest.
        writer_factory: the MP4 writer (default cluster.video.VideoWriter, H.264).
    """

    def __init__(self, directory: str | os.PathLike | None, *, max_active: int = 4, max_bytes: int = 512 * 2**20,
                 queue_frames: int = 64, max_kept: int = 100,
                 writer_factory: VideoWriterFactory | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.max_active = max_active
        self.max_bytes = max_bytes
        self.queue_frames = queue_frames
        self.max_kept = max_kept
        self.writer_factory = writer_factory or _default_writer
        self._lock = threading.Lock()
        self._active = 0

    @classmethod
    def from_service(cls, service, writer_factory: VideoWriterFactory | None = None) -> RecordingStore:
        """The store a ServiceConfig describes."""
        return cls(service.recordings_dir, max_active=service.max_recordings,
                   max_bytes=service.max_recording_bytes, queue_frames=service.recording_queue_frames,
                   max_kept=service.max_kept_recordings, writer_factory=writer_factory)

    @property
    def active(self) -> int:
        """Recordings being written now."""
        return self._active

    def start(self, *, tenant: str, stream_id: str, fps: float, height: int, width: int,
              on_end: Callable[[RecordingInfo], None] | None = None) -> Recording:
        """Start a recording (call on the event loop; `on_end` is called there when it ends).

        Raises BadRequestError when recording is off, AdmissionRefusedError at max_active.
        """
        if self.directory is None:
            raise BadRequestError("recording is off on this service (set recordings_dir in its config)",
                                  field="record")
        with self._lock:
            if self._active >= self.max_active:
                raise AdmissionRefusedError(
                    f"the service is writing {self._active} recordings, its maximum; retry later",
                    retry_after_s=RETRY_AFTER_S, limit=self.max_active)
            self._active += 1
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return Recording(self, uuid.uuid4().hex, tenant=tenant, stream_id=stream_id, fps=fps,
                             height=height, width=width, on_end=on_end)
        except BaseException:
            self._release()
            raise

    def locate(self, recording_id: str, tenant: str) -> tuple[Path, int]:
        """(path, size) of a finished recording of `tenant`; RecordingNotFoundError otherwise."""
        if not isinstance(recording_id, str) or not _ID.fullmatch(recording_id):
            raise BadRequestError("recording_id must be the 32 hex digits a RecordingStatus gave",
                                  field="recording_id")
        missing = RecordingNotFoundError(f"recording {recording_id} is unknown or not finished",
                                         recording_id=recording_id)
        if self.directory is None:
            raise missing
        path = self.directory / f"{recording_id}.mp4"
        try:
            meta = json.loads((self.directory / f"{recording_id}.json").read_text())
            size = path.stat().st_size
        except (OSError, ValueError):
            raise missing from None
        if meta.get("tenant") != tenant:
            raise missing
        return path, size

    async def read(self, recording_id: str, tenant: str,
                   chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[tuple[int, int, bytes]]:
        """(offset, total size, bytes) of a finished recording, in order; file reads off the event loop."""
        path, size = self.locate(recording_id, tenant)
        f = await asyncio.to_thread(open, path, "rb")  # an open file survives a prune that deletes it
        try:
            offset = 0
            while offset < size:
                data = await asyncio.to_thread(f.read, min(chunk_bytes, size - offset))
                if not data:
                    raise RecordingNotFoundError(f"recording {recording_id} was truncated while reading")
                yield offset, size, data
                offset += len(data)
        finally:
            await asyncio.to_thread(f.close)

    # ---- called from recording threads ----------------------------------------------------------------

    def _partial_path(self, recording_id: str) -> Path:
        return self.directory / f"{recording_id}.partial.mp4"

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def _publish(self, rec: Recording, size: int) -> None:
        """Sidecar first, then the MP4 under its final name; then prune the oldest beyond max_kept."""
        meta = {"recording_id": rec.recording_id, "tenant": rec.tenant, "stream_id": rec.stream_id,
                "frames": rec.frames, "bytes": size, "fps": rec.fps, "height": rec.height, "width": rec.width,
                "finished_unix_s": time.time()}
        (self.directory / f"{rec.recording_id}.json").write_text(json.dumps(meta))
        os.replace(self._partial_path(rec.recording_id), self.directory / f"{rec.recording_id}.mp4")
        self._prune()

    def _prune(self) -> None:
        finished = [p for p in self.directory.glob("*.mp4") if _ID.fullmatch(p.stem)]
        if len(finished) <= self.max_kept:
            return
        by_age = sorted(finished, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
        for old in by_age[: len(finished) - self.max_kept]:
            for p in (old, old.with_suffix(".json")):
                try:
                    p.unlink()
                except OSError:
                    pass


class Recording:
    """One MP4 being written by its own thread (module docstring). Built by RecordingStore.start."""

    def __init__(self, store: RecordingStore, recording_id: str, *, tenant: str, stream_id: str, fps: float,
                 height: int, width: int, on_end: Callable[[RecordingInfo], None] | None) -> None:
        self.store = store
        self.recording_id = recording_id
        self.tenant, self.stream_id = tenant, stream_id
        self.fps, self.height, self.width = fps, height, width
        self.state = RECORDING
        self.frames = 0
        self.bytes = 0
        self.dropped = 0
        self.message = ""
        self._on_end = on_end
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future = self._loop.create_future()
        """Resolved with the final RecordingInfo (on the event loop)."""
        self._frames: deque = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name=f"weir-recording-{recording_id[:8]}", daemon=True)
        self._thread.start()

    def info(self) -> RecordingInfo:
        return RecordingInfo(self.recording_id, self.state, self.frames, self.bytes, self.dropped, self.message)

    def add(self, frame_HWC: np.ndarray) -> None:
        """Queue one output frame; never blocks (a full queue drops it from the recording)."""
        with self._cond:
            if not self._accepting:
                return
            if len(self._frames) >= self.store.queue_frames:
                self.dropped += 1
                return
            self._frames.append(frame_HWC)
            self._cond.notify()

    def stop(self) -> None:
        """Take no more frames; the thread writes what is queued, finishes the file and publishes it."""
        with self._cond:
            self._accepting = False
            self._cond.notify()

    async def wait(self, timeout_s: float) -> RecordingInfo:
        """The final info, or the current one if the recording is still finishing after timeout_s."""
        await asyncio.wait({self.done}, timeout=timeout_s)
        return self.done.result() if self.done.done() else self.info()

    def _next(self) -> np.ndarray | None:
        with self._cond:
            while not self._frames and self._accepting:
                self._cond.wait()
            return self._frames.popleft() if self._frames else None

    def _run(self) -> None:
        partial = self.store._partial_path(self.recording_id)
        writer = None
        try:
            while (frame := self._next()) is not None:
                if writer is None:
                    writer = self.store.writer_factory(str(partial), self.fps, self.height, self.width)
                writer.write(np.ascontiguousarray(frame, dtype=np.uint8))
                self.frames += 1
                if _size(partial) >= self.store.max_bytes:  # the muxer creates the file with its first packet
                    self.message = f"stopped at the size limit of {self.store.max_bytes} bytes"
                    self.stop()
                    with self._cond:
                        self.dropped += len(self._frames)
                        self._frames.clear()
            if writer is None:
                raise _NothingRecorded("no output frame arrived while recording")
            writer, w = None, writer
            w.close()
            self.bytes = partial.stat().st_size
            self.store._publish(self, self.bytes)
            self.state = FINISHED
        except Exception as exc:  # noqa: BLE001 - ends this recording only, reported to the client
            self.state = FAILED
            if isinstance(exc, (_NothingRecorded, WeirError)):
                self.message = str(exc)
            else:
                self.message = f"the recording could not be written ({type(exc).__name__})"
                log.warning("recording %s of stream %s failed", self.recording_id, self.stream_id, exc_info=True)
            self.bytes = 0
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - the file is being discarded anyway
                    pass
            for leftover in (partial, self.store.directory / f"{self.recording_id}.json"):
                try:
                    leftover.unlink(missing_ok=True)
                except OSError:
                    pass
        finally:
            with self._cond:
                self._accepting = False
                self._frames.clear()
            self.store._release()
            info = self.info()
            try:
                self._loop.call_soon_threadsafe(self._ended, info)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting
                pass

    def _ended(self, info: RecordingInfo) -> None:
        if self._on_end is not None:
            try:
                self._on_end(info)
            except Exception:  # noqa: BLE001 - a reporting failure must not hide the result
                log.warning("reporting the end of recording %s failed", info.recording_id, exc_info=True)
        if not self.done.done():
            self.done.set_result(info)


class _NothingRecorded(Exception):
    pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class StreamRecordings:
    """One stream's recordings, driven by the ingress on its event loop.

    `start` and `stop` return the reply to send at once (or None: the final status follows through
    `notify` when the file is done); `notify(info)` is called for every recording that ends, before
    `finish` returns, so a client sees each recording's end before StreamEnded.
    """

    def __init__(self, store: RecordingStore, *, tenant: str, stream_id: str, fps: float, height: int,
                 width: int, notify: Callable[[RecordingInfo], None]) -> None:
        self.store = store
        self._open = dict(tenant=tenant, stream_id=stream_id, fps=fps, height=height, width=width)
        self._notify = notify
        self.recordings: list[Recording] = []
        self.active: Recording | None = None

    def start(self) -> RecordingInfo:
        """Start recording (or report the one running); a refusal is a FAILED info, never an exception."""
        if self.active is not None and self.active.state == RECORDING:
            return self.active.info()
        try:
            rec = self.store.start(**self._open, on_end=self._notify)
        except WeirError as exc:
            return RecordingInfo("", FAILED, message=exc.message)
        self.recordings.append(rec)
        self.active = rec
        return rec.info()

    def stop(self) -> RecordingInfo | None:
        """Stop the running recording (its final status follows); a FAILED info when none runs."""
        rec, self.active = self.active, None
        if rec is None or rec.done.done():
            return RecordingInfo("", FAILED, message="no recording is running")
        rec.stop()
        return None

    def add(self, frame_HWC: np.ndarray) -> None:
        if self.active is not None:
            self.active.add(frame_HWC)

    async def finish(self, timeout_s: float = 30.0) -> list[RecordingInfo]:
        """Stop the running recording, wait for every one to end (each at most timeout_s) and return
        their infos in start order (one still finishing after the timeout is reported RECORDING)."""
        self.abandon()
        return [await rec.wait(timeout_s) for rec in self.recordings]

    def abandon(self) -> None:
        """Stop the running recording without waiting (the client went away): its thread finishes and
        publishes the file."""
        rec, self.active = self.active, None
        if rec is not None:
            rec.stop()
