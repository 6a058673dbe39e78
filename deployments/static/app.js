// Weir's browser client: camera or file in, styled video out, over WebRTC or a WebSocket.
//
// Messages are weir.v1 protobufs in their JSON mapping (see deployments/web_protocol.py):
//   page -> server  {"open": StreamOpen}, {"control": Control}, {"sync": page_us}, binary frames (WebSocket)
//   server -> page  {"opened"}, {"stats"}, {"applied"}, {"error", "http_status"}, {"ended"}, {"sync"},
//                   {"frame": timing} (WebRTC data channel), binary frames (WebSocket)
// Latency is capture -> display on this page's clock; TTFF is Start -> first styled frame drawn.
"use strict";

const $ = (id) => document.getElementById(id);
const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const FRAME_IN_BYTES = 16;   // seq u64, capture_ts_us i64
const FRAME_OUT_BYTES = 32;  // seq, capture_ts_us, received_ts_us, output_ts_us
const CONNECT_TIMEOUT_MS = 10000;

const page = { config: null, session: null, retryTimer: null };

// ---- typed errors -------------------------------------------------------------------------------------

class StreamError extends Error {
  constructor(error, httpStatus) {
    super(error.message || error.code);
    this.code = error.code || "INTERNAL";
    this.retryAfterS = Number(error.retry_after_s || 0);
    this.httpStatus = httpStatus || 0;
  }
}

class TransportError extends Error {}  // the transport failed: the page may try the other one

function showError(err) {
  const box = $("error");
  const retry = $("retry");
  clearInterval(page.retryTimer);
  retry.hidden = true;
  let text;
  if (err instanceof StreamError) {
    box.dataset.code = err.code;
    if (err.code === "ADMISSION_REFUSED") {
      let left = Math.max(1, Math.ceil(err.retryAfterS));
      text = `Refused: no capacity for this stream right now. Retry in ${left} s.`;
      retry.hidden = false;
      retry.disabled = true;
      page.retryTimer = setInterval(() => {
        left -= 1;
        $("error-text").textContent = left > 0
          ? `Refused: no capacity for this stream right now. Retry in ${left} s.`
          : "Refused: no capacity for this stream right now. You may retry now.";
        if (left <= 0) { retry.disabled = false; clearInterval(page.retryTimer); }
      }, 1000);
    } else if (err.code === "UNAUTHENTICATED") {
      text = "Unauthenticated: the API key is missing or not accepted. Enter a valid key and start again.";
    } else if (err.code === "BAD_REQUEST" || err.code === "BAD_FRAME") {
      text = `Bad request: ${err.message}`;
    } else if (err.code === "SLO_UNATTAINABLE") {
      text = `The requested SLO cannot be met: ${err.message}`;
    } else {
      text = `Stream failed (${err.code}): ${err.message}`;
    }
  } else {
    box.dataset.code = "CLIENT";
    text = `Error: ${err.message || err}`;
  }
  $("error-text").textContent = text;
  box.hidden = false;
}

function clearError() {
  clearInterval(page.retryTimer);
  $("error").hidden = true;
  $("error").dataset.code = "";
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text || state;
}

// ---- metrics ------------------------------------------------------------------------------------------

class Metrics {
  constructor(startedMs) {
    this.startedMs = startedMs;
    this.drawn = 0;
    this.drawTimes = [];
    this.latencies = [];
    this.ttffMs = null;
    this.timer = setInterval(() => this.render(), 250);
  }
  frameDrawn(latencyMs) {
    const t = performance.now();
    this.drawn += 1;
    if (this.ttffMs === null) this.ttffMs = t - this.startedMs;
    this.drawTimes.push(t);
    while (this.drawTimes.length && this.drawTimes[0] < t - 2000) this.drawTimes.shift();
    if (latencyMs !== null && latencyMs >= 0) {
      this.latencies.push(latencyMs);
      if (this.latencies.length > 30) this.latencies.shift();
    }
  }
  render() {
    const t = performance.now();
    const recent = this.drawTimes.filter((x) => x >= t - 2000);
    const span = Math.min(2000, t - this.startedMs) / 1000;
    $("fps").textContent = span > 0 ? (recent.length / span).toFixed(1) : "–";
    const sorted = [...this.latencies].sort((a, b) => a - b);
    $("latency").textContent = sorted.length ? `${Math.round(sorted[sorted.length >> 1])} ms` : "–";
    $("ttff").textContent = this.ttffMs === null ? "–" : `${Math.round(this.ttffMs)} ms`;
    $("frames").textContent = String(this.drawn);
  }
  stop() { clearInterval(this.timer); this.render(); }
}

