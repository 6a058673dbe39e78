"""Regenerate the Python stubs of weir.proto: `python -m protos.generate` (from the repository root).

Writes protos/weir_pb2.py, protos/weir_pb2.pyi and protos/weir_pb2_grpc.py. The proto is compiled with
the repository root as include path, so the stubs import each other as `protos.weir_pb2`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    root = Path(__file__).resolve().parent.parent
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        "protos/weir.proto",
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
