"""The rolling KV cache's state machine (stages.kv_cache) against a per-row list model of its module
docstring: random streams of calls over several slots at once, sink refreshes firing at random, the
full phase with and without eviction (step by step)."""

from __future__ import annotations

import random

import torch

from stages.kv_cache import BlockKVCache, KVCachePolicy

FP, FRAMES, SINKS, HEADS, DIM = 4, 6, 2, 1, 8
CAP, SINK_TOKENS = FP * FRAMES, FP * SINKS


class RowModel:
    """One slot, as the module docstring tells it, with plain lists."""

    def __init__(self) -> None:
        self.global_end = self.local_end = 0
        self.queue: list[int] = []
        self.sink_k = [torch.zeros(HEADS * DIM) for _ in range(SINKS)]
        self.sink_v = [torch.zeros(HEADS * DIM) for _ in range(SINKS)]
        self.k = torch.zeros(CAP, HEADS * DIM)

    def call(self, c_start: int, k_MX: torch.Tensor, v_MX: torch.Tensor, *, check: bool, evict: bool, thr: float) -> int:
        m = k_MX.shape[0]
        frames = m // FP
        means_k = [k_MX[f * FP:(f + 1) * FP].mean(0) for f in range(frames)]
        means_v = [v_MX[f * FP:(f + 1) * FP].mean(0) for f in range(frames)]
        c_end = c_start + m
        if check and m <= FP:  # 1. the sink check
            avg = [(torch.cosine_similarity(self.sink_k[s], means_k[0], dim=0)
                    + torch.cosine_similarity(self.sink_v[s], means_v[0], dim=0)) / 2 for s in range(SINKS)]
            if min(avg) < thr:
                self.queue.insert(0, (min(range(SINKS), key=lambda s: (avg[s], s)) + 1) * FP)
        full = c_end > CAP or self.local_end >= CAP
        if full:  # 2. the full phase
            tau = self.queue[0]
            if evict:
                self.queue.pop(0)
                if tau > SINK_TOKENS:
                    self.queue.append(tau)
            start, self.local_end = tau - m, CAP
        else:  # 3. the fill phase
            self.local_end += c_end - self.global_end
            start = self.local_end - m
            rolling = c_end + m
            if SINK_TOKENS < rolling <= CAP and (not self.queue or self.queue[-1] != rolling):
                self.queue.append(rolling)
        self.global_end = c_end
        self.k[start:start + m] = k_MX
        for f in range(frames):
            frame = start // FP + f
            if frame < SINKS:
                self.sink_k[frame], self.sink_v[frame] = means_k[f], means_v[f]
        return self.local_end


def test_the_batched_state_machine_matches_the_list_model_row_by_row():
    rng = random.Random(7)
    torch.manual_seed(7)
    slots, thr = 3, 0.3
    cache = BlockKVCache(num_slots=slots, tokens_per_frame=FP, num_heads=HEADS, head_dim=DIM,
                         policy=KVCachePolicy(num_cache_frames=FRAMES, num_sink_frames=SINKS, sink_threshold=thr),
                         device="cpu", dtype=torch.float32)
    rows = [RowModel() for _ in range(slots)]
    starts = [0] * slots
    fired = evicted_late = 0
    for step in range(60):
        chosen = sorted(rng.sample(range(slots), rng.randint(1, slots)))
        frames = 2 if step == 0 else 1
        repeat = rng.random() < 0.3 and step > 0  # a non-last step of a step-by-step frame: same c_start
        evict = not repeat
        k = torch.randn(len(chosen), frames * FP, HEADS, DIM)
        # now and then a frame like the sinks (no refresh), else a random one (the check may fire)
        v = k.clone() if rng.random() < 0.5 else torch.randn_like(k)
        token_starts = [starts[s] - (frames * FP if repeat and starts[s] else 0) for s in chosen]
        lengths = cache.update(torch.tensor(chosen), torch.tensor(token_starts), k, v, evict=evict,
                               all_slots=chosen == list(range(slots)))
        for i, s in enumerate(chosen):
            before = list(rows[s].queue)
            expect = rows[s].call(token_starts[i], k[i].flatten(1), v[i].flatten(1), check=True, evict=evict, thr=thr)
            fired += len(rows[s].queue) > len(before) and rows[s].queue[:1] != before[:1]
            evicted_late += not evict and rows[s].local_end >= CAP
            assert lengths[i].item() == expect, (step, s)
            starts[s] = token_starts[i] + frames * FP
    queues = cache.queue_lists()
    for s, row in enumerate(rows):
        assert queues[s] == row.queue, s
        assert cache.local_end_R[s].item() == row.local_end and cache.global_end_R[s].item() == row.global_end
        assert torch.equal(cache.k_RCND[s].flatten(1), row.k)
        assert torch.allclose(cache.sink_k_RSX[s], torch.stack(row.sink_k))
    assert fired and evicted_late  # both paths were taken