// Offset of the server clock from the page clock, from the sync probe with the shortest round trip.
class ClockSync {
  constructor() { this.offsetUs = 0; this.bestRttUs = Infinity; }
  update(sync) {
    const t1 = nowUs();
    const t0 = Number(sync.t);
    const rtt = t1 - t0;
    if (rtt < this.bestRttUs) {
      this.bestRttUs = rtt;
      this.offsetUs = Number(sync.server_us) - (t0 + t1) / 2;
    }
  }
  toPage(serverUs) { return serverUs - this.offsetUs; }
}

// Matches a displayed WebRTC frame (its RTP timestamp) to its timing message (its pts). The RTP clock
// starts at a random origin; the origin is the one value (rtp - pts) that fits every frame seen.
class RtpMatcher {
  constructor() { this.pending = new Map(); this.origin = null; this.candidates = null; }
  add(timing) {
    this.pending.set(Number(timing.pts), timing);
    if (this.pending.size > 256) this.pending.delete(this.pending.keys().next().value);
  }
  match(rtp) {
    if (this.origin === null) {
      const fits = new Set([...this.pending.keys()].map((pts) => (rtp - pts) >>> 0));
      this.candidates = this.candidates === null ? fits : new Set([...this.candidates].filter((c) => fits.has(c)));
      if (this.candidates.size === 1) this.origin = [...this.candidates][0];
      else if (this.candidates.size === 0) this.candidates = null;
      if (this.origin === null) return null;
    }
    const pts = (rtp - this.origin) >>> 0;
    const timing = this.pending.get(pts) || null;
    if (timing) for (const key of [...this.pending.keys()]) { if (key <= pts) this.pending.delete(key); }
    return timing;
  }
}

// ---- the stream's parameters --------------------------------------------------------------------------

function selectedSize() {
  const [height, width] = $("resolution").value.split("x").map(Number);
  return { height, width };
}

// The prompt part of a StreamOpen or SetPrompt: one prompt, or two mixed by the blend slider.
function promptFields() {
  const a = $("prompt").value;
  const b = $("prompt-b").value.trim();
  if ($("blend").hidden || !b) return { prompt: a };
  const mix = Number($("mix").value);
  return { prompts: [{ prompt: a, weight: 1 - mix }, { prompt: b, weight: mix }], blend: $("blend-mode").value };
}

function describePrompt(p) {
  if (!p.prompts || !p.prompts.length) return p.prompt || "";
  return p.prompts.map((w) => `${w.prompt} (${Math.round(Number(w.weight || 0) * 100)}%)`).join(" + ");
}

function streamOpen() {
  const { height, width } = selectedSize();
  const open = {
    ...promptFields(),
    num_steps: Number($("steps").value),
    noise_strength: Number($("noise").value),
    seed: String(Math.trunc(Number($("seed").value) || 0)),
    height, width,
    input_fps: Number($("fps-in").value),
    api_key: $("api-key").value,
    client_stream_id: `web-${Math.random().toString(36).slice(2, 10)}`,
    slo: { ttff_ms: Number($("ttff-ms").value) || 0, frame_deadline_ms: Number($("deadline-ms").value) || 0 },
  };
  if ($("model").value) open.model = $("model").value;
  return open;
}

async function inputMedia() {
  const video = $("input");
  const { height, width } = selectedSize();
  if ($("source").value === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a video file first");
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
    video.loop = true;
    await video.play();
    return video.captureStream ? video.captureStream() : null;
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    video: { width: { ideal: Math.max(width, 320) }, height: { ideal: Math.max(height, 240) },
             frameRate: { ideal: Math.max(Number($("fps-in").value), 15) } },
    audio: false,
  });
  video.src = "";
  video.srcObject = stream;
  await video.play();
  return stream;
}

