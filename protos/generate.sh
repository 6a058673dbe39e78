#!/usr/bin/env bash
# Regenerate the Python stubs of weir.proto (same as `python -m protos.generate`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m protos.generate
