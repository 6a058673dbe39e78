"""Stream recordings (deployments.recording): real MP4s in a temporary folder, limits, failures that end
only the recording, and tenant-checked fetches. No Ray."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from deployments.recording import FAILED, FINISHED, RecordingStore, StreamRecordings
from stages.errors import AdmissionRefusedError, BadRequestError, RecordingNotFoundError

H, W = 32, 48


def _frames(n: int) -> list[np.ndarray]:
    return [np.full((H, W, 3), (10 * i) % 256, np.uint8) for i in range(n)]


class _RawWriter:
    """A stand-in for the MP4 encoder: appends raw frame bytes; optionally fails or waits."""

    def __init__(self, path, fps, height, width, *, fail_at=None, gate=None):
        self.f = open(path, "wb")
        self.count, self.fail_at, self.gate = 0, fail_at, gate

    def write(self, frame):
        if self.gate is not None:
            self.gate.wait(10)
        if self.count == self.fail_at:
            raise OSError(28, "No space left on device")
        self.f.write(frame.tobytes())
        self.f.flush()
        self.count += 1

    def close(self):
        self.f.close()


def _store(tmp_path, **kw) -> RecordingStore:
    return RecordingStore(tmp_path / "rec", **kw)


def _record(store, frames, tenant="acme", fps=8.0):
    async def run():
        rec = store.start(tenant=tenant, stream_id="s1", fps=fps, height=H, width=W)
        for f in frames:
            rec.add(f)
        rec.stop()
        return await rec.wait(30)

    return asyncio.run(run())


async def _read_all(store, recording_id, tenant, chunk_bytes=4096):
    parts = [(off, total, data) async for off, total, data in store.read(recording_id, tenant, chunk_bytes)]
    return parts


def test_a_recording_is_a_real_mp4_with_every_frame_at_the_stream_fps(tmp_path):
    import av

    store = _store(tmp_path)
    info = _record(store, _frames(11), fps=8.0)
    assert (info.state, info.frames, info.frames_dropped) == (FINISHED, 11, 0) and info.bytes > 0
    path, size = store.locate(info.recording_id, "acme")
    assert size == info.bytes and path.name == f"{info.recording_id}.mp4"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["tenant"], meta["stream_id"], meta["frames"], meta["fps"]) == ("acme", "s1", 11, 8.0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(8.0)
    assert len(decoded) == 11 and decoded[0].shape == (H, W, 3)
    parts = asyncio.run(_read_all(store, info.recording_id, "acme", chunk_bytes=1000))
    assert [p[0] for p in parts] == list(range(0, size, 1000)) and all(p[1] == size for p in parts)
    assert b"".join(p[2] for p in parts) == path.read_bytes()
    assert store.active == 0 and not list((tmp_path / "rec").glob("*.partial.mp4"))


def test_fetches_are_tenant_checked_and_ids_validated(tmp_path):
    store = _store(tmp_path, writer_factory=_RawWriter)
    info = _record(store, _frames(2))
    with pytest.raises(RecordingNotFoundError):
        store.locate(info.recording_id, "someone-else")
    with pytest.raises(RecordingNotFoundError):
        store.locate("0" * 32, "acme")
    for bad in ("../../etc/passwd", info.recording_id.upper(), "", info.recording_id + "0"):
        with pytest.raises(BadRequestError):
            store.locate(bad, "acme")


def test_a_write_failure_ends_only_the_recording_and_leaves_no_file(tmp_path):
    store = _store(tmp_path, writer_factory=lambda *a: _RawWriter(*a, fail_at=3))
    info = _record(store, _frames(8))
    assert info.state == FAILED and "OSError" in info.message and info.bytes == 0
    assert "device" not in info.message  # the client is told the kind of failure, not server details
    assert not list((tmp_path / "rec").iterdir())
    assert store.active == 0
    with pytest.raises(RecordingNotFoundError):
        store.locate(info.recording_id, "acme")


def test_adding_frames_never_blocks_and_a_full_queue_drops_them_from_the_recording(tmp_path):
    gate = threading.Event()
    store = _store(tmp_path, queue_frames=8, writer_factory=lambda *a: _RawWriter(*a, gate=gate))

    async def run():
        rec = store.start(tenant="acme", stream_id="s", fps=8.0, height=H, width=W)
        t0 = time.perf_counter()
        for f in _frames(30):
            rec.add(f)
        add_s = time.perf_counter() - t0
        rec.stop()
        gate.set()
        return add_s, await rec.wait(30)

    add_s, info = asyncio.run(run())
    assert add_s < 0.5  # the encoder was stuck; the stream's side went on
    assert info.state == FINISHED and info.frames + info.frames_dropped == 30
    assert 8 <= info.frames <= 9 and info.frames_dropped >= 21


def test_the_size_limit_stops_the_recording_and_keeps_what_was_written(tmp_path):
    frame_bytes = H * W * 3
    store = _store(tmp_path, max_bytes=3 * frame_bytes, writer_factory=_RawWriter)
    info = _record(store, _frames(10))
    assert info.state == FINISHED and info.frames == 3 and "size limit" in info.message
    assert store.locate(info.recording_id, "acme")[1] == 3 * frame_bytes


def test_concurrent_recordings_are_bounded_and_refusals_are_in_band(tmp_path):
    store = _store(tmp_path, max_active=1, writer_factory=_RawWriter)
    seen = []

    async def run():
        first = StreamRecordings(store, tenant="a", stream_id="s1", fps=8.0, height=H, width=W, notify=seen.append)
        second = StreamRecordings(store, tenant="a", stream_id="s2", fps=8.0, height=H, width=W, notify=seen.append)
        started = first.start()
        assert first.start() == started  # starting again reports the one running
        refused = second.start()
        for f in _frames(3):
            first.add(f)
            second.add(f)
        assert first.stop() is None  # the final status comes through notify
        assert second.stop().state == FAILED  # nothing was running there
        infos = await first.finish()
        again = second.start()
        second.add(_frames(1)[0])
        return started, refused, infos, again, await second.finish()

    started, refused, infos, again, infos2 = asyncio.run(run())
    assert started.recording_id and refused.state == FAILED and not refused.recording_id
    assert "maximum" in refused.message
    assert [i.state for i in infos] == [FINISHED] and infos[0].frames == 3
    assert again.recording_id and infos2[0].state == FINISHED and infos2[0].frames == 1
    assert [i.recording_id for i in seen] == [started.recording_id, again.recording_id]
    assert store.active == 0


def test_the_store_refuses_one_recording_past_its_maximum(tmp_path):
    store = _store(tmp_path, max_active=1, writer_factory=_RawWriter)

    async def run():
        rec = store.start(tenant="a", stream_id="s1", fps=8.0, height=H, width=W)
        with pytest.raises(AdmissionRefusedError) as refused:
            store.start(tenant="a", stream_id="s2", fps=8.0, height=H, width=W)
        rec.stop()
        await rec.wait(30)
        return refused.value

    assert asyncio.run(run()).retry_after_s > 0


async def _start_one(store):
    store.start(tenant="a", stream_id="s", fps=8.0, height=H, width=W)


def test_recording_off_and_nothing_recorded_are_failures_not_errors(tmp_path):
    off = RecordingStore(None)

    async def run():
        recs = StreamRecordings(off, tenant="a", stream_id="s", fps=8.0, height=H, width=W, notify=lambda i: None)
        return recs.start()

    info = asyncio.run(run())
    assert info.state == FAILED and "recordings_dir" in info.message
    with pytest.raises(BadRequestError):
        asyncio.run(_start_one(off))
    empty = _record(_store(tmp_path, writer_factory=_RawWriter), [])
    assert empty.state == FAILED and "no output frame" in empty.message


def test_only_the_newest_finished_recordings_are_kept(tmp_path):
    store = _store(tmp_path, max_kept=2, writer_factory=_RawWriter)
    ids = []
    for _ in range(3):
        ids.append(_record(store, _frames(1)).recording_id)
        time.sleep(0.02)  # distinct modification times
    with pytest.raises(RecordingNotFoundError):
        store.locate(ids[0], "acme")
    assert all(store.locate(i, "acme")[1] > 0 for i in ids[1:])
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == sorted(
        f"{i}{ext}" for i in ids[1:] for ext in (".mp4", ".json"))
