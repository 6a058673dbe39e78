"""`weir bench engine` and `weir bench pipeline`: speed and memory of the streaming engine.

    weir bench engine [--model wan-1.3b] [--resolutions 480x832,512x512] [--steps 1,2,3,4]
                      [--vae wan,taehv] [--chunks 40] [--json out.json] [--reference] [--check-precision]
                      [--kernels N]

For each (resolution, steps, vae) one stream is opened and fed chunks of 4 frames as fast as the
engine takes them. Reported per configuration (medians unless named):
  fps            frames out / wall time over the measured chunks (no per-stage sync)
  dit_ms         DiT time per chunk (one stream-batch forward)      } measured in a second pass with a
  enc_ms/dec_ms  VAE encode / decode time per 4-frame chunk          } device sync around each stage
  chunk_p50/p99  wall time of one push of 4 frames (end to end)
  ttff_warm_ms   open a new stream on the warm engine, push frame 0, first output frame back
  ttff_cold_ms   first output of the first stream after start (after the start-up warm-up)
  peak_mem_gib   peak device memory
Tables print to stdout; --json writes every row.

--reference        also time the published pipeline (cluster/reference_bench.py: its DiT per chunk and
                   its Wan VAE stream encode/decode, same model size and resolutions, bf16 on CUDA) and
                   print Weir / reference ratios of dit_ms and end-to-end FPS (the reference's FPS is
                   4000 / (dit + enc + dec), its stages being serial).
--streams 1,2,4,8  also a capacity table: k streams stepped together, one tick = one chunk of each
                   (encode each, one shared DiT forward, decode each), with a device sync around each
                   stage: tick ms, aggregate FPS, and how many streams of --input-fps one device carries
                   (FPS / input fps). This is what the serving admission's per-row cost comes from.
--kernels N        also profile each stage (encode, DiT step, decode: its last call of the breakdown pass,
                   made KERNEL_TABLE_CALLS more times) and print its kernel time and count per call and its
                   N costliest kernels; the JSON rows carry the tables.
--cold-shapes 512x512,384x672
                   also what a first stream at each of these shapes costs, right after the start-up warm-up
                   at the first resolution (before any other row compiles anything): per shape and VAE
                   kind, in --vae order, one 1-step stream of COLD_CHUNKS chunks, then a second one; the
                   cold stream's TTFF and its time beyond the second's steady chunks (`cold_extra_s`: the
                   compiles, autotuning and captures every stream on a pipeline would wait through;
                   scheduling.priors COLD_SHAPE_S). The first kind at a shape also pays the DiT's part.
--check-precision  run the DiT in fp32 and in the bench dtype on the same random weights over a few
                   chunks (cluster/precision_bench.py) and print the relative error of the outputs
                   (target rel_l2 <= 1e-2).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class EngineRow:
    model: str
    resolution: str
    steps: int
    vae: str
    fps: float
    """Frames out over the whole timed window."""
    fps_p50: float
    """4 frames / the median chunk time: the steady rate, robust to one slow chunk in the window."""
    dit_ms: float
    enc_ms: float
    dec_ms: float
    chunk_p50_ms: float
    chunk_p99_ms: float
    ttff_warm_ms: float
    ttff_cold_ms: float
    peak_mem_gib: float
    device: str
    kernels: dict | None = None
    """With --kernels: per stage, the profiled kernel table (`kernel_table`)."""


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class _StageTimer:
    """Wraps a stage method with device-synchronised wall timing (for the per-stage breakdown pass)."""

    def __init__(self, obj: object, name: str, sync) -> None:
        self.obj, self.name, self.sync = obj, name, sync
        self.fn = getattr(obj, name)
        self.times: list[float] = []
        self.last_call: tuple[tuple, dict] | None = None
        """The arguments of the last call (the kernel tables call the stage again with them)."""

    def __enter__(self) -> _StageTimer:
        def timed(*args, **kwargs):
            self.last_call = (args, kwargs)
            self.sync()
            t0 = time.perf_counter()
            out = self.fn(*args, **kwargs)
            self.sync()
            self.times.append(1000 * (time.perf_counter() - t0))
            return out

        setattr(self.obj, self.name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.obj, self.name, self.fn)


KERNEL_TABLE_CALLS = 3
"""Calls of a stage profiled for its kernel table (the table is per call: totals / calls)."""


def kernel_table(fn, *, cuda: bool, calls: int = KERNEL_TABLE_CALLS, top: int = 12) -> dict:
    """Profile `calls` calls of fn() (after one unprofiled call) and return, per call: the kernels'
    total time and count, and the `top` kernels by time with their launches and ms. With `cuda` (fn
    runs on a CUDA device) the rows are device kernels, CUDA-graph replays included; on CPU, where
    there are none, the ATen ops' self times stand in.

    Example: {"ms": 15.3, "count": 1376, "top": [["_attention_fwd_tma", 30.0, 5.68], ...]}
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync()
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    by_name: dict[str, list[float]] = {}
    total_us, count = 0.0, 0
    for event in prof.events():
        if event.device_type != device_type:
            continue
        us = event.device_time if cuda else event.self_cpu_time_total
        entry = by_name.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
        total_us += us
        count += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"ms": total_us / calls / 1000, "count": count / calls,
            "top": [[name, n / calls, round(us / calls / 1000, 4)] for name, (n, us) in ranked]}


