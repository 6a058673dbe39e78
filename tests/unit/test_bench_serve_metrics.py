"""`weir bench serve --metrics-out` summarises the server's stage times from its Prometheus page."""

from __future__ import annotations

from cluster.cli import gauge_total, stage_means

PAGE = """# HELP weir_stage_seconds Wall time of one pipeline stage call.
weir_stage_seconds_bucket{gpu_type="H200",model="wan-1.3b",stage="step",le="0.1"} 150.0
weir_stage_seconds_count{gpu_type="H200",model="wan-1.3b",stage="step"} 160.0
weir_stage_seconds_sum{gpu_type="H200",model="wan-1.3b",stage="step"} 10.0
weir_stage_seconds_count{gpu_type="H200",model="wan-1.3b",stage="executor_step"} 160.0
weir_stage_seconds_sum{gpu_type="H200",model="wan-1.3b",stage="executor_step"} 6.4
weir_stage_seconds_count{gpu_type="H100",model="wan-1.3b",stage="step"} 40.0
weir_stage_seconds_sum{gpu_type="H100",model="wan-1.3b",stage="step"} 2.0
weir_stage_seconds_count{gpu_type="H100",model="wan-1.3b",stage="idle"} 0.0
weir_frames_out_total{gpu_type="H200",model="wan-1.3b"} 642.0
weir_cuda_graphs_disabled{gpu_type="H200",model="wan-1.3b"} 1.0
weir_cuda_graphs_disabled{gpu_type="H100",model="wan-1.3b"} 0.0
"""


def test_stage_means_sum_over_pipelines_and_skip_empty_stages():
    means = stage_means(PAGE)
    assert means == {"step": (12.0, 200), "executor_step": (6.4, 160)}


def test_a_gauge_is_summed_over_its_label_sets():
    assert gauge_total(PAGE, "weir_cuda_graphs_disabled") == 1.0
    assert gauge_total(PAGE, "weir_no_such_gauge") == 0.0


def _result(first_capture_us: int, latencies_ms: list[float]):
    from cluster.client import StreamResult

    r = StreamResult()
    r.latencies_ms = list(latencies_ms)
    r.capture_us = [first_capture_us + 62_500 * i for i in range(len(latencies_ms))]
    r.frames = [(i, None) for i in range(len(latencies_ms))]
    return r


def test_the_steady_p99_leaves_out_the_frames_captured_while_a_stream_was_joining(tmp_path):
    from cluster.cli import stream_rows, write_frame_log
    from stages.errors import AdmissionRefusedError

    early = _result(0, [900.0, 800.0] + [200.0] * 20)  # a join's backlog, then steady
    late = _result(1_000_000, [300.0] + [250.0] * 20)  # joins at 1 s, first frame back at 1.3 s
    late.open_ms, late.ttff_ms = 40.0, 340.0
    rows = stream_rows([early, late, AdmissionRefusedError("full")])
    assert (rows[1]["open_ms"], rows[1]["ttff_ms"]) == (40.0, 340.0)  # the open's part of the TTFF
    assert rows[0]["p99_ms"] > 800.0 and rows[0]["max_ms"] == 900.0
    # frames of `early` captured before 1.3 s (the first 21) are left out of its steady p99
    assert rows[0]["p99_after_joins_ms"] == 200.0
    assert rows[1]["p99_after_joins_ms"] == 250.0
    assert rows[2]["status"] == "AdmissionRefusedError" and rows[2]["frames"] == 0

    path = tmp_path / "frames.csv"
    write_frame_log(str(path), [early, late])
    lines = path.read_text().splitlines()
    assert lines[0] == "stream,seq,capture_s,latency_ms"
    assert lines[1] == "0,0,0.0000,900.0" and lines[23] == "1,0,1.0000,300.0"
    assert len(lines) == 1 + 22 + 21