// Centre-crop `source` to the canvas's aspect ratio and draw it over the whole canvas.
function drawFitted(ctx, source, sw, sh) {
  const { width: w, height: h } = ctx.canvas;
  if (!sw || !sh) return false;
  let sx = 0, sy = 0, cw = sw, ch = sh;
  if (sw / sh > w / h) { cw = Math.round(sh * w / h); sx = (sw - cw) >> 1; } else { ch = Math.round(sw * h / w); sy = (sh - ch) >> 1; }
  ctx.drawImage(source, sx, sy, cw, ch, 0, 0, w, h);
  return true;
}

// ---- one stream, either transport ---------------------------------------------------------------------

class Session {
  constructor(media, open) {
    this.media = media;
    this.open = open;
    this.streamId = "";
    this.clock = new ClockSync();
    this.metrics = new Metrics(performance.now());
    this.output = $("output");
    this.output.width = open.width;
    this.output.height = open.height;
    this.ctx = this.output.getContext("2d");
    this.ended = null;
    this.endedPromise = new Promise((resolve) => { this.ended = resolve; });
    this.closed = false;
  }

  // A JSON message from the server, whichever transport carried it.
  onJson(msg) {
    if (msg.opened) {
      this.streamId = msg.opened.stream_id;
      $("stream-id").textContent = this.streamId;
    } else if (msg.stats) {
      this.showStats(msg.stats);
    } else if (msg.recording) {
      showRecording(msg.recording);
    } else if (msg.applied) {
      if (msg.applied.set_prompt) {
        $("applied-prompt").textContent = describePrompt(msg.applied.set_prompt);
        $("applied-prompt").dataset.streamId = this.streamId;
      }
      if (msg.applied.set_steps) $("steps").dataset.applied = String(msg.applied.set_steps.num_steps);
    } else if (msg.sync) {
      this.clock.update(msg.sync);
    } else if (msg.error) {
      showError(new StreamError(msg.error, msg.http_status));
      this.finish("failed");
    } else if (msg.ended) {
      if (msg.ended.stats) this.showStats(msg.ended.stats);
      for (const r of msg.ended.recordings || []) showRecording(r);
      this.finish("ended");
    }
  }

  showStats(s) {
    const n = (x) => Number(x || 0);
    $("server-stats").textContent = `in ${n(s.frames_in)} · out ${n(s.frames_out)} · skipped ${n(s.frames_skipped)}`
      + ` · p50 ${n(s.latency_p50_ms).toFixed(0)} ms · TTFF ${n(s.ttff_ms).toFixed(0)} ms`
      + ` · ${n(s.output_fps).toFixed(1)} fps`;
  }

  control(control) { this.sendJson({ control }); }

  finish(how) {
    if (this.closed) return;
    this.closed = true;
    this.metrics.stop();
    this.ended(how);
    this.close();
    setStatus(how === "failed" ? "failed" : "idle", how);
    streamingUi(false);
  }

  async stop() {
    if (this.closed) return;
    this.control({ end: {} });
    await Promise.race([this.endedPromise, new Promise((r) => setTimeout(r, 5000))]);
    this.finish("ended");
  }

  close() { for (const track of this.media ? this.media.getTracks() : []) track.stop(); }
}