def _frames(num: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(num)]


def bench_engine_config(engine, *, model: str, height: int, width: int, steps: int, vae: str,
                        chunks: int, ttff_cold_ms: float, kernels: int = 0) -> EngineRow:
    """Measure one (resolution, steps, vae) configuration on a built engine; `kernels` > 0 also
    profiles each stage's last call of the breakdown pass again (`kernel_table`, that many top rows)."""
    import torch

    from stages.config import StreamConfig
    from stages.engine import StreamParams

    dev = engine.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    params = StreamParams(prompt="a watercolor painting of a city street", num_steps=steps,
                          height=height, width=width, vae=vae)
    # warm-up: fill the stream batch and the KV caches (the step after the caches fill runs mask-free
    # attention, a new CUDA graph capture, which belongs to the warm-up, not to the timed window)
    warm_chunks = steps + 2 + StreamConfig().num_kv_cache_frames
    frames = _frames(1 + 4 * (warm_chunks + chunks), height, width, seed=steps)

    # TTFF on the warm engine: a fresh stream, frame 0 in, first frame out
    ttffs = []
    for rep in range(3):
        sid = f"ttff-{rep}"
        sync()
        t0 = time.perf_counter()
        engine.open_stream(sid, params)
        out = engine.push_frame(sid, 0, frames[0])
        sync()
        ttffs.append(1000 * (time.perf_counter() - t0))
        assert out, "the first frame must come out of the prefill"
        engine.close_stream(sid)

    # end to end: chunks of 4 pushed back to back
    sid = "bench"
    engine.open_stream(sid, params)
    engine.push_frame(sid, 0, frames[0])
    seq = 1
    for _ in range(warm_chunks):
        for _ in range(4):
            engine.push_frame(sid, seq, frames[seq])
            seq += 1
    sync()
    chunk_ms, produced = [], 0
    t_start = time.perf_counter()
    for _ in range(chunks):
        t0 = time.perf_counter()
        for _ in range(4):
            produced += len(engine.push_frame(sid, seq, frames[seq]))
            seq += 1
        sync()
        chunk_ms.append(1000 * (time.perf_counter() - t0))
    fps = produced / (time.perf_counter() - t_start)

    # breakdown pass: sync around each stage
    c = engine.components
    with _StageTimer(c.dit, "step", sync) as t_dit, _StageTimer(c.encoders[vae], "encode", sync) as t_enc, \
            _StageTimer(c.decoders[vae], "decode", sync) as t_dec:
        for _ in range(min(chunks, 12)):
            for _ in range(4):
                engine.push_frame(sid, seq, frames[seq % len(frames)])
                seq += 1
    tables = None
    if kernels > 0:  # the stream's state moves on with each call; it is closed right after
        tables = {}
        for stage, timer in (("encode", t_enc), ("dit", t_dit), ("decode", t_dec)):
            if timer.last_call is not None:
                args, kwargs = timer.last_call
                call = functools.partial(timer.fn, *args, **kwargs)
                tables[stage] = kernel_table(call, cuda=dev.type == "cuda", top=kernels)
    engine.close_stream(sid)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return EngineRow(
        model=model, resolution=f"{height}x{width}", steps=steps, vae=vae, fps=fps,
        fps_p50=4000.0 / _percentile(chunk_ms, 50),
        dit_ms=statistics.median(t_dit.times), enc_ms=statistics.median(t_enc.times),
        dec_ms=statistics.median(t_dec.times), chunk_p50_ms=_percentile(chunk_ms, 50),
        chunk_p99_ms=_percentile(chunk_ms, 99), ttff_warm_ms=statistics.median(ttffs),
        ttff_cold_ms=ttff_cold_ms, peak_mem_gib=peak,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", kernels=tables,
    )


