"""The single-stream ring (W interleaved stream-batch chains): the chains' bookkeeping in
StreamBatchState, which input chunk the engine emits at which tick, the ring's defaults and bounds,
and the pipeline bench's ring rows on the CPU (the workers chained in this process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cluster.graph import ChainExecutor
from cluster.plan import build_plan
from cluster.video import generated_clip
from deployments.config import PipelineSpec
from stages.config import StreamConfig
from stages.engine import EngineSpec, StreamEngine, StreamParams, exit_lag
from stages.errors import BadRequestError
from stages.flow_match import FlowMatchSchedule
from stages.stream_batch import StreamBatchState

H, W = 32, 48


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return StreamEngine(EngineSpec(model="tiny"))


def _ticks(engine, sid, clip, **params):
    """Push the clip; per tick (push that completed a chunk, the prefill excluded) the seqs it
    returned; then the seqs the flush returned, and every output frame."""
    engine.open_stream(sid, StreamParams(prompt="a cat", height=H, width=W, **params))
    per_tick, frames = [], []
    for seq, f in enumerate(clip):
        out = engine.push_frame(sid, seq, f)
        frames += out
        if seq > 0 and seq % 4 == 0:
            per_tick.append([o.seq for o in out])
    flushed = engine.flush(sid)
    engine.close_stream(sid)
    return per_tick, [o.seq for o in flushed], frames + flushed


def test_each_chain_continues_its_own_buffer():
    """W = 2, n = 2: tick k runs on chain k mod 2, its slot 1 holds the re-noised x0 of tick k - 2's
    slot 0, positions advance per tick, and the first emission is tick 0's chunk, at tick 2."""
    schedule = FlowMatchSchedule()
    state = StreamBatchState(
        "s", stream_cfg=StreamConfig(), num_steps=2, latent_hw=(2, 2), noise=lambda shape: torch.zeros(shape),
        schedule=schedule, device=torch.device("cpu"), dtype=torch.float32, in_channels=1, chains=2,
    )
    state.reset(next_frame=1)
    given_x0, slot1_in, emitted = [], [], []
    for k in range(5):
        assert state.next_chain == k % 2
        tick = state.begin_tick(torch.full((1, 1, 1, 2, 2), 100.0 + k), current_step=None)
        assert state.chain == k % 2 and tick.slots == (0, 1)
        assert tick.start_frames == [1 + k, 1 if k < 2 else k - 1]  # slot 1: the chunk of tick k - 2
        slot1_in.append(tick.noisy_latents_BCFHW[1].clone())
        x0 = torch.randn(2, 1, 1, 2, 2)
        given_x0.append(x0)
        emitted.append(state.end_tick(tick.slots, x0))
    assert emitted[0] is None and emitted[1] is None  # each chain's warm-up
    renoise_t = torch.tensor([500])
    for k in (2, 3, 4):
        expected = schedule.add_noise(given_x0[k - 2][:1], torch.zeros(1, 1, 1, 2, 2), renoise_t)[0]
        assert torch.equal(slot1_in[k], expected), f"tick {k} did not continue tick {k - 2}'s chain"
        assert torch.equal(emitted[k], given_x0[k][1:])
    # a buffer kept elsewhere (the pipeline's driver) replaces the chain's own
    kept = torch.full((2, 1, 1, 2, 2), 7.0)
    tick = state.begin_tick(None, None, kept)
    assert state.chain == 1 and tick.slots == (1,) and torch.equal(tick.noisy_latents_BCFHW, kept[1:])


@pytest.mark.parametrize("chains, steps", [(2, 2), (3, 2), (2, 3)])
def test_engine_emits_each_chunk_exit_lag_ticks_later_in_order(engine, chains, steps):
    clip = list(generated_clip(1 + 4 * 6, H, W, seed=1))
    per_tick, flushed, frames = _ticks(engine, f"r{chains}{steps}", clip, num_steps=steps, chains=chains)
    lag = exit_lag(steps, chains)
    chunk = [list(range(1 + 4 * j, 5 + 4 * j)) for j in range(6)]
    assert per_tick == [chunk[k - lag] if k >= lag else [] for k in range(6)]
    assert flushed == [seq for j in range(max(0, 6 - lag), 6) for seq in chunk[j]]
    assert [f.seq for f in frames] == list(range(len(clip)))


