"""`weir bench engine --streams`: ticks over k streams, on the tiny model on CPU."""

from __future__ import annotations

import pytest
import torch

from cluster.bench import bench_capacity
from stages.engine import EngineSpec, StreamEngine


def test_capacity_rows_time_one_chunk_of_every_stream_per_tick():
    torch.set_num_threads(1)
    engine = StreamEngine(EngineSpec(model="tiny"))
    rows = [bench_capacity(engine, model="tiny", height=32, width=48, steps=2, vae="wan", streams=k, ticks=3,
                           input_fps=16.0) for k in (1, 2)]
    for row in rows:
        assert row.fps == pytest.approx(4 * row.streams * 1000 / row.tick_ms)
        assert row.streams_at_input_fps == pytest.approx(row.fps / 16.0)
        # medians of the parts need not add up to the median tick on a busy machine; a stage counted
        # twice, or another tick's stages, would be far over
        assert 0 < row.enc_ms + row.dit_ms + row.dec_ms <= row.tick_ms * 1.25
    assert rows[1].enc_ms > rows[0].enc_ms  # two streams' chunks encoded per tick
    assert engine.stats().active_streams == 0  # the bench's streams are closed


def test_engine_row_times_a_steady_window_after_the_caches_fill():
    """One `weir bench engine` configuration: the warm-up fills the stream batch and the KV caches
    before the timed chunks, and the row's figures are consistent."""
    from cluster.bench import bench_engine_config

    torch.set_num_threads(1)
    engine = StreamEngine(EngineSpec(model="tiny", vae="taehv"))
    row = bench_engine_config(engine, model="tiny", height=32, width=48, steps=1, vae="taehv", chunks=3,
                              ttff_cold_ms=0.0)
    assert row.fps > 0 and row.fps_p50 == pytest.approx(4000.0 / row.chunk_p50_ms)
    assert row.chunk_p50_ms <= row.chunk_p99_ms
    assert min(row.dit_ms, row.enc_ms, row.dec_ms, row.ttff_warm_ms) > 0
    assert engine.stats().active_streams == 0


def test_engine_row_kernel_tables_profile_each_stage():
    """`weir bench engine --kernels N`: each stage's table counts per call and ranks its top N."""
    from cluster.bench import bench_engine_config

    torch.set_num_threads(1)
    engine = StreamEngine(EngineSpec(model="tiny", vae="taehv"))
    row = bench_engine_config(engine, model="tiny", height=32, width=48, steps=1, vae="taehv", chunks=2,
                              ttff_cold_ms=0.0, kernels=4)
    assert set(row.kernels) == {"encode", "dit", "decode"}
    for table in row.kernels.values():
        assert table["ms"] > 0 and table["count"] >= len(table["top"]) == 4
        times = [ms for _, _, ms in table["top"]]
        assert times == sorted(times, reverse=True) and sum(times) <= table["ms"] * 1.0001
    assert any("conv" in name for name, _, _ in row.kernels["decode"]["top"])
    assert engine.stats().active_streams == 0


def test_cold_shape_row_times_a_first_stream_and_a_second_at_a_new_shape():
    """`--cold-shapes`: both streams run COLD_CHUNKS chunks and emit frames; the cold stream's extra time
    is its time beyond the second stream's, chunk by chunk, so never negative."""
    from cluster.bench import COLD_CHUNKS, bench_cold_shape

    torch.set_num_threads(1)
    engine = StreamEngine(EngineSpec(model="tiny", vae="taehv"))
    row = bench_cold_shape(engine, 48, 32, "taehv")
    assert row["resolution"] == "48x32" and row["vae"] == "taehv"
    assert len(row["cold_chunks_s"]) == len(row["second_chunks_s"]) == COLD_CHUNKS
    assert row["cold_ttff_ms"] > 0 and row["second_ttff_ms"] > 0 and row["steady_chunk_ms"] > 0
    assert row["cold_extra_s"] == pytest.approx(
        sum(max(0.0, c - w) for c, w in zip(row["cold_chunks_s"], row["second_chunks_s"])))
    assert engine.stats().active_streams == 0
