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