def test_one_step_ring_equals_one_chain_and_one_chain_is_unchanged(engine):
    """At n = 1 no tick reads another's buffer: any W gives the same frames. At n = 2, W = 2 changes
    the result (another schedule), and chains=1 equals leaving chains unset."""
    clip = list(generated_clip(13, H, W, seed=2))
    runs = {(c, n): _ticks(engine, f"i{c}{n}", clip, num_steps=n, chains=c)[2]
            for c, n in ((1, 1), (2, 1), (1, 2), (2, 2))}
    unset = _ticks(engine, "unset", clip, num_steps=2)[2]
    same = lambda a, b: all(np.array_equal(x.frame, y.frame) for x, y in zip(a, b, strict=True))  # noqa: E731
    assert same(runs[1, 1], runs[2, 1])
    assert same(runs[1, 2], unset)
    assert not same(runs[1, 2], runs[2, 2])


@pytest.mark.parametrize("chains", [0, 17])
def test_bad_chains_are_refused_and_cost_other_streams_nothing(engine, chains):
    clip = list(generated_clip(5, H, W, seed=3))
    engine.open_stream("ok", StreamParams(prompt="a cat", height=H, width=W, num_steps=1))
    first = engine.push_frame("ok", 0, clip[0])
    with pytest.raises(BadRequestError) as info:
        engine.open_stream("bad", StreamParams(prompt="a cat", height=H, width=W, chains=chains))
    assert info.value.details["field"] == "chains" and not engine.has_stream("bad")
    out = [engine.push_frame("ok", i, clip[i]) for i in range(1, 5)]
    engine.close_stream("ok")
    assert [f.seq for f in first] == [0] and [f.seq for f in out[-1]] == [1, 2, 3, 4]


def test_ring_defaults_and_config():
    gpu2, gpu1, cpu2 = (build_plan(n, model="tiny", device=d) for n, d in ((2, "cuda"), (1, "cuda"), (2, "cpu")))
    assert ChainExecutor(gpu2, chain=None).default_chains == 2  # on for GPU plans of several shards
    assert ChainExecutor(gpu2, chain=None, ring=False).default_chains == 1
    assert ChainExecutor(gpu1, chain=None).default_chains == 1
    assert ChainExecutor(cpu2, chain=None).default_chains == 1
    assert ChainExecutor(cpu2, chain=None, ring=True).default_chains == 2
    assert PipelineSpec(ring=True, executor="graph").ring
    with pytest.raises(ValueError, match="ring=True needs executor='graph'"):
        PipelineSpec(ring=True)  # a CPU spec resolves to the in-process engine


def test_pipeline_bench_reports_ring_and_single_stream_fps_on_cpu(tmp_path):
    from cluster import pipeline_bench

    out = tmp_path / "bench.json"
    code = pipeline_bench.main([
        "--no-ray", "--device", "cpu", "--model", "tiny", "--gpus", "2", "--resolution", f"{H}x{W}",
        "--steps", "2", "--streams", "1", "--chunks", "2", "--warmup-chunks", "2", "--json", str(out),
    ])
    assert code == 0
    data = json.loads(out.read_text())
    rows = {r["load"]: r for r in data["rows"]}
    assert set(rows) == {"streams", "single", "ring"}
    assert (rows["ring"]["chains"], rows["ring"]["peak_in_flight"]) == (2, 2)
    assert (rows["single"]["chains"], rows["single"]["peak_in_flight"]) == (1, 1)
    assert all(r["frames_out"] > 0 and r["fps"] > 0 for r in rows.values())
    assert set(data["single_stream_fps"]["2"]) == {"single", "ring"}