@dataclass
class CapacityRow:
    model: str
    resolution: str
    steps: int
    vae: str
    streams: int
    tick_ms: float
    fps: float
    streams_at_input_fps: float
    enc_ms: float
    dit_ms: float
    dec_ms: float


def bench_capacity(engine, *, model: str, height: int, width: int, steps: int, vae: str, streams: int,
                   ticks: int, input_fps: float) -> CapacityRow:
    """Median tick over `streams` streams that each have a chunk ready every tick (first ticks left out:
    they prefill and capture each stream's CUDA graphs). Stage times are per tick, summed over streams."""
    import torch

    from stages.engine import StreamParams

    dev = engine.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    frames = _frames(4, height, width, seed=streams)
    ids = [f"cap-{streams}-{i}" for i in range(streams)]
    for sid in ids:
        engine.open_stream(sid, StreamParams(prompt=f"capacity {sid}", num_steps=steps, height=height,
                                             width=width, vae=vae))
        engine.add_frame(sid, 0, frames[0])
    engine.step(ids)
    c = engine.components
    tick_ms, stages = [], []
    seq = 1
    try:
        with _StageTimer(c.dit, "step", sync) as t_dit, _StageTimer(c.encoders[vae], "encode", sync) as t_enc, \
                _StageTimer(c.decoders[vae], "decode", sync) as t_dec:
            for _ in range(ticks + steps + 2):
                for sid in ids:
                    for i in range(4):
                        engine.add_frame(sid, seq + i, frames[i])
                seq += 4
                marks = (len(t_enc.times), len(t_dit.times), len(t_dec.times))
                sync()
                t0 = time.perf_counter()
                engine.step(ids)
                sync()
                tick_ms.append(1000 * (time.perf_counter() - t0))
                stages.append(tuple(sum(t.times[m:]) for t, m in zip((t_enc, t_dit, t_dec), marks)))
    finally:
        for sid in ids:
            engine.close_stream(sid)
    steady = slice(steps + 2, None)
    tick = statistics.median(tick_ms[steady])
    fps = 4 * streams * 1000 / tick
    enc, dit, dec = (statistics.median(s[k] for s in stages[steady]) for k in range(3))
    return CapacityRow(model=model, resolution=f"{height}x{width}", steps=steps, vae=vae, streams=streams,
                       tick_ms=tick, fps=fps, streams_at_input_fps=fps / input_fps, enc_ms=enc, dit_ms=dit,
                       dec_ms=dec)


