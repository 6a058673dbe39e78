"""The `weir` command line.

    weir serve   [--config serve.yaml] [--model tiny] [--device cpu] [--pipelines 1] [--max-streams 8]
    weir stream  --input FILE|webcam|generated --prompt "..." --output out.mp4 [--address localhost:9000]
                 [--record out_server.mp4] [--change-prompt "..." --change-at 24 --blend-chunks 8 --blend slerp]
    weir demo    local Ray + the Serve app (tiny model on CPU without a GPU), a generated clip over gRPC
                 [--web: serve the browser page at /web/ instead, until Ctrl-C]
    weir bench serve --streams N     concurrent streams against a local (or --address) deployment
    weir bench engine | pipeline     engine / pipeline benchmarks (cluster.bench)
    weir run     offline restyling of a file (cluster.offline)

Ray, Serve and torch are imported inside the subcommands, so `weir --help` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

RETRY_FOR_S = 60.0
"""How long `weir stream` and `weir bench serve` ask again after refusals by default: longer than a
cold-shape warm-up a refusal starts on an H100 or H200 (the 1.3B model's Wan VAE one: 42 s on an H200,
46 s on an H100, scheduling.priors COLD_SHAPE_S), so that a first stream at a new resolution gets in
after it. Slower GPU classes take longer: raise it there."""


# ---- local cluster -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS/--address, or start a small local Ray whose workers can import Weir."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):  # workers inherit the driver's environment
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def detected_gpu_type() -> str:
    """The accelerator type Ray reports for this cluster's GPUs ('H100', 'H200', ...), so pipeline
    bundles pinned to it can be placed; without one (Ray not started, or a GPU Ray does not name), a
    label from GPU 0's device name that is used for profiles only."""
    import ray

    if ray.is_initialized():
        types = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
        if types:
            return types[0]
    import torch

    return "unlabelled-" + torch.cuda.get_device_name(0).replace(" ", "-")


def service_from_args(args: argparse.Namespace):
    from deployments.config import PipelineSpec, ServiceConfig

    device = args.device or ("cuda" if _has_cuda() else "cpu")
    model = args.model or ("wan-1.3b" if device == "cuda" else "tiny")
    spec = PipelineSpec(
        model=model, vae=args.vae, device=device, dtype="bfloat16" if device == "cuda" else "float32",
        checkpoint_dir=args.checkpoint_dir,
        gpu_type=args.gpu_type or ("cpu" if device == "cpu" else detected_gpu_type()),
        max_streams=args.max_streams, warm_streams=args.warm_streams, num_cpus=args.pipeline_cpus,
        warm_resolutions=args.warm_resolutions,
        executor=args.executor,
        num_gpus=args.gpus_per_pipeline,
    )
    return ServiceConfig(pipelines=(spec,) * args.pipelines, grpc_port=args.grpc_port, http_port=args.http_port,
                         recordings_dir=args.recordings_dir)


def _resolutions(text: str) -> tuple[tuple[int, int], ...]:
    """'512x512,720x1280' -> ((512, 512), (720, 1280)); '' -> (). Raises argparse.ArgumentTypeError."""
    shapes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            height, width = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"resolution {item!r}: write HEIGHTxWIDTH, e.g. 512x512") from None
        shapes.append((height, width))
    return tuple(shapes)


