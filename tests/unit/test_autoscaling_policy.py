"""The Serve autoscaling policy on hand-built AutoscalingContexts, the replica-side recorder, and the
per-GPU-class deployment options."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments import autoscaling as A
from deployments.config import PipelineSpec
from deployments.messages import PipelineStats

SLOTS = 4


def ctx(replicas: dict[str, tuple[int, float]], *, now: float = 1000.0, lo: int = 0, hi: int = 8,
        starting: int = 0, refused: int = 0, wait_s: float = 0.0, miss: float = 0.0, state: dict | None = None,
        unreported: tuple[str, ...] = ()):
    """replicas: id -> (live streams, idle seconds or -1)."""
    metrics: dict[str, dict[str, float]] = {m: {} for m in (A.FREE_SLOTS, A.LIVE_STREAMS, A.IDLE_S, A.MISS_RATE,
                                                            A.REFUSED, A.ADMISSION_WAIT_S, A.SLOTS)}
    for rid, (live, idle_s) in replicas.items():
        metrics[A.FREE_SLOTS][rid] = SLOTS - live
        metrics[A.LIVE_STREAMS][rid] = live
        metrics[A.IDLE_S][rid] = idle_s
        metrics[A.MISS_RATE][rid] = miss
        metrics[A.REFUSED][rid] = refused
        metrics[A.ADMISSION_WAIT_S][rid] = wait_s
        metrics[A.SLOTS][rid] = SLOTS
    running = [*replicas, *unreported]
    return AutoscalingContext(
        deployment_id=None, deployment_name="Pipeline-h100-wan-1.3b", app_name="weir",
        current_num_replicas=len(running), target_num_replicas=len(running) + starting, running_replicas=running,
        total_num_requests=0.0, total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi, policy_state=dict(state or {}),
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=None,
    )


def test_worked_example_from_the_module_docstring():
    assert A.slo_policy(ctx({"r0": (4, -1), "r1": (1, -1), "r2": (0, 90.0)}))[0] == 2
    assert A.slo_policy(ctx({"r0": (4, -1), "r1": (3, -1), "r2": (0, 90.0)}))[0] == 3
    assert A.slo_policy(ctx({"r0": (4, -1), "r1": (4, -1), "r2": (3, -1)}))[0] == 4


def test_scales_up_before_any_stream_is_refused():
    target, state = A.slo_policy(ctx({"r0": (3, -1)}))  # 1 free slot < headroom 2, nothing refused yet
    assert target == 2 and state["last_scale_up_s"] == 1000.0


def test_starting_replicas_count_with_all_their_slots():
    assert A.slo_policy(ctx({"r0": (3, -1)}, starting=1))[0] == 2  # no second scale-up while one starts
    assert A.slo_policy(ctx({"r0": (3, -1)}, unreported=("r1",)))[0] == 2


def test_refused_opens_and_long_waits_add_capacity():
    assert A.slo_policy(ctx({"r0": (0, 10.0)}, refused=5))[0] == 2  # 4 free < 5 waiting + 2
    assert A.slo_policy(ctx({"r0": (0, 10.0)}, refused=1, wait_s=10.0))[0] == 2  # waited too long: +1 replica


def test_deadline_misses_add_a_replica():
    assert A.slo_policy(ctx({"r0": (1, -1), "r1": (1, -1)}, miss=0.2))[0] == 3


def test_never_below_the_replicas_holding_live_streams():
    # five replicas with one stream each: slots are plentiful, but none is idle, so none may go
    many = {f"r{i}": (1, -1) for i in range(5)}
    assert A.slo_policy(ctx(many))[0] == 5
    # even when the bounds shrank below them
    assert A.slo_policy(ctx(many, hi=2))[0] == 5


def test_only_replicas_idle_long_enough_go():
    assert A.slo_policy(ctx({"r0": (1, -1), "r1": (0, 10.0), "r2": (0, 10.0)}))[0] == 3  # idle < 60 s
    assert A.slo_policy(ctx({"r0": (1, -1), "r1": (0, 70.0), "r2": (0, 70.0)}))[0] == 1
    assert A.slo_policy(ctx({"r0": (1, -1), "r1": (0, 70.0)}, lo=2))[0] == 2  # the minimum stays


def test_no_scale_down_during_the_cooldown_after_a_scale_up():
    idle = {"r0": (1, -1), "r1": (0, 70.0), "r2": (0, 70.0)}
    assert A.slo_policy(ctx(idle, state={"last_scale_up_s": 950.0}))[0] == 3
    assert A.slo_policy(ctx(idle, state={"last_scale_up_s": 800.0}))[0] == 1


def test_class_policy_takes_autoscale_kwargs():
    policy = A.SLOPolicy(headroom_slots=0, idle_before_removal_s=5.0)
    assert policy(ctx({"r0": (3, -1)}))[0] == 1  # 1 free >= 0 headroom
    assert policy(ctx({"r0": (1, -1), "r1": (0, 10.0)}))[0] == 1
    with pytest.raises(ValueError, match="unknown SLOPolicy kwargs"):
        A.SLOPolicy(target_ongoing_requests=2)


def test_serve_accepts_the_generated_autoscaling_config():
    cfg = AutoscalingConfig(**A.autoscaling_config(0, 4, initial_replicas=1))
    assert cfg.policy.policy_function == A.POLICY_IMPORT_PATH
    assert cfg.policy.get_policy().__qualname__ == "slo_policy"  # the import path resolves


def test_recorder_reports_slack_idle_time_and_miss_rate():
    t = [0.0]
    rec = A.AutoscalingStatsRecorder(SLOTS, refusal_window_s=30.0, clock=lambda: t[0])

    def load(active, out, misses, healthy=True):
        return PipelineStats(pipeline="p", model="tiny", gpu_type="cpu", healthy=healthy, max_streams=SLOTS,
                             active_streams=active, frames_out_total=out, deadline_misses_total=misses)

    t[0] = 5.0
    s = rec.stats(load(0, 0, 0))
    assert s[A.FREE_SLOTS] == 4 and s[A.IDLE_S] == 5.0 and s[A.MISS_RATE] == 0.0 and s[A.SLOTS] == 4
    t[0] = 10.0
    s = rec.stats(load(3, 100, 5))
    assert s[A.FREE_SLOTS] == 1 and s[A.LIVE_STREAMS] == 3 and s[A.IDLE_S] == -1 and s[A.MISS_RATE] == 0.05
    rec.note_refused()
    t[0] = 20.0
    s = rec.stats(load(0, 200, 5))
    assert s[A.IDLE_S] == 0.0 and s[A.MISS_RATE] == 0.0 and s[A.REFUSED] == 1 and s[A.ADMISSION_WAIT_S] == 10.0
    t[0] = 45.0
    s = rec.stats(load(0, 200, 5, healthy=False))
    assert s[A.REFUSED] == 0 and s[A.FREE_SLOTS] == 0 and s[A.IDLE_S] == 25.0


def test_per_class_options_pin_the_accelerator_and_take_the_class_capacity():
    h100 = A.GPU_CLASSES["h100"]
    spec = PipelineSpec(model="wan-1.3b", device="cuda", dtype="bfloat16", gpu_type="H100")
    opts = A.pipeline_deployment_options(h100, spec, shape=(480, 832, 2), max_replicas=4)
    actor = opts["ray_actor_options"]
    assert opts["name"] == "Pipeline-h100-wan-1.3b"
    assert actor["resources"] == {"weir_gpu_h100": 1} and actor["num_gpus"] == 1
    assert actor["accelerator_type"] == "H100"
    assert opts["autoscaling_config"]["policy"]["policy_function"] == A.POLICY_IMPORT_PATH
    assert opts["graceful_shutdown_timeout_s"] == A.MAX_STREAM_S
    assert A.slots_of(h100, spec, (480, 832, 2)) == 2
    assert A.slots_of(h100, spec, (320, 576, 1)) == 4  # smallest covering row
    assert A.slots_of(A.GPU_CLASSES["l40s"], spec, (480, 832, 4)) == spec.max_streams  # no row: the spec's
    cpu = A.pipeline_deployment_options(A.GpuClass("testa", "", 0.0, ()), PipelineSpec(max_streams=3),
                                        autoscale=False)
    assert cpu["num_replicas"] == 1 and "accelerator_type" not in cpu["ray_actor_options"]
    assert cpu["ray_actor_options"]["resources"] == {"weir_gpu_testa": 1}
    with pytest.raises(ValueError, match="lowercase"):
        A.GpuClass("H100", "H100", 1.0, ())


def test_every_gpu_class_prefers_cheaper_slots_in_the_table_order():
    for c in A.GPU_CLASSES.values():
        assert c.slots_for("wan-1.3b", 480, 832, 1) >= c.slots_for("wan-1.3b", 480, 832, 2)


def test_gpu_class_lookup_by_name_or_accelerator_type():
    assert A.gpu_class_of("H100") is A.GPU_CLASSES["h100"] and A.gpu_class_of("l40s") is A.GPU_CLASSES["l40s"]
    assert A.gpu_class_of("cpu") is None


def test_pool_size_from_the_pipeline_spec():
    assert A.pool_size_options(PipelineSpec(replicas=2)) == {"num_replicas": 2}
    cfg = A.pool_size_options(PipelineSpec(replicas=1, max_replicas=4))["autoscaling_config"]
    assert (cfg["min_replicas"], cfg["initial_replicas"], cfg["max_replicas"]) == (1, 1, 4)
    assert cfg["policy"]["policy_function"] == A.POLICY_IMPORT_PATH
    AutoscalingConfig(**cfg)  # Serve accepts it
    with pytest.raises(ValueError, match="max_replicas"):
        PipelineSpec(replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="replicas"):
        PipelineSpec(replicas=0)
