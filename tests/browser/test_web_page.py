"""The browser page in real headless Chromium against a real local Ray + Serve with the tiny model on CPU.

Chromium's fake camera plays a generated .y4m (a moving pattern at the stream's size). Each case loads
the page, starts a stream, checks that styled frames come back and are drawn (the canvas changes and
is not the input), changes the prompt live (same stream id, the server acknowledges the new prompt,
frames keep coming), saves a screenshot (pytest's tmp path, and a copy under out/browser/), stops the
stream and checks the server freed its slot. Media stay on loopback: the web ingress gathers WebRTC
candidates on 127.0.0.1 only and drops the browser's others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
H = W = 64
FPS = 4
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_y4m(path: Path, num_frames: int, height: int, width: int, fps: int) -> list[np.ndarray]:
    """A 4:2:0 Y4M clip of cluster.video.generated_clip; returns the RGB frames it encodes."""
    import av

    from cluster.video import generated_clip

    frames = list(generated_clip(num_frames, height, width))
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
            f.write(b"FRAME\n" + np.ascontiguousarray(yuv).tobytes())
    return frames


def _in_thread(coro):
    """Run a coroutine on its own loop, beside Playwright's."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _active_streams(service) -> int:
    from cluster.client import unary
    from protos import weir_pb2

    health = _in_thread(unary(f"localhost:{service.grpc_port}", "Health", weir_pb2.HealthRequest()))
    return health.active_streams


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("camera") / "camera.y4m"
    frames = write_y4m(path, 40, H, W, 10)
    return path, frames


@pytest.fixture(scope="module")
def weir(tmp_path_factory):
    if not Path(CHROMIUM).exists():  # the test command installs it: a missing browser is a failure
        pytest.fail(f"needs Debian's chromium at {CHROMIUM} (tests/install_and_test.sh installs it)")
    import aiortc  # noqa: F401 - test extras: missing means a broken install, not a skip
    import playwright.sync_api  # noqa: F401
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from cluster.cli import free_port, init_ray
    from deployments import app as weir_app
    from deployments.config import PipelineSpec, ServiceConfig
    from deployments.web import WebConfig

    service = ServiceConfig(
        pipelines=(PipelineSpec(model="tiny", device="cpu", max_streams=2, num_cpus=0),),
        grpc_port=free_port(), http_port=free_port(), stats_interval_s=0.5,
        recordings_dir=str(tmp_path_factory.mktemp("recordings")),
    )
    init_ray(num_cpus=2)
    try:
        weir_app.start(service, web=WebConfig(ice_addresses=("127.0.0.1",)))
        yield service
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser(clip):
    from playwright.sync_api import sync_playwright

    path, _ = clip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={path}", "--allow-loopback-in-peer-connection",
        ])
        yield browser
        browser.close()


@pytest.fixture
def artefacts(tmp_path):
    out = REPO_ROOT / "out" / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return tmp_path, out


def _canvas(page) -> np.ndarray:
    data = page.evaluate("""() => {
        const c = document.getElementById('output');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
    }""")
    return np.asarray(data, dtype=np.uint8).reshape(H, W, 4)[..., :3].astype(np.float32)


def _frames_drawn(page) -> int:
    return int(page.inner_text("#frames"))


def _wait_frames(page, n: int, timeout_s: float = 45.0) -> None:
    page.wait_for_function(f"() => Number(document.getElementById('frames').textContent) >= {n}",
                           timeout=timeout_s * 1000)


def _open_page(browser, weir, *, query: str, init_script: str = ""):
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    if init_script:
        page.add_init_script(init_script)
    page.goto(f"http://127.0.0.1:{weir.http_port}/web/?{query}")
    page.wait_for_selector("body[data-ready='1']")
    assert page.inner_text("h1") == "Weir"
    return context, page, console


QUERY = f"prompt=a+watercolor+street&resolution={H}x{W}&fps-in={FPS}&steps=1&ttff-ms=60000&deadline-ms=60000"


