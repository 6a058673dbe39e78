"""CUDA-graph replay of one DiT shard's micro-step, one graph per static key.

A steady-state stream step launches the same thousands of small kernels every tick (30 blocks x
norms, projections, RoPE, cache bookkeeping, attention); replaying them from a CUDA graph removes the
host launch cost, which is what bounds a 1.3B step on an H100. The shard's device work
(`DiTShard._compute`) is written to be capturable: every per-step value is a device tensor of the
micro-batch, cache positions and lengths are computed on the device, no Python branch reads a tensor.

Key and lifetime. A graph bakes in the addresses of everything it touches: the static input buffers
below, the model weights, and the per-stream state tensors (KV caches, eviction rings, prompt K/V).
So the key is the segment list (stream ids and slots, in row order) plus the input shapes, dtypes
and flags; the shard calls `forget(stream_id)` whenever a stream's state tensors are replaced
(open, `set_num_slots`, close), which drops every graph that names the stream. At most
`max_graphs` are kept (least recently used dropped first).

Per key, in call order:
    call 1            eager (the real step; also warms up cuBLAS / SDPA kernel selection)
    call 2            capture into a private memory pool (nothing runs while capturing, so the
                      stream state is not touched), then copy the inputs in and replay
    calls 3, 4, ...   copy the inputs into the static buffers and replay

Capture is a rare, synchronising event (the first two ticks of a stream, or after its number of
steps changes); replays never synchronise with the host. Outputs are cloned out of the graph's
static output, so a later replay cannot overwrite a result the caller still holds.

Any exception while capturing switches the runner to eager for good (logged once, with the
reason): a wrong-but-fast path is never an option, a slow-but-right one always is.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

LOG = logging.getLogger(__name__)

GraphKey = tuple


@dataclass
class _Captured:
    """One captured step: the graph, its static inputs and its static output."""

    graph: torch.cuda.CUDAGraph
    noisy_BCFHW: torch.Tensor
    timesteps_B: torch.Tensor
    start_frames_B: torch.Tensor
    hidden_BLD: torch.Tensor | None
    out: torch.Tensor
    stream_ids: frozenset[str]


class ShardGraphRunner:
    """Captures and replays `compute(batch, states) -> tensor` per static key.

    Args:
        compute: the shard's capturable step (`DiTShard._compute`).
        device: the CUDA device the shard runs on.
        max_graphs: graphs kept at once; the least recently used is dropped beyond this.
        eager_calls: eager calls of a key before it is captured (>= 1: the warm-up).
    """

    def __init__(
        self,
        compute: Callable[[Any, list], torch.Tensor],
        device: torch.device,
        *,
        max_graphs: int = 64,
        eager_calls: int = 1,
    ) -> None:
        if max_graphs < 1 or eager_calls < 1:
            raise ValueError(f"max_graphs={max_graphs} and eager_calls={eager_calls} must be >= 1")
        self.compute = compute
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        self.eager_calls = eager_calls
        self.disabled_reason: str | None = None
        self.num_captures = 0
        self.num_replays = 0
        self._graphs: OrderedDict[GraphKey, _Captured] = OrderedDict()
        self._calls: dict[GraphKey, int] = {}

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def disable(self, reason: str) -> None:
        """Switch to eager for good (logged once) and free every graph."""
        if self.disabled_reason is None:
            LOG.warning("CUDA graphs disabled on %s, running eager: %s", self.device, reason)
            self.disabled_reason = reason
        self._graphs.clear()
        self._calls.clear()

    def forget(self, stream_id: str) -> None:
        """Drop every graph (and warm-up count) whose key names `stream_id`."""
        for key in [k for k, g in self._graphs.items() if stream_id in g.stream_ids]:
            del self._graphs[key]
        for key in [k for k in self._calls if stream_id in {sid for sid, _ in k[0]}]:
            del self._calls[key]

    @staticmethod
    def key(batch) -> GraphKey:
        """Segments, input shapes/dtypes/devices and flags: everything the captured work depends on."""
        def sig(t: torch.Tensor | None):
            return None if t is None else (tuple(t.shape), t.dtype, t.device)

        return (
            tuple((sid, tuple(slots)) for sid, slots in batch.segments),
            sig(batch.noisy_latents_BCFHW),
            sig(batch.timesteps_B),
            sig(batch.start_frames_B),
            sig(batch.hidden_BLD),
            bool(batch.sink_check),
            batch.full_segments,
        )

    def run(self, batch, states: list) -> torch.Tensor | None:
        """The step's output from a graph, or None: the caller then runs `compute` eagerly."""
        if not self.enabled:
            return None
        inputs = (batch.noisy_latents_BCFHW, batch.timesteps_B, batch.start_frames_B, batch.hidden_BLD)
        if any(t is not None and not t.is_cuda for t in inputs):
            return None  # host inputs would need an H2D copy per replay: keep those steps eager
        key = self.key(batch)
        captured = self._graphs.get(key)
        if captured is None:
            calls = self._calls.get(key, 0) + 1
            self._calls[key] = calls
            if calls <= self.eager_calls:
                return None
            captured = self._capture(key, batch, states)
            if captured is None:
                return None
        else:
            self._graphs.move_to_end(key)
        captured.noisy_BCFHW.copy_(batch.noisy_latents_BCFHW)
        captured.timesteps_B.copy_(batch.timesteps_B)
        captured.start_frames_B.copy_(batch.start_frames_B)
        if captured.hidden_BLD is not None:
            captured.hidden_BLD.copy_(batch.hidden_BLD)
        captured.graph.replay()
        self.num_replays += 1
        return captured.out.clone()

    def _capture(self, key: GraphKey, batch, states: list) -> _Captured | None:
        static = dict(
            noisy_BCFHW=batch.noisy_latents_BCFHW.clone(),
            timesteps_B=batch.timesteps_B.clone(),
            start_frames_B=batch.start_frames_B.clone(),
            hidden_BLD=None if batch.hidden_BLD is None else batch.hidden_BLD.clone(),
        )
        static_batch = replace(
            batch,
            noisy_latents_BCFHW=static["noisy_BCFHW"],
            timesteps_B=static["timesteps_B"],
            start_frames_B=static["start_frames_B"],
            hidden_BLD=static["hidden_BLD"],
            x0_BCFHW=None,
        )
        graph = torch.cuda.CUDAGraph()
        sync_mode = torch.cuda.get_sync_debug_mode()
        try:
            # capturing synchronises by design (once per key); a caller's sync-debug mode is for the
            # replays, so it is lifted around the capture only
            torch.cuda.set_sync_debug_mode(0)
            with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.compute(static_batch, states)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eager
            self.disable(f"capture of key {key[0]} failed: {type(exc).__name__}: {exc}")
            return None
        finally:
            torch.cuda.set_sync_debug_mode(sync_mode)
        captured = _Captured(graph=graph, out=out, stream_ids=frozenset(sid for sid, _ in key[0]), **static)
        self._graphs[key] = captured
        self._calls.pop(key, None)
        self.num_captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return captured

    def stats(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "graphs": self.num_graphs,
            "captures": self.num_captures,
            "replays": self.num_replays,
        }
