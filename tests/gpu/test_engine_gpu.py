"""GPU checks of the fast DiT path: CUDA-graph replay == eager, bf16 close to fp32, no host syncs.

Every test builds its shards from seeded random weights (`build_dit_shard`), so two shards of one
seed hold the same weights; streams are fed the same latents and the same re-noising noise.
"""

from __future__ import annotations

import threading

import pytest
import torch

from cluster.precision_bench import compare, precision_rows
from stages.config import DIT_PRESETS, StreamConfig
from stages.fused import EAGER_OPS, compiled_ops
from stages.loading import build_dit_shard
from stages.stream_batch import LatentStreamer

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


def _streamer(model: str, *, cuda_graphs: bool, dtype=torch.bfloat16, compile_ops: bool = True) -> LatentStreamer:
    shard = build_dit_shard(DIT_PRESETS[model], None, device=DEVICE, dtype=dtype, seed=0, cuda_graphs=cuda_graphs)
    if compile_ops != shard.ops.compiled:  # the same ops on both sides of a graph-vs-eager comparison
        shard.ops = compiled_ops() if compile_ops else EAGER_OPS
        shard.model.use_ops(shard.ops)
    return LatentStreamer([shard])


def _open(streamer: LatentStreamer, sid: str, *, height: int, width: int, num_steps: int, seed: int) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def noise(shape):
        return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(streamer.dtype)

    cfg = streamer.shards[0].cfg
    streamer.open(sid, height=height, width=width, stream_cfg=StreamConfig(num_steps=num_steps), noise=noise)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed))
    streamer.set_prompt_context(sid, text.to(DEVICE, streamer.dtype))


