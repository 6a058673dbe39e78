"""Video files (PyAV, imported on use) and generated clips, shared by `weir run`, `weir stream` and `weir demo`.

Frames are uint8 [H, W, 3] RGB numpy arrays throughout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import numpy as np


def fit_frame(frame_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target aspect ratio, then resize (area-average / nearest) to height x width."""
    h, w = frame_HWC.shape[:2]
    target = width / height
    if w / h > target:  # too wide: crop the sides
        new_w = max(1, round(h * target))
        x0 = (w - new_w) // 2
        frame_HWC = frame_HWC[:, x0 : x0 + new_w]
    elif w / h < target:  # too tall: crop top and bottom
        new_h = max(1, round(w / target))
        y0 = (h - new_h) // 2
        frame_HWC = frame_HWC[y0 : y0 + new_h]
    if frame_HWC.shape[:2] == (height, width):
        return np.ascontiguousarray(frame_HWC)
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_HWC), format="rgb24")
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


def read_video(path: str, height: int, width: int, max_frames: int | None = None) -> tuple[list[np.ndarray], float]:
    """Decode a video file into frames fitted to height x width; returns (frames, fps)."""
    import av

    frames: list[np.ndarray] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 16)
        for frame in container.decode(stream):
            frames.append(fit_frame(frame.to_ndarray(format="rgb24"), height, width))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path} has no video frames")
    return frames, fps


class VideoWriter:
    """Writes uint8 RGB frames to an H.264 (yuv420p) MP4 as they come."""

    def __init__(self, path: str, fps: float, height: int, width: int) -> None:
        import av

        self._av = av
        self._container = av.open(path, mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        self._stream.width = width
        self._stream.height = height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": "20", "preset": "veryfast"}
        self.frames_written = 0

    def write(self, frame_HWC: np.ndarray) -> None:
        for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generated_clip(num_frames: int, height: int, width: int, seed: int = 0) -> Iterator[np.ndarray]:
    """A synthetic clip: a drifting colour gradient with a bright disc moving across it."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * math.pi, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for t in range(num_frames):
        base = np.stack(
            [127 + 100 * np.sin(xx / width * 2 * math.pi + phase[c] + 0.15 * t) for c in range(3)], axis=-1
        )
        cx = (0.2 + 0.6 * ((t * 0.03) % 1.0)) * width
        cy = (0.5 + 0.25 * math.sin(t * 0.2)) * height
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (min(height, width) * 0.15) ** 2
        base[disc] = (240, 220, 60)
        yield np.clip(base, 0, 255).astype(np.uint8)