class WebSocketSession extends Session {
  async start() {
    const url = new URL("ws", document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new TransportError("the WebSocket did not open"));
    });
    const first = new Promise((resolve, reject) => {
      ws.onmessage = (ev) => {
        const msg = JSON.parse(ev.data);
        if (msg.error) reject(new StreamError(msg.error, msg.http_status));
        else resolve(msg);
      };
      ws.onclose = () => reject(new TransportError("the WebSocket closed before the stream opened"));
    });
    this.sendJson({ open: this.open });
    this.onJson(await first);
    ws.onmessage = (ev) => this.onMessage(ev);
    ws.onclose = (ev) => { if (!this.closed) { if (ev.code !== 1000 && ev.code < 4000) showError(new TransportError(`connection lost (${ev.code})`)); this.finish("ended"); } };
    this.capture = document.createElement("canvas");
    this.capture.width = this.open.width;
    this.capture.height = this.open.height;
    this.seq = 0;
    this.playout = [];
    this.drawTimer = null;
    this.timer = setInterval(() => this.sendFrame(), 1000 / this.open.input_fps);
  }

  sendJson(obj) { if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(obj)); }

  sendFrame() {
    const video = $("input");
    if (this.ws.readyState !== WebSocket.OPEN || this.ws.bufferedAmount > 256 * 1024) return;  // never queue up lag
    const ctx = this.capture.getContext("2d");
    const captureUs = nowUs();
    if (!drawFitted(ctx, video, video.videoWidth, video.videoHeight)) return;
    const seq = this.seq++;
    this.capture.toBlob(async (blob) => {
      if (!blob || this.ws.readyState !== WebSocket.OPEN) return;
      const jpeg = new Uint8Array(await blob.arrayBuffer());
      const buf = new Uint8Array(FRAME_IN_BYTES + jpeg.length);
      const view = new DataView(buf.buffer);
      view.setBigUint64(0, BigInt(seq), true);
      view.setBigInt64(8, BigInt(captureUs), true);
      buf.set(jpeg, FRAME_IN_BYTES);
      this.ws.send(buf);
    }, "image/jpeg", 0.85);
  }

  // Frames come a chunk (4 frames) at a time: decode them as they come, draw them one frame interval
  // apart (a little faster, so a backlog drains), as the server paces its WebRTC track.
  async onMessage(ev) {
    if (typeof ev.data === "string") { this.onJson(JSON.parse(ev.data)); return; }
    const captureUs = Number(new DataView(ev.data).getBigInt64(8, true));
    const bitmap = await createImageBitmap(new Blob([new Uint8Array(ev.data, FRAME_OUT_BYTES)], { type: "image/jpeg" }));
    this.playout.push({ bitmap, captureUs });
    while (this.playout.length > 8) this.playout.shift().bitmap.close();
    if (!this.drawTimer) this.drawNext();
  }

  drawNext() {
    const next = this.playout.shift();
    if (!next || this.closed) { this.drawTimer = null; return; }
    this.ctx.drawImage(next.bitmap, 0, 0, this.output.width, this.output.height);
    next.bitmap.close();
    this.metrics.frameDrawn((nowUs() - next.captureUs) / 1000);
    this.drawTimer = setTimeout(() => this.drawNext(), 900 / this.open.input_fps);
  }

  close() {
    super.close();
    clearInterval(this.timer);
    clearTimeout(this.drawTimer);
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
  }
}

