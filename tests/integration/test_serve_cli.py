"""`weir serve` as a process manager runs it: up on a local Ray, then stopped by SIGTERM, cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_stops_weir_serve_cleanly(tmp_path):
    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", "--no-web", "--grpc-port", str(grpc_port),
             "--http-port", str(http_port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            while "weir: gRPC on" not in log.read_text():
                assert proc.poll() is None, f"weir serve exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"weir serve not up in 180 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "weir: stopping" in text
    assert "Aborted" not in text and "Traceback" not in text, text[-3000:]
