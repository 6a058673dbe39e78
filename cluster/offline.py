"""`weir run`: restyle a video file offline through the streaming engine, frame by frame.

    weir run --input in.mp4 --prompt "a watercolor painting" --output out.mp4 --steps 2 \
             [--model tiny|wan-1.3b|wan-14b] [--checkpoint-dir DIR] [--height 480 --width 832]

The input is centre-cropped and resized to the model resolution, streamed through the engine as a live
stream would be (same chunking, same state), and the output is written at the input frame rate.
"""

from __future__ import annotations

import argparse
import sys
import time

from cluster.video import VideoWriter, generated_clip, read_video


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="weir run", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="input video file, or 'generated' for a synthetic clip")
    p.add_argument("--prompt", required=True)
    p.add_argument("--output", required=True, help="output .mp4")
    p.add_argument("--steps", type=int, default=2, choices=[1, 2, 3, 4])
    p.add_argument("--model", default=None, help="tiny | wan-1.3b | wan-14b (default: tiny on CPU, wan-1.3b on GPU)")
    p.add_argument("--vae", default="wan", choices=["wan", "taehv"])
    p.add_argument("--checkpoint-dir", default=None, help="published release folder; omitted = random weights")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--noise-scale", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--first-chunk-frames", type=int, default=1, choices=[1, 5])
    return p


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    fps = done / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} frames  {fps:5.1f} fps")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    import torch

    from stages.engine import EngineSpec, StreamEngine, StreamParams

    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = args.model or ("wan-1.3b" if device.startswith("cuda") else "tiny")
    height = args.height or (480 if model != "tiny" else 64)
    width = args.width or (832 if model != "tiny" else 96)
    if args.input == "generated":
        frames, fps = list(generated_clip(args.max_frames or 33, height, width)), 16.0
    else:
        frames, fps = read_video(args.input, height, width, args.max_frames)

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    t0 = time.perf_counter()
    engine = StreamEngine(
        EngineSpec(model=model, vae=args.vae, device=device, dtype=dtype, checkpoint_dir=args.checkpoint_dir)
    )
    print(f"loaded {model} on {device} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    params = StreamParams(
        prompt=args.prompt,
        num_steps=args.steps,
        noise_scale=args.noise_scale,
        seed=args.seed,
        height=height,
        width=width,
        vae=args.vae,
        first_chunk_frames=args.first_chunk_frames,
    )
    engine.open_stream("offline", params)
    started = time.perf_counter()
    first_at = None
    with VideoWriter(args.output, fps, height, width) as writer:
        for seq, frame in enumerate(frames):
            for out in engine.push_frame("offline", seq, frame):
                if first_at is None:
                    first_at = time.perf_counter() - started
                writer.write(out.frame)
            _progress(writer.frames_written, len(frames), started)
        for out in engine.flush("offline"):
            writer.write(out.frame)
        _progress(writer.frames_written, len(frames), started)
        written = writer.frames_written
    engine.close_stream("offline")
    elapsed = time.perf_counter() - started
    sys.stderr.write("\n")
    print(
        f"wrote {written} frames to {args.output}: {written / elapsed:.1f} fps, "
        f"first frame after {1000 * (first_at or elapsed):.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