def _run_page(browser, weir, clip, artefacts, *, transport_pref: str, expect: str, init_script: str = "",
              blend_and_record: bool = False):
    _, input_frames = clip
    context, page, console = _open_page(browser, weir, query=f"{QUERY}&transport-pref={transport_pref}",
                                        init_script=init_script)
    try:
        t0 = time.monotonic()
        page.click("#start")
        _wait_frames(page, 3)
        ttff_s = time.monotonic() - t0
        assert page.inner_text("#transport") == expect, console
        stream_id = page.inner_text("#stream-id")
        assert len(stream_id) == 16, stream_id
        assert _active_streams(weir) == 1  # admitted by the same router as gRPC streams

        first = _canvas(page)
        seen = _frames_drawn(page)
        _wait_frames(page, seen + 2)
        second = _canvas(page)
        assert np.abs(first - second).mean() > 0.5, "the drawn frames do not change"
        assert second.std() > 2.0, "the canvas is blank"
        # styled, not the input echoed: far from every frame the fake camera plays
        nearest = min(np.abs(second - f.astype(np.float32)).mean() for f in input_frames)
        assert nearest > 8.0, f"the output is within {nearest:.1f} of an input frame"

        page.fill("#prompt", "an oil painting of a harbour at night")
        page.click("#apply-prompt")
        page.wait_for_function(
            "() => document.getElementById('applied-prompt').textContent === 'an oil painting of a harbour at night'",
            timeout=30_000)
        assert page.inner_text("#stream-id") == stream_id  # no restart
        after_prompt = _frames_drawn(page)
        _wait_frames(page, after_prompt + 2)
        assert page.is_hidden("#error"), page.inner_text("#error-text")
        assert "ms" in page.inner_text("#ttff") and "ms" in page.inner_text("#latency")
        assert float(page.inner_text("#fps")) > 0

        if blend_and_record:
            _blend_and_record(page, stream_id)

        tmp, out = artefacts
        shot = tmp / f"page-{expect.lower()}.png"
        page.screenshot(path=str(shot), full_page=True)
        shutil.copy(shot, out / shot.name)

        page.click("#stop")
        page.wait_for_function("() => document.getElementById('status').textContent === 'ended'", timeout=20_000)
        deadline = time.monotonic() + 20
        while _active_streams(weir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _active_streams(weir) == 0, "the stream's slot was not freed"
        return ttff_s
    finally:
        context.close()


def _blend_and_record(page, stream_id: str) -> None:
    """The blend slider sends weighted prompts live; a recording made from the page downloads as an MP4."""
    page.click("#record")
    page.wait_for_function("() => document.getElementById('recording-status').dataset.state === 'RECORDING_STARTED'",
                           timeout=20_000)
    page.fill("#prompt-b", "a neon city")
    page.fill("#blend-chunks", "2")
    page.locator("#mix").fill("0.25")
    page.locator("#mix").dispatch_event("change")
    page.wait_for_function("() => document.getElementById('applied-prompt').textContent.includes('a neon city (25%)')",
                           timeout=30_000)
    assert page.inner_text("#stream-id") == stream_id
    _wait_frames(page, _frames_drawn(page) + 4)
    page.click("#record")
    page.wait_for_function("() => document.getElementById('recording-status').dataset.state === 'RECORDING_FINISHED'",
                           timeout=30_000)
    assert page.is_visible("#recording-link")
    status, size, head = page.evaluate("""async () => {
        const r = await fetch(document.getElementById('recording-link').href);
        const bytes = new Uint8Array(await r.arrayBuffer());
        return [r.status, bytes.length, String.fromCharCode(...bytes.slice(4, 8))];
    }""")
    assert status == 200 and size > 1000 and head == "ftyp", (status, size, head)


def test_webrtc_stream_styles_the_camera_and_takes_a_live_prompt(browser, weir, clip, artefacts):
    _run_page(browser, weir, clip, artefacts, transport_pref="auto", expect="WebRTC")


def test_websocket_fallback_when_webrtc_is_unavailable(browser, weir, clip, artefacts):
    _run_page(browser, weir, clip, artefacts, transport_pref="auto", expect="WebSocket",
              init_script="delete window.RTCPeerConnection;", blend_and_record=True)


def test_bad_request_is_shown_typed_and_not_retried_on_another_transport(browser, weir):
    context, page, console = _open_page(browser, weir, query=QUERY.replace(f"fps-in={FPS}", "fps-in=500"))
    try:
        page.click("#start")
        page.wait_for_selector("#error:not([hidden])", timeout=20_000)
        assert page.get_attribute("#error", "data-code") == "BAD_REQUEST", console
        assert page.inner_text("#error-text").startswith("Bad request: input_fps=500")
        assert page.inner_text("#transport") == "WebRTC"  # a typed refusal is final: no fallback
        assert page.get_attribute("#status", "data-state") == "failed"
        assert _active_streams(weir) == 0
    finally:
        context.close()