def print_kernel_tables(row: EngineRow) -> None:
    """The row's kernel tables (--kernels), one block per stage."""
    for stage, table in (row.kernels or {}).items():
        print(f"# kernels {row.resolution} {row.vae} {row.steps} step(s), {stage}: "
              f"{table['ms']:.2f} ms in {table['count']:.0f} per call")
        for name, launches, ms in table["top"]:
            print(f"#   {ms:8.3f} ms {launches:6.1f}x  {name[:100]}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r[c]).rjust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def engine_main(argv: list[str] | None = None) -> int:
    import torch

    from stages.engine import EngineSpec, StreamEngine, StreamParams

    p = argparse.ArgumentParser(prog="weir bench engine", description="single-device engine speed")
    p.add_argument("--model", default="wan-1.3b")
    p.add_argument("--resolutions", default="480x832,512x512")
    p.add_argument("--steps", default="1,2,3,4")
    p.add_argument("--vae", default="wan,taehv")
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--reference", action="store_true", help="time the published pipeline too, print ratios")
    p.add_argument("--check-precision", action="store_true", help="bf16 vs fp32 DiT output error")
    p.add_argument("--streams", default="", help="capacity table for these stream counts, e.g. 1,2,4,8")
    p.add_argument("--input-fps", type=float, default=16.0, help="input frame rate of the capacity table")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also profile each stage and print its top N kernels (in the JSON too)")
    p.add_argument("--cold-shapes", default="", help="first-stream cost at these shapes, e.g. 512x512,384x672")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="measure the first stream without the start-up warm-up")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    resolutions = [tuple(int(x) for x in r.split("x")) for r in args.resolutions.split(",")]
    vaes = args.vae.split(",")

    rows: list[EngineRow] = []
    t0 = time.perf_counter()
    engine = StreamEngine(EngineSpec(model=args.model, vae=vaes[0], device=device, dtype=dtype))
    build_s = time.perf_counter() - t0
    h0, w0 = resolutions[0]
    frames = _frames(1, h0, w0, 0)
    steps_list = tuple(int(x) for x in args.steps.split(","))
    warm_s = engine.warm_up(h0, w0, steps=steps_list, vaes=tuple(vaes)) if args.warm_up else 0.0
    t0 = time.perf_counter()
    engine.open_stream("cold", StreamParams(prompt="cold start", num_steps=1, height=h0, width=w0, vae=vaes[0]))
    engine.push_frame("cold", 0, frames[0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ttff_cold_ms = 1000 * (time.perf_counter() - t0)
    print(f"# first stream after start (build {build_s:.1f} s, warm-up {warm_s:.1f} s): "
          f"TTFF {ttff_cold_ms:.0f} ms", file=sys.stderr)
    engine.close_stream("cold")
    print(f"# built {args.model} on {device} ({dtype}) in {build_s:.1f} s", file=sys.stderr)
    cold = []
    for shape in filter(None, args.cold_shapes.split(",")):
        h, w = (int(x) for x in shape.split("x"))
        for vae in vaes:
            cold.append(bench_cold_shape(engine, h, w, vae))
            print(json.dumps(cold[-1]), file=sys.stderr)
    if cold:
        print("# first stream at a new shape (after the warm-up at the first resolution)")
        print_table(cold, ["resolution", "vae", "cold_ttff_ms", "cold_extra_s", "second_ttff_ms", "steady_chunk_ms"])
    for (h, w) in resolutions:
        for vae in vaes:
            for steps in [int(s) for s in args.steps.split(",")]:
                row = bench_engine_config(engine, model=args.model, height=h, width=w, steps=steps, vae=vae,
                                          chunks=args.chunks, ttff_cold_ms=ttff_cold_ms, kernels=args.kernels)
                rows.append(row)
                if row.kernels:
                    print_kernel_tables(row)
                print(json.dumps(asdict(row)), file=sys.stderr)
    table = [asdict(r) for r in rows]
    print_table(table, ["resolution", "vae", "steps", "fps", "fps_p50", "dit_ms", "enc_ms", "dec_ms", "chunk_p50_ms",
                        "chunk_p99_ms", "ttff_warm_ms", "ttff_cold_ms", "peak_mem_gib"])
    result: dict = {"rows": table, "argv": argv, "cold_shapes": cold}
    if args.streams:
        capacity = []
        for (h, w) in resolutions:
            for vae in vaes:
                for steps in steps_list:
                    for k in (int(x) for x in args.streams.split(",")):
                        row = bench_capacity(engine, model=args.model, height=h, width=w, steps=steps, vae=vae,
                                             streams=k, ticks=min(args.chunks, 10), input_fps=args.input_fps)
                        capacity.append(asdict(row))
                        print(json.dumps(capacity[-1]), file=sys.stderr)
        print(f"# capacity: k streams per tick, streams carried at {args.input_fps:g} fps input")
        print_table(capacity, ["resolution", "vae", "steps", "streams", "tick_ms", "fps", "streams_at_input_fps",
                               "enc_ms", "dit_ms", "dec_ms"])
        result["capacity"] = capacity
    graphs = getattr(engine.components.dit.shards[-1], "graphs", None)
    result["dit_graphs"] = None if graphs is None else graphs.stats()
    print(f"# DiT CUDA graphs: {result['dit_graphs']}", file=sys.stderr)
    if args.json:  # write what we have before the optional, slower parts
        _write_json(args.json, result)
    if args.reference or args.check_precision:
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.reference:
        result["reference"] = _reference_section(table, args.model, resolutions,
                                                 [int(s) for s in args.steps.split(",")], device)
        if args.json:
            _write_json(args.json, result)
    if args.check_precision:
        result["precision"] = _precision_section(args.model, resolutions, device, dtype)
        if args.json:
            _write_json(args.json, result)
    return 0


COLD_CHUNKS = 12
"""Chunks of each --cold-shapes stream: past its KV caches' filling and its full-cache graph capture."""


def bench_cold_shape(engine, height: int, width: int, vae: str) -> dict:
    """A first 1-step stream at (height, width, vae), then a second (module docstring, --cold-shapes)."""
    import torch

    from stages.engine import StreamParams

    frame = np.full((height, width, 3), 100, np.uint8)

    def run(sid: str) -> tuple[float, list[float]]:
        engine.open_stream(sid, StreamParams(prompt="cold shape", num_steps=1, height=height, width=width, vae=vae))
        chunks, ttff, seq, t0 = [], None, 0, time.perf_counter()
        try:
            for c in range(COLD_CHUNKS):
                tc = time.perf_counter()
                outs = []
                for _ in range(1 if c == 0 else 4):
                    outs += engine.push_frame(sid, seq, frame)
                    seq += 1
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)
                chunks.append(time.perf_counter() - tc)
                if outs and ttff is None:
                    ttff = time.perf_counter() - t0
        finally:
            engine.close_stream(sid)
        return ttff if ttff is not None else float("nan"), chunks

    cold_ttff, cold = run(f"cold_{vae}_{height}x{width}")
    warm_ttff, warm = run(f"second_{vae}_{height}x{width}")
    steady = statistics.median(warm[len(warm) // 2:])
    extra = sum(max(0.0, c - w) for c, w in zip(cold, warm))
    return {"resolution": f"{height}x{width}", "vae": vae, "cold_ttff_ms": 1000 * cold_ttff,
            "cold_extra_s": extra, "second_ttff_ms": 1000 * warm_ttff, "steady_chunk_ms": 1000 * steady,
            "cold_chunks_s": cold, "second_chunks_s": warm}


def _formatted(rows: list[dict], formats: dict[str, str]) -> list[dict]:
    """Copies of `rows` with the named float columns pre-formatted (ratios and errors need more digits)."""
    return [{k: formats[k].format(v) if k in formats else v for k, v in r.items()} for r in rows]


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def _reference_section(table: list[dict], model: str, resolutions: list[tuple[int, int]], steps: list[int],
                       device: str) -> dict:
    """Time the reference, print the Weir / reference table; errors are reported, not raised."""
    from cluster.reference_bench import reference_rows

    try:
        ref = reference_rows(model_name=model, resolutions=resolutions, steps=steps, chunks=10, warmup=3,
                             device=device)
    except Exception as exc:  # noqa: BLE001 - the Weir rows are already measured; keep them
        print(f"# reference timing failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}
    dit = {(r["resolution"], r["steps"]): r["ms"] for r in ref if r["kind"] == "dit"}
    fps = {(r["resolution"], r["steps"]): r["fps_est"] for r in ref if r["kind"] == "e2e"}
    vae = {(r["kind"], r["resolution"]): r["ms"] for r in ref if r["kind"].startswith("vae")}
    ratios = []
    for r in table:
        key = (r["resolution"], r["steps"])
        if key not in dit:
            continue
        ratios.append(dict(
            resolution=r["resolution"], vae=r["vae"], steps=r["steps"],
            weir_dit_ms=r["dit_ms"], ref_dit_ms=dit[key], dit_ratio=r["dit_ms"] / dit[key],
            weir_fps=r["fps"], ref_fps=fps[key], fps_ratio=r["fps"] / fps[key],
            weir_enc_ms=r["enc_ms"], ref_enc_ms=vae[("vae_enc", r["resolution"])],
            weir_dec_ms=r["dec_ms"], ref_dec_ms=vae[("vae_dec", r["resolution"])],
        ))
    print("\n# Weir vs reference (ratio = Weir / reference; ref_fps = 4000 / (dit + Wan enc + Wan dec))")
    if ratios:
        print_table(_formatted(ratios, {"dit_ratio": "{:.3f}", "fps_ratio": "{:.3f}"}), ["resolution", "vae", "steps", "weir_dit_ms", "ref_dit_ms", "dit_ratio", "weir_fps",
                             "ref_fps", "fps_ratio", "weir_enc_ms", "ref_enc_ms", "weir_dec_ms", "ref_dec_ms"])
    return {"rows": ref, "ratios": ratios}


def _precision_section(model: str, resolutions: list[tuple[int, int]], device: str, dtype: str) -> dict:
    """fp32 vs the bench dtype on the first resolution, 1 and 2 steps; errors are reported, not raised."""
    import torch

    from cluster.precision_bench import precision_rows

    low = getattr(torch, dtype)
    if low == torch.float32:
        return {"error": "--check-precision compares fp32 with a lower precision: pass --dtype bfloat16"}
    try:
        rows = precision_rows(model_name=model, resolutions=resolutions[:1], steps=[1, 2], chunks=4,
                              device=device, low_dtype=low)
    except Exception as exc:  # noqa: BLE001
        print(f"# precision check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}
    print(f"\n# {dtype} vs float32 DiT outputs (target rel_l2 <= 1e-2)")
    print_table(_formatted(rows, {"rel_l2": "{:.2e}", "rel_max": "{:.2e}"}),
                ["resolution", "steps", "dtype", "outputs", "rel_l2", "rel_max", "ok"])
    return {"rows": rows}


def pipeline_main(argv: list[str] | None = None) -> int:
    from cluster.pipeline_bench import main

    return main(argv)
