"""`weir bench pipeline`: the multi-GPU pipeline (stage actors in a compiled graph) under load.

    weir bench pipeline --gpus N [--plan colocated|separate|SPEC] [--model wan-1.3b] [--steps 1,2]
                        [--streams S] [--groups G] [--resolution 480x832] [--chunks 40] [--no-ray]
                        [--ring | --no-ring] [--device cuda|cpu] [--json out.json]

For each --steps value, on ONE graph (built once), fed chunks of 4 frames as fast as the pipeline
takes them, three loads (column `load`):
  streams  S streams split into G groups (default: one per actor, at most S); each group runs its own
           loop `add 4 frames per stream -> step(group)`, and the loops run concurrently, so up to G
           ticks of different groups are in the graph at once (see cluster.graph). One chain each.
  single   one stream, one chain, one loop: at most one tick in the graph (the no-ring figure).
  ring     one stream of W chains (W = the DiT shard actors) driven by W concurrent loops, so up to W
           of its ticks are in the graph at once (cluster.graph, "Ring"). Measured with --ring, the
           default when the plan has more than one shard; `peak_in_flight` shows the ticks seen at once.
The 2-GPU / 1-GPU single-stream ratio is the `ring` fps of a --gpus 2 run over the `single` fps of a
--gpus 1 run (the summary prints both single-stream figures of the run). --device cpu --model tiny
--resolution 32x48 runs the same code on the CPU (with --no-ray: in one process).

Reported per configuration:
  fps            frames out / wall time over the measured chunks, all streams; fps_stream per stream
  ttff_ms        open a stream, push its first frame, first output frame back (median of the streams)
  tick_p50/p99   wall time of one step(group) call (submit -> frames back)
  stage ms       per actor and role (encode / dit / tail / decode), median device time per execution
                 (--no-sync-timing: host time, no device sync)
  peak_gib       peak device memory per GPU (whole configuration)
Tables print to stdout; --json writes every row. --no-ray runs the same plan with the workers chained
in this process (cuda:0..N-1), for comparison: no pipelining, no transport.

The bench sets NCCL_NVLS_ENABLE=0 (also in every actor's runtime_env), bounds every phase with a
timeout, prints errors with their cause and always tears the graph down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_ENV = {"NCCL_NVLS_ENABLE": "0"}


@dataclass
class PipelineRow:
    """One measured configuration."""

    mode: str
    plan: str
    gpus: int
    model: str
    resolution: str
    steps: int
    streams: int
    groups: int
    chunks: int
    fps: float
    fps_stream_min: float
    fps_stream_median: float
    ttff_ms: float
    tick_p50_ms: float
    tick_p99_ms: float
    frames_out: int
    wall_s: float
    stage_ms: dict = field(default_factory=dict)
    """'a<actor>.<role>' -> median ms per execution."""
    peak_gib: dict = field(default_factory=dict)
    """'gpu<i>' (or 'cpu') -> peak GiB."""
    load: str = "streams"
    """'streams' (S streams in G groups), 'single' (one stream, one chain) or 'ring' (one stream, W chains)."""
    chains: int = 1
    """Stream-batch chains of each stream."""
    peak_in_flight: int = 0
    """Most ticks of one stream in the graph at once during the measured chunks."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="weir bench pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="devices (actors) of the plan")
    p.add_argument("--plan", default="colocated",
                   help="'colocated' (encode with shard 0, decode with the last), 'separate', or a spec "
                        "like 'enc+0-15|15-30+dec'")
    p.add_argument("--model", default="wan-1.3b", help="tiny | wan-1.3b | wan-14b")
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--checkpoint-dir", default=None, help="published weights; default seeded random")
    p.add_argument("--vae", default="wan", choices=("wan", "taehv"))
    p.add_argument("--steps", default="1,2", help="comma-separated denoising step counts")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--groups", type=int, default=None, help="concurrent step loops (default: actors)")
    p.add_argument("--resolution", default="480x832", help="HxW")
    p.add_argument("--chunks", type=int, default=40, help="measured chunks of 4 frames per stream")
    p.add_argument("--warmup-chunks", type=int, default=4)
    p.add_argument("--no-ray", action="store_true", help="chain the same plan's workers in this process")
    p.add_argument("--ring", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure one stream over W interleaved chains (default: when the plan has >1 shard)")
    p.add_argument("--transport", default="nccl", choices=("nccl", "auto"))
    p.add_argument("--max-inflight", type=int, default=None)
    p.add_argument("--cuda-graphs", action="store_true", help="DiT shards replay steady steps from CUDA graphs")
    p.add_argument("--no-sync-timing", action="store_true", help="no device sync around stages")
    p.add_argument("--tick-timeout", type=float, default=300.0, help="seconds before a tick counts as hung")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to build the actors")
    p.add_argument("--timeout", type=float, default=3000.0, help="seconds for the whole benchmark")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start one)")
    p.add_argument("--json", default="bench_pipeline.json")
    return p.parse_args(argv)