class WebRTCSession extends Session {
  async start() {
    const pc = new RTCPeerConnection({ iceServers: [] });
    this.pc = pc;
    this.matcher = new RtpMatcher();
    this.channel = pc.createDataChannel("weir");
    this.channel.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.frame) this.matcher.add(msg.frame); else this.onJson(msg);
    };
    this.channel.onopen = () => this.startSync();
    const track = this.media && this.media.getVideoTracks()[0];
    if (!track) throw new TransportError("this source gives no video track for WebRTC");
    pc.addTrack(track, this.media);
    const outVideo = $("rtc-output");
    pc.ontrack = (ev) => {
      outVideo.srcObject = new MediaStream([ev.track]);
      outVideo.play().catch(() => {});
      outVideo.requestVideoFrameCallback((now, meta) => this.onVideoFrame(outVideo, now, meta));
    };
    await pc.setLocalDescription(await pc.createOffer());
    await this.iceGathered(pc);
    let response;
    try {
      response = await fetch("offer", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, open: this.open }),
      });
    } catch (e) {
      throw new TransportError(`signalling failed: ${e.message}`);
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      if (body && body.error) throw new StreamError(body.error, response.status);
      throw new TransportError(`signalling failed (HTTP ${response.status})`);
    }
    this.onJson({ opened: body.opened });
    await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
    await this.connected(pc);
    pc.onconnectionstatechange = () => {
      if (["failed", "closed"].includes(pc.connectionState) && !this.closed) {
        showError(new TransportError(`WebRTC connection ${pc.connectionState}`));
        this.finish("failed");
      }
    };
  }

  iceGathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, 3000);  // send what was gathered so far
    });
  }

  connected(pc) {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (pc.connectionState === "connected") resolve();
        else if (["failed", "closed"].includes(pc.connectionState)) reject(new TransportError(`WebRTC ${pc.connectionState}`));
      };
      pc.addEventListener("connectionstatechange", check);
      setTimeout(() => reject(new TransportError("WebRTC did not connect in time")), CONNECT_TIMEOUT_MS);
      check();
    });
  }

  startSync() {
    let probes = 0;
    const probe = () => {
      if (this.closed || this.channel.readyState !== "open") return;
      this.sendJson({ sync: nowUs() });
      probes += 1;
      this.syncTimer = setTimeout(probe, probes < 5 ? 200 : 5000);
    };
    probe();
  }

  onVideoFrame(video, now, meta) {
    if (this.closed) return;
    this.ctx.drawImage(video, 0, 0, this.output.width, this.output.height);
    const timing = meta.rtpTimestamp === undefined ? null : this.matcher.match(meta.rtpTimestamp);
    let latency = null;
    if (timing) {
      const shownUs = (performance.timeOrigin + (meta.expectedDisplayTime || now)) * 1000;
      latency = (shownUs - this.clock.toPage(Number(timing.capture_ts_us))) / 1000;
    }
    this.metrics.frameDrawn(latency);
    video.requestVideoFrameCallback((n, m) => this.onVideoFrame(video, n, m));
  }

  sendJson(obj) { if (this.channel && this.channel.readyState === "open") this.channel.send(JSON.stringify(obj)); }

  close() {
    super.close();
    clearTimeout(this.syncTimer);
    if (this.pc) this.pc.close();
    $("rtc-output").srcObject = null;
  }
}

// ---- recordings (server side) -------------------------------------------------------------------------

function showRecording(r) {
  const status = $("recording-status");
  const link = $("recording-link");
  page.recordingId = r.recording_id;
  status.dataset.state = r.state;
  if (r.state === "RECORDING_STARTED") {
    page.recording = true;
    status.textContent = "recording…";
    link.hidden = true;
  } else if (r.state === "RECORDING_FINISHED") {
    page.recording = false;
    status.textContent = `recorded ${Number(r.frames || 0)} frames (${Math.round(Number(r.bytes || 0) / 1024)} KiB)`;
    link.hidden = false;
    link.href = `recordings/${r.recording_id}`;
  } else if (r.state === "RECORDING_FAILED") {
    page.recording = false;
    status.textContent = `recording failed: ${r.message || "unknown reason"}`;
  }
  $("record").textContent = page.recording ? "Stop recording" : "Record";
}