def _latents(cfg, height: int, width: int, count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(1, cfg.in_dim, 1, height // 8, width // 8, generator=gen, device=DEVICE).to(torch.bfloat16)
            for _ in range(count)]


def _run(streamer: LatentStreamer, latents: list[torch.Tensor], *, height: int, width: int, num_steps: int,
         two_streams: bool = False) -> list[torch.Tensor]:
    sids = ["a", "b"] if two_streams else ["a"]
    for k, sid in enumerate(sids):
        _open(streamer, sid, height=height, width=width, num_steps=num_steps, seed=10 + k)
    outs = [streamer.prefill(sid, latents[0]).float() for sid in sids]
    for i, z in enumerate(latents[1:]):
        steps = [(sid, z, 600 + 10 * (i % 3) if k == 0 else None) for k, sid in enumerate(sids)]
        outs.extend(x.float() for x in streamer.step(steps) if x is not None)
    for _ in range(num_steps - 1):  # drain: partial-slot steps (eager or their own graphs)
        outs.extend(x.float() for x in streamer.step([(sid, None, None) for sid in sids]) if x is not None)
    torch.cuda.synchronize()
    return outs


@pytest.mark.parametrize(
    "model,height,width,num_steps,two_streams",
    [
        ("tiny", 128, 192, 1, False),
        ("tiny", 128, 192, 3, True),
        ("wan-1.3b", 256, 256, 2, False),
        ("wan-1.3b", 256, 256, 1, True),
    ],
)
def test_cuda_graph_path_equals_eager(model, height, width, num_steps, two_streams):
    cfg = DIT_PRESETS[model]
    latents = _latents(cfg, height, width, 9, seed=1)
    eager = _run(_streamer(model, cuda_graphs=False), latents, height=height, width=width,
                 num_steps=num_steps, two_streams=two_streams)
    graphed_streamer = _streamer(model, cuda_graphs=True)
    graphed = _run(graphed_streamer, latents, height=height, width=width, num_steps=num_steps,
                   two_streams=two_streams)
    stats = graphed_streamer.shards[0].graphs.stats()
    print(f"{model} {height}x{width} n={num_steps} two_streams={two_streams}: graphs {stats}")
    assert stats["enabled"], stats["disabled_reason"]
    assert stats["replays"] > 0, stats
    # graphs are keyed by one stream each, even when two streams step together
    assert all(len(key[0]) == 1 for key in graphed_streamer.shards[0].graphs._graphs)
    rel_l2, rel_max = compare(graphed, eager)
    exact = all(torch.equal(a, b) for a, b in zip(graphed, eager))
    print(f"graph vs eager: rel_l2={rel_l2:.2e} rel_max={rel_max:.2e} bit-identical={exact}")
    # One stream: the same kernels on the same shapes, bit-identical in practice. Two streams: the
    # eager side runs both streams' rows in one forward, the graphs one stream each, so the fused
    # pieces' kernels see other batch sizes and round differently in bf16 (measured on an H200: rel_l2
    # 1.7e-3 to 2.4e-3, rel_max <= 3.7e-3 for the tiny 3-step case; rel_l2 6.2e-3, rel_max 7.1e-3 for
    # the 1.3B one, 30 blocks deep); a capture or replay bug (a stale input, another stream's cache)
    # shows as errors of order 1.
    assert rel_l2 <= (1e-2 if two_streams else 1e-3) and rel_max <= 1e-2


def _one_stream(streamer: LatentStreamer, sid: str, latents, *, height: int, width: int, num_steps: int):
    _open(streamer, sid, height=height, width=width, num_steps=num_steps, seed=10)
    outs = [streamer.prefill(sid, latents[0]).float()]
    for i, z in enumerate(latents[1:]):
        x = streamer.step([(sid, z, 600 + 10 * (i % 3))])[0]
        if x is not None:
            outs.append(x.float())
    torch.cuda.synchronize()
    return outs


@pytest.mark.parametrize("num_steps", [1, 2])
def test_spare_state_replays_its_graphs_and_a_warm_shape_captures_at_once(num_steps):
    """A stream opened on a closed stream's state replays that stream's graphs (no capture, no eager
    call) and computes what eager does; a stream on a fresh state of a captured shape is captured on
    its first call of each key, with the same result."""
    model, height, width = "wan-1.3b", 256, 256
    cfg = DIT_PRESETS[model]
    latents = _latents(cfg, height, width, 10, seed=1)  # 9 steady chunks: past the fill phase
    eager = _one_stream(_streamer(model, cuda_graphs=False), "e", latents, height=height, width=width,
                        num_steps=num_steps)
    streamer = _streamer(model, cuda_graphs=True)
    shard, graphs = streamer.shards[0], streamer.shards[0].graphs
    eager_calls = []
    compute = shard._compute  # the graph runner holds its own reference: this counts eager calls only
    shard._compute = lambda batch, states: eager_calls.append(batch.segments) or compute(batch, states)
    first = _one_stream(streamer, "a", latents, height=height, width=width, num_steps=num_steps)
    streamer.close("a")
    captures, eager_a = graphs.num_captures, len(eager_calls)
    assert len(shard.spares) == 1 and eager_a >= 2
    recycled = _one_stream(streamer, "b", latents, height=height, width=width, num_steps=num_steps)
    assert shard.spares.num_recycled == 1 and len(eager_calls) == eager_a, eager_calls[eager_a:]
    # every key replays a's graphs; a one-step prefill ran once on a (eager), so b captures it
    assert graphs.num_captures - captures == (num_steps == 1), graphs.stats()
    keys_b = sum("b" in g.stream_ids for g in graphs._graphs.values())
    captures = graphs.num_captures
    fresh = _one_stream(streamer, "c", latents, height=height, width=width, num_steps=num_steps)
    stats = graphs.stats()
    print(f"n={num_steps}: graphs {stats}, keys of one stream {keys_b}, eager calls of a {eager_a}")
    assert stats["enabled"] and stats["warm_first_call"], stats
    assert len(eager_calls) == eager_a and graphs.num_captures - captures == keys_b  # c: captured at first call
    # another thread (a serving engine's worker), on c's state, whose keys have their eager calls
    # counted already (in this thread): cuBLAS handles are per thread and cannot be created inside a
    # capture, so the new thread's first call of each shape runs eager and the graphs stay on
    streamer.close("c")
    in_thread: dict[str, list] = {}
    worker = threading.Thread(target=lambda: in_thread.setdefault(
        "d", _one_stream(streamer, "d", latents, height=height, width=width, num_steps=num_steps)))
    worker.start()
    worker.join()
    stats = graphs.stats()
    assert shard.spares.num_recycled == 2
    assert stats["enabled"] and stats["warm_first_call"] and stats["capture_failures"] == 0, stats
    fresh_thread = in_thread["d"]
    for name, outs in (("a", first), ("b on a's state", recycled), ("c captured at once", fresh),
                       ("d on c's state in another thread", fresh_thread)):
        rel_l2, rel_max = compare(outs, eager)
        print(f"{name} vs eager: rel_l2={rel_l2:.2e} rel_max={rel_max:.2e}")
        assert rel_l2 <= 1e-3 and rel_max <= 1e-2, name


@pytest.mark.parametrize("num_steps", [1, 3])
def test_compiled_ops_match_eager_ops(num_steps):
    """The torch.compile'd block pieces and cache bookkeeping compute what the eager ones do: the same
    eviction bookkeeping exactly, and outputs within bf16 rounding."""
    model, height, width = "wan-1.3b", 256, 256
    latents = _latents(DIT_PRESETS[model], height, width, 12, seed=4)
    runs = {}
    for compile_ops in (False, True):
        streamer = _streamer(model, cuda_graphs=True, compile_ops=compile_ops)
        runs[compile_ops] = (_run(streamer, latents, height=height, width=width, num_steps=num_steps),
                             streamer.shards[0].state("a"))
    (eager, eager_state), (compiled, compiled_state) = runs[False], runs[True]
    for i, cache in eager_state.kv.items():
        other = compiled_state.kv[i]
        for name in ("global_end_R", "local_end_R", "queue_head_R", "queue_len_R"):
            assert torch.equal(getattr(cache, name), getattr(other, name)), (i, name)
    rel_l2, rel_max = compare(compiled, eager)
    print(f"compiled vs eager ops n={num_steps}: rel_l2={rel_l2:.2e} rel_max={rel_max:.2e}")
    assert rel_l2 <= 1e-2


@pytest.mark.parametrize("num_steps", [1, 2])
def test_bf16_within_1e2_of_fp32_at_480x832(num_steps):
    rows = precision_rows(model_name="wan-1.3b", resolutions=[(480, 832)], steps=[num_steps], chunks=3,
                          device="cuda")
    row = rows[0]
    print(f"bf16 vs fp32 480x832 n={num_steps}: rel_l2={row['rel_l2']:.2e} rel_max={row['rel_max']:.2e} "
          f"graphs={row['cuda_graphs']}")
    assert row["rel_l2"] <= 1e-2, row


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_stream_step_has_no_host_sync(cuda_graphs):
    """20 steady-state chunks of a 1.3B stream (480x832, 2 steps) under sync-debug 'error'."""
    model, height, width, n = "wan-1.3b", 480, 832, 2
    cfg = DIT_PRESETS[model]
    streamer = _streamer(model, cuda_graphs=cuda_graphs)
    latents = _latents(cfg, height, width, 1 + 4 + 20, seed=2)
    _open(streamer, "s", height=height, width=width, num_steps=n, seed=3)
    streamer.prefill("s", latents[0])
    for z in latents[1:5]:  # warm-up: first-use uploads, cuBLAS/SDPA selection, graph capture
        streamer.step([("s", z, 650)])
    torch.cuda.synchronize()
    emitted = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for z in latents[5:]:
            out = streamer.step([("s", z, 650)])[0]
            emitted += out is not None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert emitted == 20
    graphs = streamer.shards[0].graphs
    if cuda_graphs:
        assert graphs is not None and graphs.enabled, graphs.disabled_reason if graphs else "no runner"
        assert graphs.num_replays >= 20


def _taehv_stages() -> dict[bool, tuple]:
    """{cuda_graphs: (encode stage, decode stage)} over one fp16 TAEHV, eager and graphed."""
    from stages.taehv import TAEHV, TAEHVConfig
    from stages.vae_stage import VAEDecodeStage, VAEEncodeStage

    torch.manual_seed(0)
    model = TAEHV(TAEHVConfig()).to(DEVICE, torch.float16)
    model.use_channels_last()
    return {g: (VAEEncodeStage("taehv", model, DEVICE, torch.float16, cuda_graphs=g),
                VAEDecodeStage("taehv", model, DEVICE, torch.float16, cuda_graphs=g)) for g in (False, True)}


def _two_streams_through(stages: dict, chunks: list, second=lambda x: x) -> dict:
    """{cuda_graphs: [(latents, frames) per chunk and stream]}: streams "a" and "b" interleaved chunk
    by chunk through each (encode, decode) stage pair; "b" gets second(chunk)."""
    outs = {}
    for g, (enc, dec) in stages.items():
        for sid in ("a", "b"):
            enc.open_stream(sid)
            dec.open_stream(sid)
        outs[g] = []
        for x in chunks:
            for sid in ("a", "b"):
                z = enc.encode(sid, x if sid == "a" else second(x))
                outs[g].append((z.clone(), dec.decode(sid, z).clone()))
        torch.cuda.synchronize()
    return outs


def test_taehv_stage_graphs_equal_eager_over_a_stream():
    """The TAEHV stages' CUDA graphs (steady calls) give the eager calls' values, chunk after chunk,
    and a second stream captured after the first does not disturb it (the graphs share one pool)."""
    stages = _taehv_stages()
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    chunks = [torch.rand(1, 3, 1 if i == 0 else 4, 96, 160, generator=gen, device=DEVICE) * 2 - 1 for i in range(7)]
    outs = _two_streams_through(stages, chunks)
    enc, dec = stages[True]
    assert enc.graphs.num_replays > 0 and dec.graphs.num_replays > 0 and enc.graphs.enabled
    for eager, graphed in zip(outs[False], outs[True]):
        assert torch.equal(eager[0], graphed[0]) and torch.equal(eager[1], graphed[1])


def test_a_spare_taehv_cache_replays_the_closed_streams_graphs():
    """A TAEHV stream opened after another closed takes its zeroed cache and replays its graphs: no
    capture, and the eager stage's values for a fresh stream."""
    stages = _taehv_stages()
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    clips = {sid: [torch.rand(1, 3, 1 if i == 0 else 4, 96, 160, generator=gen, device=DEVICE) * 2 - 1
                   for i in range(5)] for sid in ("a", "b")}

    def run(g, sid):
        enc, dec = stages[g]
        enc.open_stream(sid)
        dec.open_stream(sid)
        out = [dec.decode(sid, enc.encode(sid, x)).clone() for x in clips[sid]]
        enc.close_stream(sid)
        dec.close_stream(sid)
        torch.cuda.synchronize()
        return out

    run(True, "a")
    enc, dec = stages[True]
    captures = (enc.graphs.num_captures, dec.graphs.num_captures)
    assert captures[0] > 0 and len(enc.spares) == 1 and len(dec.spares) == 1
    got = run(True, "b")
    assert (enc.graphs.num_captures, dec.graphs.num_captures) == captures
    assert enc.spares.num_recycled == 1 and dec.spares.num_recycled == 1 and enc.graphs.enabled and dec.graphs.enabled
    expected = run(False, "b")
    assert all(torch.equal(x, y) for x, y in zip(got, expected))


def test_wan_vae_gpu_path_matches_the_plain_path():
    """The Wan VAE as the engine runs it on CUDA (channels-last-3d, compiled pieces with the biases
    folded, the residual blocks' convs over each stream's windows) against the plain eager path,
    both fp32 with the full layout's weights: two streams interleaved, three chunks each."""
    import copy

    from stages.config import VAE_PRESETS
    from stages.fused import channels_last_weights_
    from stages.vae_stage import VAEDecodeStage, VAEEncodeStage
    from stages.wan_vae import WanVAE

    torch.manual_seed(0)
    plain = WanVAE(VAE_PRESETS["wan"]).eval()
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
    fast = channels_last_weights_(copy.deepcopy(plain))
    fast.use_compiled_ops()
    stages = {}
    for label, model in (("plain", plain), ("fast", fast)):
        stages[label] = (VAEEncodeStage("wan", model, DEVICE, torch.float32),
                         VAEDecodeStage("wan", model, DEVICE, torch.float32))
        for sid in ("a", "b"):
            for stage in stages[label]:
                stage.open_stream(sid)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    videos = {sid: torch.rand(1, 3, 9, 64, 96, device=DEVICE, generator=gen) * 2 - 1 for sid in ("a", "b")}
    for i, j in ((0, 1), (1, 5), (5, 9)):
        for sid, video in videos.items():
            outs = {}
            for label, (enc, dec) in stages.items():
                frames_BCTHW = video[:, :, i:j]
                if label == "fast":
                    frames_BCTHW = frames_BCTHW.contiguous(memory_format=torch.channels_last_3d)
                z = enc.encode(sid, frames_BCTHW)
                outs[label] = (z, dec.decode(sid, z))
            for got, want in zip(outs["fast"], outs["plain"]):
                rel_l2, _ = compare([got], [want])
                assert rel_l2 <= 5e-3, (sid, i, rel_l2)


def test_wan_vae_stage_graphs_equal_eager_over_a_stream():
    """The Wan VAE stages' CUDA graphs (a stream's calls from its fourth on) give the eager calls'
    values, chunk after chunk, for two interleaved streams, each with its own conv windows, sharing one
    graph pool; closing a stream drops its graphs."""
    from stages.config import VAE_PRESETS
    from stages.fused import channels_last_weights_
    from stages.vae_stage import VAEDecodeStage, VAEEncodeStage
    from stages.wan_vae import WanVAE

    torch.manual_seed(0)
    model = channels_last_weights_(WanVAE(VAE_PRESETS["wan"]).eval()).to(DEVICE, torch.bfloat16)
    model.use_compiled_ops()
    stages = {g: (VAEEncodeStage("wan", model, DEVICE, torch.bfloat16, cuda_graphs=g),
                  VAEDecodeStage("wan", model, DEVICE, torch.bfloat16, cuda_graphs=g)) for g in (False, True)}
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    chunks = [(torch.rand(1, 3, 1 if i == 0 else 4, 64, 96, generator=gen, device=DEVICE) * 2 - 1)
              .contiguous(memory_format=torch.channels_last_3d) for i in range(7)]
    outs = _two_streams_through(stages, chunks, lambda x: x.flip(-1))
    enc, dec = stages[True]
    stats = (enc.graphs.stats(), dec.graphs.stats())
    assert enc.graphs.enabled and dec.graphs.enabled, stats
    # from each stream's 4th call: "a" runs its first eager (new shapes in this thread), captures its
    # 5th; "b" captures its 4th (shapes warm); every capture is replayed at once
    assert enc.graphs.num_captures == dec.graphs.num_captures == 2, stats
    assert enc.graphs.num_replays == dec.graphs.num_replays == 3 + 4, stats
    for i, (eager, graphed) in enumerate(zip(outs[False], outs[True])):
        for want, got in zip(eager, graphed):
            assert torch.equal(want, got), (i, compare([got], [want]))
    enc.close_stream("a")
    assert enc.graphs.num_graphs == 1