def _resolve_plan(args: argparse.Namespace):
    from cluster.plan import build_plan, parse_spec

    fields = dict(weights_init="replay" if args.model == "tiny" else "shard", vae=args.vae,
                  checkpoint_dir=args.checkpoint_dir)
    if args.dtype:
        fields["dtype"] = args.dtype
    if args.plan in ("colocated", "separate"):
        return build_plan(args.gpus, model=args.model, device=args.device, layout=args.plan, **fields)
    plan = parse_spec(args.plan, model=args.model, device=args.device, **fields)
    if args.device == "cuda" and plan.num_gpus != args.gpus:
        raise ValueError(f"--plan {args.plan!r} has {plan.num_gpus} actors (one GPU each), --gpus is {args.gpus}")
    return plan


def _init_ray(args: argparse.Namespace, plan) -> object | None:
    """Start (or join) Ray with the bench environment; reserve the GPUs in one STRICT_PACK group."""
    os.environ.update(BENCH_ENV)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    import ray

    env = {**BENCH_ENV, "PYTHONPATH": os.environ["PYTHONPATH"]}
    if args.address:
        ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)
    if not plan.on_gpu:
        return None
    have = ray.cluster_resources().get("GPU", 0)
    if have < plan.num_gpus:
        raise RuntimeError(f"the plan needs {plan.num_gpus} GPUs, Ray sees {have:g}")
    try:
        import cupy  # noqa: F401 - NCCL channels are built on CuPy
    except ImportError:
        print("warning: cupy is not importable in the driver; NCCL channels need cupy-cuda13x on every "
              "node (not ray[cgraph], which pulls cupy-cuda12x)", file=sys.stderr)
    from ray.util.placement_group import placement_group

    pg = placement_group([{"GPU": 1, "CPU": 1}] * plan.num_gpus, strategy="STRICT_PACK")
    ready = pg.ready()
    try:
        ray.get(ready, timeout=120)
    except Exception as exc:
        raise RuntimeError(f"could not reserve {plan.num_gpus} x {{GPU: 1, CPU: 1}} on one node: {exc}") from exc
    return pg


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


async def _build_executor(args: argparse.Namespace, plan, pg):
    from cluster.graph import CompiledGraphExecutor, create_local_executor
    from cluster.stage_actor import WorkerOptions

    options = WorkerOptions(
        num_threads=None, sync_timing=not args.no_sync_timing, cuda_graphs=args.cuda_graphs,
        env_vars=dict(BENCH_ENV),
    )
    if args.no_ray:
        return await create_local_executor(plan, options)
    return await CompiledGraphExecutor.create(
        plan, placement_group=pg, options=options, transport=args.transport, max_inflight=args.max_inflight,
        tick_timeout_s=args.tick_timeout, actor_start_timeout_s=args.start_timeout,
    )


