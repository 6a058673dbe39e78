"""The ingress pushes a chunk's frames per call, aligned with the pipeline's chunk cutting."""

from __future__ import annotations

import pytest

from deployments.ingress import ChunkBatcher
from deployments.pipeline import CHUNK_FRAMES, FIRST_CHUNK_FRAMES


def _pushes(batcher: ChunkBatcher, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        if batcher.add(i):
            out.append(batcher.take())
    return out


def test_pushes_follow_the_pipelines_chunks():
    pushes = _pushes(ChunkBatcher(FIRST_CHUNK_FRAMES, CHUNK_FRAMES), 13)
    assert pushes == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]


def test_a_partial_chunk_is_taken_on_flush_and_counting_goes_on():
    b = ChunkBatcher(1, 4)
    assert _pushes(b, 3) == [[0]]
    assert b.take() == [1, 2]  # a control or the end flushes it
    assert b.take() == []
    assert [b.add(x) for x in (3, 4)] == [False, True]  # frame count 5 closes frames 1-4's chunk
    assert b.take() == [3, 4]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        ChunkBatcher(0, 4)