async function downloadRecording(ev) {
  ev.preventDefault();
  const id = page.recordingId;
  const response = await fetch(`recordings/${id}`, { headers: { "x-api-key": $("api-key").value } });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    showError(body && body.error ? new StreamError(body.error, response.status) : new Error(`HTTP ${response.status}`));
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = `weir-${id}.mp4`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---- the page -----------------------------------------------------------------------------------------

function streamingUi(on) {
  $("start").disabled = on;
  $("stop").disabled = !on;
  $("apply-prompt").disabled = !on;
  $("record").disabled = !on;
  if (!on) { page.recording = false; $("record").textContent = "Record"; }
  for (const id of ["resolution", "noise", "seed", "fps-in", "transport-pref", "source", "file", "api-key", "model",
                    "ttff-ms", "deadline-ms"]) $(id).disabled = on;
}

function webrtcPossible() {
  return Boolean(page.config && page.config.webrtc && window.RTCPeerConnection
                 && window.HTMLVideoElement && HTMLVideoElement.prototype.requestVideoFrameCallback);
}

async function start() {
  clearError();
  streamingUi(true);
  setStatus("connecting", "connecting…");
  const open = streamOpen();
  let media;
  try {
    media = await inputMedia();
  } catch (e) {
    showError(e);
    streamingUi(false);
    setStatus("idle");
    return;
  }
  const pref = $("transport-pref").value;
  const order = pref === "websocket" ? ["websocket"] : pref === "webrtc" ? ["webrtc"]
    : webrtcPossible() ? ["webrtc", "websocket"] : ["websocket"];
  for (const transport of order) {
    const session = transport === "webrtc" ? new WebRTCSession(media, open) : new WebSocketSession(media, open);
    page.session = session;
    $("transport").textContent = transport === "webrtc" ? "WebRTC" : "WebSocket";
    try {
      await session.start();
      setStatus("streaming", `streaming (${$("transport").textContent})`);
      return;
    } catch (e) {
      session.closed = true;
      session.metrics.stop();
      if (session.pc) session.pc.close();
      if (session.ws) session.ws.close();
      if (e instanceof TransportError && transport !== order[order.length - 1]) {
        console.warn(`${transport} failed (${e.message}); falling back`);
        $("transport").dataset.fallback = e.message;
        continue;
      }
      showError(e);
      break;
    }
  }
  for (const track of media ? media.getTracks() : []) track.stop();
  page.session = null;
  streamingUi(false);
  setStatus("failed");
}

async function loadConfig() {
  const response = await fetch("config");
  page.config = await response.json();
  const select = $("resolution");
  for (const p of page.config.presets) {
    const option = document.createElement("option");
    option.value = `${p.height}x${p.width}`;
    option.textContent = p.label;
    select.appendChild(option);
  }
  for (const m of page.config.models) {
    const option = document.createElement("option");
    option.value = option.textContent = m.model;
    $("model").appendChild(option);
  }
  $("blend").hidden = !(page.config.set_prompt_fields || []).includes("prompts");
  $("recording").hidden = !(page.config.control_fields || []).includes("start_recording");
  if (!page.config.webrtc) $("transport-pref").querySelector('[value="webrtc"]').disabled = true;
  $("api-key").placeholder = page.config.auth ? "required" : "not needed on an open server";
}

// Fields may be preset from the URL: ?prompt=...&resolution=64x64&fps-in=4&transport-pref=websocket
function applyQuery() {
  const query = new URLSearchParams(location.search);
  for (const [key, value] of query) {
    const el = $(key);
    if (el && "value" in el && el.type !== "file") el.value = value;
  }
  $("noise-value").textContent = Number($("noise").value).toFixed(2);
  $("mix-value").textContent = `${Math.round(Number($("mix").value) * 100)}%`;
}

function wire() {
  $("start").onclick = start;
  $("retry").onclick = start;
  $("stop").onclick = () => page.session && page.session.stop();
  const applyPrompt = () => {
    if (!page.session || page.session.closed || !$("prompt").value.trim()) return;
    const chunks = $("blend").hidden ? 0 : Number($("blend-chunks").value) || 0;
    page.session.control({ set_prompt: { ...promptFields(), ...(chunks ? { blend_chunks: chunks } : {}) } });
  };
  $("apply-prompt").onclick = applyPrompt;
  $("mix").oninput = () => { $("mix-value").textContent = `${Math.round(Number($("mix").value) * 100)}%`; };
  $("mix").onchange = applyPrompt;  // the blend slider is live
  $("record").onclick = () => page.session && !page.session.closed
    && page.session.control(page.recording ? { stop_recording: {} } : { start_recording: {} });
  $("recording-link").onclick = downloadRecording;
  $("steps").onchange = () => page.session && !page.session.closed
    && page.session.control({ set_steps: { num_steps: Number($("steps").value) } });
  $("noise").oninput = () => { $("noise-value").textContent = Number($("noise").value).toFixed(2); };
  $("source").onchange = () => { $("file").hidden = $("source").value !== "file"; };
}

async function main() {
  wire();
  try {
    await loadConfig();
  } catch (e) {
    showError(new Error(`cannot reach the server (${e.message})`));
  }
  applyQuery();
  $("file").hidden = $("source").value !== "file";
  document.body.dataset.ready = "1";
}

main();