def _loads(args: argparse.Namespace, plan) -> list[tuple[str, int, int]]:
    """(load, streams, chains) of each measured configuration (module docstring)."""
    num_shards = len(plan.shard_actors)
    ring = num_shards > 1 if args.ring is None else args.ring
    loads = [("streams", args.streams, 1), ("single", 1, 1)]
    if ring and num_shards > 1:
        loads.append(("ring", 1, num_shards))
    return loads


async def _run_config(ex, plan, args: argparse.Namespace, steps: int, *, load: str = "streams",
                      num_streams: int | None = None, chains: int = 1) -> PipelineRow:
    from cluster.video import generated_clip
    from stages.engine import StreamParams

    height, width = (int(x) for x in args.resolution.lower().split("x"))
    clip = list(generated_clip(16, height, width, seed=steps))
    ids = [f"s{steps}{load}-{k}" for k in range(args.streams if num_streams is None else num_streams)]
    cursor = {sid: 0 for sid in ids}

    def frames(sid: str, count: int) -> list[tuple[int, np.ndarray]]:
        start = cursor[sid]
        cursor[sid] += count
        return [(seq, clip[(seq + 3 * int(sid.rsplit("-", 1)[1])) % len(clip)]) for seq in range(start, start + count)]

    ttff = []
    for sid in ids:  # open + first frame + prefill, one stream at a time
        t0 = time.perf_counter()
        await ex.open_stream(sid, StreamParams(prompt="a watercolor painting of a city", num_steps=steps,
                                               height=height, width=width, seed=cursor[sid], vae=args.vae,
                                               chains=chains))
        await ex.add_frames(sid, frames(sid, 1))
        out = await ex.step([sid])
        if not out[sid]:
            raise RuntimeError(f"stream {sid}: no first frame after the prefill")
        ttff.append((time.perf_counter() - t0) * 1000)

    if load == "ring":  # W loops on the one stream: each step call waits only for its own chain
        num_groups, groups = chains, [ids] * chains
    else:
        num_groups = max(1, min(args.groups or plan.num_actors, len(ids)))
        groups = [ids[g::num_groups] for g in range(num_groups)]
    out_counts = {sid: 0 for sid in ids}
    ticks: list[float] = []

    async def loop(group: list[str], chunks: int, record: bool) -> None:
        for _ in range(chunks):
            for sid in group:
                await ex.add_frames(sid, frames(sid, 4))
            t0 = time.perf_counter()
            result = await ex.step(group)
            if record:
                ticks.append(time.perf_counter() - t0)
                for sid, got in result.items():
                    out_counts[sid] += len(got)

    await asyncio.gather(*(loop(g, args.warmup_chunks, False) for g in groups))
    await ex.stats(reset=True)
    ex.peak_ticks_in_flight(reset=True)
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(g, args.chunks, True) for g in groups))
    wall = time.perf_counter() - t0
    peak_in_flight = ex.peak_ticks_in_flight()
    stats = await ex.stats()
    for sid in ids:
        await ex.flush(sid)
        await ex.close_stream(sid)

    stage_ms = {}
    peak = {}
    for r in stats:
        for role, values in r["timings_s"].items():
            if values:
                stage_ms[f"a{r['actor']}.{role}"] = round(statistics.median(values) * 1000, 2)
        device = plan.stages[r["actor"]].device_name
        peak[device] = round(r["peak_memory_bytes"] / 2**30, 2)
    total = sum(out_counts.values())
    per_stream = [n / wall for n in out_counts.values()]
    return PipelineRow(
        mode="local" if args.no_ray else "graph", plan=plan.spec, gpus=plan.num_gpus, model=plan.model,
        resolution=f"{height}x{width}", steps=steps, streams=len(ids), groups=num_groups, chunks=args.chunks,
        fps=round(total / wall, 2), fps_stream_min=round(min(per_stream), 2),
        fps_stream_median=round(statistics.median(per_stream), 2), ttff_ms=round(statistics.median(ttff), 1),
        tick_p50_ms=round(_pct(ticks, 50) * 1000, 1), tick_p99_ms=round(_pct(ticks, 99) * 1000, 1),
        frames_out=total, wall_s=round(wall, 2), stage_ms=stage_ms, peak_gib=peak,
        load=load, chains=chains, peak_in_flight=peak_in_flight,
    )


