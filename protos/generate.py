"""Regenerate the Python stubs of weir.proto: `python -m protos.generate` (from anywhere).

Writes protos/weir_pb2.py, protos/weir_pb2.pyi and protos/weir_pb2_grpc.py. The proto is compiled with
the repository root as include path, so the stubs import each other as `protos.weir_pb2`.
`--out DIR` writes them under DIR/protos/ instead (tests/unit/test_proto_codec.py regenerates into a
temporary folder and checks the committed stubs are exactly what this produces).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = ("weir_pb2.py", "weir_pb2.pyi", "weir_pb2_grpc.py")
"""The generated files, under <out>/protos/."""


def generate(out: Path = ROOT) -> int:
    """Run protoc on protos/weir.proto, writing under out/protos/; returns its exit code."""
    from grpc_tools import protoc

    (out / "protos").mkdir(parents=True, exist_ok=True)

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(ROOT / "protos" / "weir.proto"),
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository root)")
    return generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    raise SystemExit(main())