def _add_service_args(p: argparse.ArgumentParser, *, grpc_port: int | None = 9000, http_port: int | None = 8000) -> None:
    p.add_argument("--model", default=None, help="tiny | wan-1.3b | wan-14b (default: tiny without weights)")
    p.add_argument("--vae", default="wan", choices=["wan", "taehv"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--gpu-type", default=None, help="accelerator type label, e.g. H100")
    p.add_argument("--pipelines", type=int, default=1, help="pipeline deployments (one engine each)")
    p.add_argument("--max-streams", type=int, default=8, help="stream slots per pipeline")
    p.add_argument("--warm-streams", type=int, default=None,
                   help="GPU: streams per warm step count prepared before clients arrive (default: --max-streams)")
    p.add_argument("--warm-resolutions", default="", type=_resolutions,
                   help="HxW,... warmed up before clients arrive besides 480x832 on a GPU (their first streams "
                        "skip the new shape's compiles), e.g. 512x512,720x1280")
    p.add_argument("--pipeline-cpus", type=float, default=1.0, help="CPUs each pipeline replica reserves")
    p.add_argument("--executor", default="auto", choices=["auto", "graph", "inprocess"],
                   help="auto: stage actors on a compiled graph on GPUs, the engine in process on CPU")
    p.add_argument("--gpus-per-pipeline", type=int, default=1, help="GPUs one pipeline's stages span")
    p.add_argument("--recordings-dir", default=None, help="folder for stream recordings (default: recording off)")
    p.add_argument("--grpc-port", type=int, default=grpc_port if grpc_port else 0)
    p.add_argument("--http-port", type=int, default=http_port if http_port else 0)


def _pick_ports(args: argparse.Namespace) -> None:
    if not args.grpc_port:
        args.grpc_port = free_port()
    if not args.http_port:
        args.http_port = free_port()


# ---- weir serve ----------------------------------------------------------------------------------------


def serve_main(args: argparse.Namespace) -> int:
    from ray import serve

    from deployments import app as weir_app

    init_ray(args.address)
    if args.config:
        _run_serve_config(Path(args.config))
        print(f"weir: serving the applications of {args.config}; Ctrl-C stops")
    else:
        service = service_from_args(args)
        weir_app.start(service, web=None if args.no_web else _web_config())
        print(f"weir: gRPC on :{service.grpc_port} (application '{service.app_name}'), "
              f"metrics at http://localhost:{service.http_port}/metrics; Ctrl-C stops")
        if not args.no_web:
            print(f"weir: web page at http://localhost:{service.http_port}/web/")
    def stop(_signum, _frame) -> None:  # a process manager's SIGTERM stops it as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("weir: stopping (streams end, the Serve app shuts down)", flush=True)
        serve.shutdown()
    return 0


def _run_serve_config(path: Path) -> None:
    """Run a Serve config YAML (the `serve build` shape): grpc_options, http_options, applications."""
    import importlib

    import yaml
    from ray import serve
    from ray.serve.config import gRPCOptions

    from deployments.app import GRPC_SERVICER_FUNCTIONS

    cfg = yaml.safe_load(path.read_text())
    grpc = dict(cfg.get("grpc_options") or {})
    grpc.setdefault("grpc_servicer_functions", GRPC_SERVICER_FUNCTIONS)
    serve.start(http_options=cfg.get("http_options") or {}, grpc_options=gRPCOptions(**grpc))
    for spec in cfg.get("applications", []):
        module, _, attr = spec["import_path"].partition(":")
        target = getattr(importlib.import_module(module), attr)
        app = target(spec.get("args") or {}) if callable(target) and not hasattr(target, "_bound_deployment") else target
        serve.run(app, name=spec.get("name", "weir"), route_prefix=spec.get("route_prefix", "/"), blocking=False)


# ---- weir stream ---------------------------------------------------------------------------------------


def _input_frames(source: str, height: int, width: int, max_frames: int | None, fps: float):
    """(frames iterable, fps) for a file, 'generated' or 'webcam'."""
    from cluster.video import fit_frame, generated_clip, read_video

    if source == "generated":
        return list(generated_clip(max_frames or 48, height, width)), fps
    if source == "webcam" or source.startswith("/dev/video"):
        import av

        device = "/dev/video0" if source == "webcam" else source

        def frames():
            with av.open(device, format="v4l2") as cam:
                for i, f in enumerate(cam.decode(video=0)):
                    if max_frames is not None and i >= max_frames:
                        return
                    yield fit_frame(f.to_ndarray(format="rgb24"), height, width)

        return frames(), fps
    frames, file_fps = read_video(source, height, width, max_frames)
    return frames, fps or file_fps


class _LiveLine:
    """One status line updated in place: frames, FPS, latency."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.count = 0
        self.last_print = 0.0

    def __call__(self, seq: int, frame, latency_ms: float) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last_print >= 0.25:
            self.last_print = now
            fps = self.count / max(1e-6, now - self.t0)
            sys.stderr.write(f"\r  frame {seq:5d}  out {self.count:5d}  {fps:6.2f} fps  latency {latency_ms:7.1f} ms ")
            sys.stderr.flush()


def _options_from_args(args: argparse.Namespace, fps: float):
    from cluster.client import OpenOptions

    return OpenOptions(
        prompt=args.prompt, height=args.height, width=args.width, fps=fps, num_steps=args.steps,
        noise_strength=args.noise_strength, seed=args.seed, model=args.stream_model or "", vae=args.stream_vae or "",
        ttff_ms=args.ttff_ms, frame_deadline_ms=args.deadline_ms, api_key=args.api_key or os.environ.get("WEIR_API_KEY", ""),
        jpeg_in=args.jpeg, jpeg_out=args.jpeg,
    )


def _write_video(path: str, frames: list, fps: float) -> None:
    from cluster.video import VideoWriter

    if not frames:
        return
    h, w = frames[0][1].shape[:2]
    with VideoWriter(path, fps, h, w) as writer:
        for _, f in sorted(frames, key=lambda x: x[0]):
            writer.write(f)


def stream_main(args: argparse.Namespace) -> int:
    import dataclasses

    from cluster.client import fetch_recording, set_prompt_message, stream_frames

    frames, fps = _input_frames(args.input, args.height, args.width, args.max_frames, args.fps)
    live = _LiveLine()
    opts = dataclasses.replace(_options_from_args(args, fps), record=bool(args.record))
    change = None
    if args.change_prompt:
        change = set_prompt_message(args.change_prompt, blend_chunks=args.blend_chunks, blend=args.blend)

    def controls(i: int) -> list:
        return [change] if change is not None and i == args.change_at else []

    def refused(err, wait_s: float) -> None:
        print(f"refused for now ({err}); asking again in {wait_s:.1f} s", file=sys.stderr)

    result = asyncio.run(stream_frames(args.address, frames, opts, app_name=args.app, on_frame=live,
                                       extra_messages=controls, retry_for_s=args.retry_for_s,
                                       on_refused=refused))
    sys.stderr.write("\n")
    _write_video(args.output, result.frames, fps)
    _print_result(result, args.output)
    if args.record:
        from protos import weir_pb2

        done = [r for r in result.recordings if r.state == weir_pb2.RECORDING_FINISHED]
        if not done:
            reasons = "; ".join(r.message for r in result.recording_events if r.message) or "none was finished"
            print(f"  recording: nothing to fetch ({reasons})", file=sys.stderr)
            return 1
        size = asyncio.run(fetch_recording(args.address, done[0].recording_id, args.record,
                                           api_key=opts.api_key, app_name=args.app))
        print(f"  recording {done[0].recording_id}: {done[0].frames} frames, {size} bytes, wrote {args.record}")
    return 0


def _print_result(result, output: str | None) -> None:
    from scheduling.slo import percentile

    lat = result.latencies_ms
    print(f"stream {result.stream_id}: {len(result.frames)}/{result.sent} frames back, TTFF {result.ttff_ms:.0f} ms, "
          f"{result.fps:.2f} fps, latency p50 {percentile(lat, 50):.0f} ms p99 {percentile(lat, 99):.0f} ms"
          + (f", admitted after {result.admission_wait_s:.1f} s and {result.admission_retries} refusals"
             if result.admission_retries else "")
          + (f", wrote {output}" if output else ""))
    if result.server_stats is not None:
        s = result.server_stats
        print(f"  server: ttff {s.ttff_ms:.0f} ms, p50 {s.latency_p50_ms:.0f} ms, p99 {s.latency_p99_ms:.0f} ms, "
              f"skipped {s.frames_skipped}, deadline misses {s.deadline_misses}")


def _web_config():
    """The browser page's application (deployments.web), as `weir serve` and `weir demo --web` run it."""
    from deployments.web import WebConfig

    return WebConfig()


# ---- weir demo -----------------------------------------------------------------------------------------


def demo_main(args: argparse.Namespace) -> int:
    from ray import serve

    from cluster.client import stream_frames
    from cluster.video import generated_clip
    from deployments import app as weir_app

    t0 = time.monotonic()
    _pick_ports(args)
    init_ray(None, num_cpus=args.num_cpus)
    service = service_from_args(args)
    print(f"weir demo: Ray up in {time.monotonic() - t0:.1f} s; starting the Serve app "
          f"({service.pipelines[0].model} on {service.pipelines[0].device})")
    weir_app.start(service, web=_web_config() if args.web else None)
    t_ready = time.monotonic()
    if args.web:
        print(f"weir demo: app ready in {t_ready - t0:.1f} s; open http://localhost:{service.http_port}/web/ "
              "(webcam or a video file in, the styled video out); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
        return 0
    print(f"weir demo: app ready in {t_ready - t0:.1f} s; streaming {args.num_frames} generated frames "
          f"{args.height}x{args.width} at {args.fps:g} fps over gRPC :{service.grpc_port}")
    frames = list(generated_clip(args.num_frames, args.height, args.width))
    live = _LiveLine()
    try:
        result = asyncio.run(stream_frames(f"localhost:{service.grpc_port}", frames, _options_from_args(args, args.fps),
                                           on_frame=live))
        sys.stderr.write("\n")
        _write_video(args.output, result.frames, args.fps)
        _print_result(result, args.output)
    finally:
        serve.shutdown()
    print(f"weir demo: done in {time.monotonic() - t0:.1f} s")
    return 0


# ---- weir bench serve ----------------------------------------------------------------------------------


def bench_serve_main(args: argparse.Namespace) -> int:
    from cluster.client import stream_frames
    from cluster.video import generated_clip
    from stages.errors import WeirError

    started_here = not args.address
    if started_here:
        from deployments import app as weir_app

        _pick_ports(args)
        init_ray(None, num_cpus=args.num_cpus)
        service = service_from_args(args)
        t_start = time.monotonic()
        print("starting the Serve app (builds and warms up the pipelines)...", flush=True)
        weir_app.start(service)
        print(f"app ready in {time.monotonic() - t_start:.1f} s", flush=True)
        address = f"localhost:{service.grpc_port}"
    else:
        address = args.address
    frames = list(generated_clip(args.num_frames, args.height, args.width))
    opts = _options_from_args(args, args.fps)
    print(f"streaming {args.streams} streams of {args.num_frames} frames at {args.fps} fps...", flush=True)

    first_refusals: dict[int, str] = {}  # stream -> why admission first turned it away

    async def one(i: int):
        await asyncio.sleep(i * args.stagger_s)

        def refused(err: WeirError, _wait_s: float) -> None:
            first_refusals.setdefault(i, str(err))

        try:
            return await stream_frames(address, frames, opts, app_name=args.app, retry_for_s=args.retry_for_s,
                                       on_refused=refused)
        except WeirError as exc:
            return exc

    async def run_all():
        t = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(args.streams)))
        return results, time.monotonic() - t

    try:
        results, wall_s = asyncio.run(run_all())
        if started_here and args.metrics_out:
            import urllib.request

            with urllib.request.urlopen(f"http://localhost:{service.http_port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            Path(args.metrics_out).write_text(text)
            for stage, (total_s, count) in sorted(stage_means(text).items()):
                print(f"server stage {stage}: {count} calls, mean {1000 * total_s / count:.1f} ms")
            eager = gauge_total(text, "weir_cuda_graphs_disabled")
            if eager:
                print(f"server: {eager:.0f} CUDA-graph runner(s) gave up capturing and run eager (several times "
                      "slower): see the pipeline replica's log")
            print(f"wrote {args.metrics_out}")
    finally:
        if started_here:
            from ray import serve

            serve.shutdown()
    rows = stream_rows(results)
    total = sum(r["frames"] for r in rows)
    summary = {"streams": args.streams, "admitted": sum(1 for r in rows if r["status"] == "ok"),
               "aggregate_fps": round(total / wall_s, 2) if wall_s > 0 else 0.0, "wall_s": round(wall_s, 2),
               "admission_retries": sum(r.get("admission_retries", 0) for r in rows),
               "height": args.height, "width": args.width, "input_fps": args.fps, "steps": args.steps}
    cols = ["stream", "status", "admission_wait_s", "frames", "open_ms", "ttff_ms", "p50_ms", "p99_ms",
            "p99_after_joins_ms",
            "max_ms", "deadline_misses", "skipped", "fps"]
    print(" ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print(" ".join(f"{'-' if r.get(c) is None else r[c]!s:>15}" for c in cols))
    print(f"aggregate: {summary['admitted']}/{args.streams} admitted, {summary['aggregate_fps']} fps, "
          f"{summary['wall_s']} s")
    for i, reason in sorted(first_refusals.items()):  # admitted after retries: why they waited
        rows[i]["first_refusal"] = reason[:300]
    refusals = [r for r in rows if r["status"] != "ok"]
    if refusals:  # why the first one was turned away (admission names the limit it hit)
        print(f"first refusal (stream {refusals[0]['stream']}): {refusals[0]['error']}")
    for r in rows:
        if r["status"] == "ok" and "first_refusal" in r:
            print(f"stream {r['stream']} waited {r['admission_wait_s']} s; first refused with: {r['first_refusal']}")
    Path(args.json).write_text(json.dumps({"summary": summary, "streams": rows}, indent=2))
    print(f"wrote {args.json}")
    if args.frames_out:
        write_frame_log(args.frames_out, results)
        print(f"wrote {args.frames_out}")
    return 0


def stream_rows(results: list) -> list[dict]:
    """One summary row per stream of `weir bench serve` (a refused stream's row names its error).

    `p99_after_joins_ms` leaves out the frames captured before the last admitted stream got its first
    frame, i.e. while some stream was still starting: it is the steady state of the served streams.
    """
    from scheduling.slo import percentile

    ok = [r for r in results if not isinstance(r, Exception) and r.latencies_ms]
    # the moment the last admitted stream got its first frame: later frames see no join in progress
    joined_us = max((r.capture_us[0] + 1000 * r.latencies_ms[0] for r in ok), default=0.0)
    rows = []
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            rows.append({"stream": i, "status": type(r).__name__, "frames": 0, "error": str(r)[:300]})
            continue
        ss = r.server_stats
        rows.append({
            "stream": i, "status": "ok", "frames": len(r.frames), "sent": r.sent,
            "open_ms": round(r.open_ms, 1), "ttff_ms": round(r.ttff_ms, 1),
            "p50_ms": round(percentile(r.latencies_ms, 50), 1), "p99_ms": round(percentile(r.latencies_ms, 99), 1),
            "p99_after_joins_ms": _p99_or_none([lat for lat, ts in zip(r.latencies_ms, r.capture_us)
                                                if ts >= joined_us]),
            "max_ms": round(max(r.latencies_ms, default=0.0), 1),
            "deadline_misses": int(ss.deadline_misses) if ss else 0, "skipped": int(ss.frames_skipped) if ss else 0,
            "fps": round(r.fps, 2), "admission_wait_s": round(r.admission_wait_s, 2),
            "admission_retries": r.admission_retries,
        })
    return rows


def _p99_or_none(values: list[float]) -> float | None:
    from scheduling.slo import percentile

    return round(percentile(values, 99), 1) if values else None


def write_frame_log(path: str, results: list) -> None:
    """One CSV row per frame received: stream, seq, capture time (seconds after the first capture of
    any stream) and latency (ms). Refused streams have no rows."""
    ok = [(i, r) for i, r in enumerate(results) if not isinstance(r, Exception)]
    t0_us = min((r.capture_us[0] for _, r in ok if r.capture_us), default=0)
    lines = ["stream,seq,capture_s,latency_ms"]
    for i, r in ok:
        for (seq, _), ts, lat in zip(r.frames, r.capture_us, r.latencies_ms):
            lines.append(f"{i},{seq},{(ts - t0_us) / 1e6:.4f},{lat:.1f}")
    Path(path).write_text("\n".join(lines) + "\n")


def stage_means(metrics_text: str) -> dict[str, tuple[float, int]]:
    """stage -> (total seconds, calls) of `weir_stage_seconds` in a Prometheus text page, summed over
    pipelines; stages without calls are left out.

    Example: 'weir_stage_seconds_sum{gpu_type="H200",model="m",stage="step"} 2.0' and the matching
    '_count ... 40.0' -> {"step": (2.0, 40)}.
    """
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        for suffix, into in (("_sum{", sums), ("_count{", counts)):
            prefix = "weir_stage_seconds" + suffix
            if line.startswith(prefix) and 'stage="' in line:
                stage = line.split('stage="', 1)[1].split('"', 1)[0]
                into[stage] = into.get(stage, 0.0) + float(line.rsplit(" ", 1)[1])
    return {k: (sums.get(k, 0.0), int(n)) for k, n in counts.items() if n > 0}


def gauge_total(metrics_text: str, name: str) -> float:
    """The sum of a gauge's samples over every label set in a Prometheus text page (0 if absent).

    Example: 'weir_cuda_graphs_disabled{gpu_type="H200",model="m"} 1.0' -> 1.0.
    """
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- parser --------------------------------------------------------------------------------------------


def _add_stream_args(p: argparse.ArgumentParser, *, prompt_required: bool, fps: float | None) -> None:
    p.add_argument("--prompt", required=prompt_required, default="a watercolor painting of a sunny street")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--fps", type=float, default=fps, help="input frame rate (default: the file's)")
    p.add_argument("--steps", type=int, default=2, choices=[1, 2, 3, 4])
    p.add_argument("--noise-strength", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-model", default=None, help="model the stream asks for (default: the server's)")
    p.add_argument("--stream-vae", default=None, choices=["wan", "taehv"])
    p.add_argument("--ttff-ms", type=float, default=0.0, help="TTFF SLO; 0 = server default")
    p.add_argument("--deadline-ms", type=float, default=0.0, help="per-frame deadline; 0 = server default")
    p.add_argument("--api-key", default=None, help="default: $WEIR_API_KEY")
    p.add_argument("--jpeg", action="store_true", help="send and receive JPEG instead of raw RGB")
    p.add_argument("--retry-for-s", type=float, default=RETRY_FOR_S,
                   help="when refused (RESOURCE_EXHAUSTED), ask again at the server's retry hint for up to "
                        "this long; 0 = give up at the first refusal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description="Weir: live video diffusion as a service.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the Serve app (local Ray, or RAY_ADDRESS / --address)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--config", default=None, help="Serve config YAML (import_path deployments.app:build_app)")
    _add_service_args(p)
    p.add_argument("--no-web", action="store_true", help="do not serve the browser page at /web/")
    p.set_defaults(fn=serve_main)

    p = sub.add_parser("stream", help="stream a video through a running Weir")
    p.add_argument("--input", required=True, help="video file, 'webcam' (/dev/video0) or 'generated'")
    p.add_argument("--output", required=True, help="output .mp4")
    p.add_argument("--address", default="localhost:9000")
    p.add_argument("--app", default="weir", help="Serve application name")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--record", default=None, metavar="MP4",
                   help="also record the output on the server and fetch that recording to MP4 at the end")
    p.add_argument("--change-prompt", default=None, help="switch to this prompt during the stream")
    p.add_argument("--change-at", type=int, default=24, help="input frame at which --change-prompt is sent")
    p.add_argument("--blend-chunks", type=int, default=0, help="blend the change over N chunks (0 = at once)")
    p.add_argument("--blend", default="linear", choices=["linear", "slerp"], help="how the blend interpolates")
    _add_stream_args(p, prompt_required=True, fps=None)
    p.set_defaults(fn=stream_main)

    p = sub.add_parser("demo", help="local end-to-end demo on a generated clip")
    p.add_argument("--output", default="weir_demo.mp4")
    p.add_argument("--num-frames", type=int, default=33)
    p.add_argument("--num-cpus", type=int, default=None)
    _add_service_args(p, grpc_port=None, http_port=None)
    _add_stream_args(p, prompt_required=False, fps=8.0)
    p.add_argument("--web", action="store_true",
                   help="serve the browser page and wait (instead of streaming a generated clip)")
    p.set_defaults(fn=demo_main, pipeline_cpus=0.0)

    p = sub.add_parser("run", help="offline restyling of a file (no Ray)", add_help=False)
    p.set_defaults(fn=None, delegate="run")

    bench = sub.add_parser("bench", help="benchmarks: serve | engine | pipeline")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser("serve", help="N concurrent gRPC streams; prints a table, writes JSON")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--address", default=None, help="a running Weir (default: start a local one)")
    p.add_argument("--app", default="weir")
    p.add_argument("--num-frames", type=int, default=33)
    p.add_argument("--stagger-s", type=float, default=0.1, help="delay between stream starts")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--json", default="bench_serve.json")
    p.add_argument("--metrics-out", default=None, help="also save the server's Prometheus metrics here at the end")
    p.add_argument("--frames-out", default=None, metavar="CSV",
                   help="also write every frame's stream, seq, capture time and latency here")
    _add_service_args(p, grpc_port=None, http_port=None)
    _add_stream_args(p, prompt_required=False, fps=8.0)
    p.set_defaults(fn=bench_serve_main, pipeline_cpus=0.0)
    for name in ("engine", "pipeline"):
        q = bsub.add_parser(name, help=f"{name} benchmark (cluster.bench)", add_help=False)
        q.set_defaults(fn=None, delegate=f"bench-{name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # delegated subcommands parse their own arguments
    if argv[:1] == ["run"]:
        from cluster.offline import main as offline_main

        return offline_main(argv[1:])
    if argv[:1] == ["tenants"]:
        from deployments.tenants import tenants_main

        return tenants_main(argv[1:])
    if argv[:2] in (["bench", "engine"], ["bench", "pipeline"]):
        from cluster import bench

        return (bench.engine_main if argv[1] == "engine" else bench.pipeline_main)(argv[2:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