def _print_rows(rows: list[PipelineRow]) -> None:
    head = ("mode", "plan", "load", "steps", "streams", "chains", "groups", "fps", "fps/str(min)", "ttff_ms",
            "tick_p50", "tick_p99", "in_flight")
    print(" ".join(f"{h:>12}" for h in head))
    for r in rows:
        vals = (r.mode, r.plan, r.load, r.steps, r.streams, r.chains, r.groups, r.fps, r.fps_stream_min,
                r.ttff_ms, r.tick_p50_ms, r.tick_p99_ms, r.peak_in_flight)
        print(" ".join(f"{v!s:>12}" for v in vals))
    for r in rows:
        stages = "  ".join(f"{k}={v}" for k, v in sorted(r.stage_ms.items()))
        peaks = "  ".join(f"{k}={v}GiB" for k, v in sorted(r.peak_gib.items()))
        print(f"steps={r.steps} {r.load}: stage ms  {stages}\n          peak mem  {peaks}")


def single_stream_fps(rows: list[PipelineRow]) -> dict[int, dict[str, float]]:
    """steps -> {'single': fps, 'ring': fps} of the run's single-stream rows (what is measured)."""
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        if r.load in ("single", "ring"):
            out.setdefault(r.steps, {})[r.load] = r.fps
    return out


async def _bench(args: argparse.Namespace, plan, pg, rows: list[PipelineRow]) -> None:
    t0 = time.perf_counter()
    ex = await asyncio.wait_for(_build_executor(args, plan, pg), args.start_timeout)
    print(f"pipeline built in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        for steps in (int(s) for s in args.steps.split(",")):
            for load, num_streams, chains in _loads(args, plan):
                row = await _run_config(ex, plan, args, steps, load=load, num_streams=num_streams, chains=chains)
                rows.append(row)
                _print_rows([row])
                sys.stdout.flush()
    finally:
        await ex.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `weir bench pipeline`; returns the exit code (0 ok, 1 error, 2 bad arguments)."""
    args = _parse(argv)
    try:
        plan = _resolve_plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.describe(), flush=True)
    rows: list[PipelineRow] = []
    pg = None
    ray_started = False
    code = 0
    try:
        if not args.no_ray:
            pg = _init_ray(args, plan)
            ray_started = True
        else:
            os.environ.update(BENCH_ENV)
        asyncio.run(asyncio.wait_for(_bench(args, plan, pg, rows), args.timeout))
    except asyncio.TimeoutError:
        print(f"error: the benchmark did not finish within --timeout {args.timeout:.0f} s", file=sys.stderr)
        code = 1
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        code = 1
    finally:
        if ray_started:
            import ray

            if pg is not None:
                from ray.util.placement_group import remove_placement_group

                try:
                    remove_placement_group(pg)
                except Exception:  # noqa: BLE001
                    pass
            ray.shutdown()
    if rows:
        print("\nsummary")
        _print_rows(rows)
        single = single_stream_fps(rows)
        for steps, fps in sorted(single.items()):
            ring = f", ring {fps['ring']} fps" if "ring" in fps else ""
            print(f"single stream, steps={steps}: no ring {fps.get('single')} fps{ring}")
        with open(args.json, "w") as fh:
            json.dump({"plan": plan.to_json(), "rows": [asdict(r) for r in rows],
                       "single_stream_fps": {str(k): v for k, v in single.items()}}, fh, indent=2)
        print(f"wrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
