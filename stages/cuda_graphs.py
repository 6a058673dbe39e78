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
    call 2            capture (nothing runs while capturing, so the stream state is not touched),
                      then copy the inputs in and replay
    calls 3, 4, ...   copy the inputs into the static buffers and replay
A key whose shapes this thread has run before under another stream (its kernels are chosen, its
compiled pieces exist) is captured on its first call instead; should such a capture fail, that rule
is turned off (logged) and the call runs eager, the graphs stay on. No thread captures shapes it has
not run eagerly: its cuBLAS handle and workspace are its own and cannot be created inside a capture.
(A serving engine's worker thread whose first DiT call was the capture of a recycled state's key,
counted in the thread that warmed the engine up, failed with "operation failed due to a previous
error during capture" and, before failures were retried, ran eager from then on; the thread's own
handle is the likely cause.)

A recycled stream state (stages.dit_stage, "Spare states"; a TAEHV stream cache in stages.vae_stage)
keeps its tensors and so its graphs: `rename` moves them from the closed stream's id to the next one's.

Each DiT graph has a private memory pool, as in the serving runs where per-stream DiT graphs were
measured (BENCHMARKS.md); the TAEHV runner below shares one pool among its graphs.

Capture is a rare, synchronising event (the first two ticks of a stream, or after its number of
steps changes); replays never synchronise with the host. Outputs are cloned out of the graph's
static output, so a later replay cannot overwrite a result the caller still holds.

A failed capture runs that call eager (logged, with the reason and where it failed) and the key is
captured again on its next call; after MAX_CAPTURE_FAILURES failures the runner switches to eager for
good: a wrong-but-fast path is never an option, a slow-but-right one always is.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

LOG = logging.getLogger(__name__)

GraphKey = tuple
SPARE_PREFIX = "\x00spare-"
"""Prefix of a spare (recycled) stream state's id while its graphs wait for the next stream: no client
id starts with a NUL, and the stages refuse one that does."""
_THREADS = threading.local()
_THREAD_COUNT = itertools.count()


def _thread_token() -> int:
    """A number unique to the calling thread for the process's life (thread idents are reused)."""
    token = getattr(_THREADS, "token", None)
    if token is None:
        token = _THREADS.token = next(_THREAD_COUNT)
    return token


MAX_CAPTURE_FAILURES = 3
"""Failed captures after which a runner stops capturing (module docstring)."""


class SparePool:
    """Closed streams' states, kept with their CUDA graphs for the next stream of the same geometry
    (stages.dit_stage, "Spare states"; stages.vae_stage, "Spare TAEHV caches").

    `put` moves a closed stream's graphs to a SPARE_PREFIX id and keeps its state under `key` (what a
    stream must match to take it: slots, grid, policy...); beyond `capacity` the oldest spare is freed
    with its graphs, and capacity 0 frees at once. `take` hands the newest spare of a key to a new
    stream, its graphs renamed to the stream. `graphs` is the stage's runner (ShardGraphRunner or
    CallGraphRunner), or None without CUDA graphs. Iterating yields the spare states, oldest first.

    Example: put("a", k, s) then take("b", k) -> s, and the graphs captured for "a" now serve "b".
    """

    def __init__(self, capacity: int, graphs=None) -> None:
        if capacity < 0:
            raise ValueError(f"spare_streams={capacity} must be >= 0")
        self.capacity = capacity
        self.graphs = graphs
        self._spares: list[tuple[str, Any, Any]] = []
        """(spare id, key, state), oldest first."""
        self._ids = itertools.count()
        self.num_recycled = 0
        """States handed to a new stream (stats)."""

    def __len__(self) -> int:
        return len(self._spares)

    def __iter__(self):
        return (state for _, _, state in self._spares)

    def put(self, stream_id: str, key, state) -> None:
        if self.capacity == 0:
            self._forget(stream_id)
            return
        spare_id = f"{SPARE_PREFIX}{next(self._ids)}"
        if self.graphs is not None:
            self.graphs.rename(stream_id, spare_id)
        self._spares.append((spare_id, key, state))
        while len(self._spares) > self.capacity:
            self._forget(self._spares.pop(0)[0])

    def take(self, stream_id: str, key):
        """The newest spare state of `key`, now `stream_id`'s (its graphs renamed), or None."""
        for i in range(len(self._spares) - 1, -1, -1):
            spare_id, spare_key, state = self._spares[i]
            if spare_key == key:
                del self._spares[i]
                if self.graphs is not None:
                    self.graphs.rename(spare_id, stream_id)
                self.num_recycled += 1
                return state
        return None

    def clear(self) -> None:
        """Free every spare state and its graphs."""
        for spare_id, _, _ in self._spares:
            self._forget(spare_id)
        self._spares.clear()

    def _forget(self, stream_id: str) -> None:
        if self.graphs is not None:
            self.graphs.forget(stream_id)


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


class _GraphTable:
    """What both runners share: per-key graphs kept least recently used first, warm-up call counts,
    capture with the sync-debug mode lifted, and what a failed capture does (module docstring)."""

    label = "CUDA graphs"
    shared_pool = False
    """Capture every graph into one memory pool (else each gets a private one)."""

    def __init__(self, device: torch.device | str, *, max_graphs: int, eager_calls: int) -> None:
        if max_graphs < 1 or eager_calls < 1:
            raise ValueError(f"max_graphs={max_graphs} and eager_calls={eager_calls} must be >= 1")
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        self.eager_calls = eager_calls
        self.disabled_reason: str | None = None
        self.num_captures = 0
        self.num_replays = 0
        self.num_capture_failures = 0
        self._graphs: OrderedDict[GraphKey, Any] = OrderedDict()
        self._calls: dict[GraphKey, int] = {}
        self._pool = None
        self._ran: set[tuple] = set()
        """(thread token, key less its stream ids) of every call so far, eager or captured (see _due)."""
        self.warm_first_call = True
        """Capture a key on its first call when this thread has run its shapes (off after a failure)."""

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def disable(self, reason: str) -> None:
        """Switch to eager for good (logged once) and free every graph."""
        if self.disabled_reason is None:
            LOG.warning("%s disabled on %s, running eager: %s", self.label, self.device, reason)
            self.disabled_reason = reason
        self._graphs.clear()
        self._calls.clear()

    def _lookup(self, key: GraphKey):
        """The key's captured entry (now the most recently used), or None after counting this call
        of a key without a graph (see _due)."""
        captured = self._graphs.get(key)
        if captured is not None:
            self._graphs.move_to_end(key)
            return captured
        self._calls[key] = self._calls.get(key, 0) + 1
        return None

    @staticmethod
    def _shapes(key: GraphKey) -> tuple:
        """The key less its stream ids."""
        return key[1:]

    def _due(self, key: GraphKey) -> tuple[bool, bool]:
        """(capture now, on the warm rule) for a key without a graph (module docstring).

        A capture needs its shapes to have run in this thread before, eagerly or captured: a
        thread's cuBLAS handle and workspace are its own and cannot be created inside a capture.
        Then the key is captured after its eager calls, or at its first call (the warm rule). A key's
        eager calls may have run in another thread: a recycled state's graphs and counts move from
        the closed stream to the next (`ShardGraphRunner.rename`). When not due, the caller runs the
        call eagerly, and this thread counts as having run the shapes."""
        thread_shapes = (_thread_token(), self._shapes(key))
        if thread_shapes not in self._ran:
            self._ran.add(thread_shapes)
            return False, False
        counted = self._calls[key] > self.eager_calls
        due = counted or self.warm_first_call
        return due, due and not counted

    def _graph_for(self, key: GraphKey, capture: Callable[[bool], Any]):
        """The key's captured entry: the stored one, or `capture(warm)`'s when it is due; None when the
        caller runs this call eagerly (not due, or the capture failed)."""
        captured = self._lookup(key)
        if captured is None:
            due, warm = self._due(key)
            if due:
                captured = capture(warm)
        return captured

    def _capture_graph(self, what: str, record: Callable[[], torch.Tensor], *, warm: bool = False):
        """(graph, static output) of `record()` captured on this device (into the shared pool when the
        runner has one), or None after a failure (module docstring: a retry, the warm rule turned off,
        or eager for good)."""
        graph = torch.cuda.CUDAGraph()
        sync_mode = torch.cuda.get_sync_debug_mode()
        if self._pool is None and self.shared_pool:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            # capturing synchronises by design (once per key); a caller's sync-debug mode is for the
            # replays, so it is lifted around the capture only
            torch.cuda.set_sync_debug_mode(0)
            with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self._pool,
                                                                 capture_error_mode="thread_local"):
                out = record()
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eager
            # the allocator may still count the failed capture as recording into the pool: later
            # captures get a pool of their own
            self._pool = None
            reason = f"capture of {what} failed: {type(exc).__name__}: {exc}"
            if warm:
                LOG.warning("%s on %s: first-call captures turned off, this call runs eager: %s",
                            self.label, self.device, reason, exc_info=True)
                self.warm_first_call = False
                return None
            self.num_capture_failures += 1
            if self.num_capture_failures >= MAX_CAPTURE_FAILURES:
                self.disable(f"{self.num_capture_failures} failed captures, the last: {reason}")
            else:
                LOG.warning("%s on %s: this call runs eager, the next one captures again: %s",
                            self.label, self.device, reason, exc_info=True)
            return None
        finally:
            torch.cuda.set_sync_debug_mode(sync_mode)
        return graph, out

    def _store(self, key: GraphKey, captured) -> None:
        self._graphs[key] = captured
        self._calls.pop(key, None)
        self.num_captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

    def stats(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "warm_first_call": self.warm_first_call,
            "graphs": self.num_graphs,
            "captures": self.num_captures,
            "capture_failures": self.num_capture_failures,
            "replays": self.num_replays,
        }


class ShardGraphRunner(_GraphTable):
    """Captures and replays `compute(batch, states) -> tensor` per static key.

    Args:
        compute: the shard's capturable step (`DiTShard._compute`).
        device: the CUDA device the shard runs on.
        max_graphs: graphs kept at once; the least recently used is dropped beyond this.
        eager_calls: eager calls of a key before it is captured (>= 1: the warm-up).
        prepare: called with (batch, states) right before a capture, outside it: builds the
            per-stream tensors `compute` would otherwise create lazily on first use (an upload inside
            a capture would be recorded reading a temporary host buffer).
    """

    def __init__(
        self,
        compute: Callable[[Any, list], torch.Tensor],
        device: torch.device,
        *,
        max_graphs: int = 64,
        eager_calls: int = 1,
        prepare: Callable[[Any, list], None] | None = None,
    ) -> None:
        super().__init__(device, max_graphs=max_graphs, eager_calls=eager_calls)
        self.compute = compute
        self.prepare = prepare

    def forget(self, stream_id: str) -> None:
        """Drop every graph (and warm-up count) whose key names `stream_id`."""
        for key in [k for k, g in self._graphs.items() if stream_id in g.stream_ids]:
            del self._graphs[key]
        for key in [k for k in self._calls if stream_id in {sid for sid, _ in k[0]}]:
            del self._calls[key]

    def rename(self, old: str, new: str) -> None:
        """Move the graphs and warm-up counts of stream `old` to `new`, whose state is the same tensors
        (a recycled DiTStreamState). Keys naming `new` already are dropped first."""
        self.forget(new)

        def renamed(key: GraphKey) -> GraphKey:
            return (tuple((new if sid == old else sid, slots) for sid, slots in key[0]), *key[1:])

        graphs = [(renamed(k), replace(g, stream_ids=frozenset(new if s == old else s for s in g.stream_ids))
                   if old in g.stream_ids else g) for k, g in self._graphs.items()]
        self._graphs = OrderedDict(graphs)
        self._calls = {renamed(k): n for k, n in self._calls.items()}

    @staticmethod
    def _shapes(key: GraphKey) -> tuple:
        return (tuple(slots for _, slots in key[0]), *key[1:])

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
        captured = self._graph_for(key, lambda warm: self._capture(key, batch, states, warm=warm))
        if captured is None:
            return None
        captured.noisy_BCFHW.copy_(batch.noisy_latents_BCFHW)
        captured.timesteps_B.copy_(batch.timesteps_B)
        captured.start_frames_B.copy_(batch.start_frames_B)
        if captured.hidden_BLD is not None:
            captured.hidden_BLD.copy_(batch.hidden_BLD)
        captured.graph.replay()
        self.num_replays += 1
        return captured.out.clone()

    def _capture(self, key: GraphKey, batch, states: list, *, warm: bool) -> _Captured | None:
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
        if self.prepare is not None:
            self.prepare(static_batch, states)
        result = self._capture_graph(f"key {key[0]}", lambda: self.compute(static_batch, states), warm=warm)
        if result is None:
            return None
        graph, out = result
        captured = _Captured(graph=graph, out=out, stream_ids=frozenset(sid for sid, _ in key[0]), **static)
        self._store(key, captured)
        return captured


@dataclass
class _CapturedCall:
    """One captured tensor -> tensor call: the graph, its static input and output."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    out: torch.Tensor


class CallGraphRunner(_GraphTable):
    """CUDA graphs of a stream's `fn(x) -> tensor` calls (a VAE stage's steady encode or decode), one per
    (stream, input shape, strides, dtype): eager for the first `eager_calls` calls of a key (none when
    another stream's call of that shape was captured already), captured on the next, replayed from
    then on. Every call is the real one, with the same values.

    `fn` may update the stream's state tensors only in place (their addresses are baked into the
    graph) and must not read tensor values on the host. Host-side bookkeeping in `fn` (a call counter)
    runs once while capturing and never on replays, so the caller keeps it outside or sets it after.

    All graphs share one memory pool: their temporaries are dead between calls and every replay's
    output is cloned out before the next replay, so graphs may reuse each other's temporaries (a TAEHV
    call at 480x832 holds hundreds of MB of them; one pool per stream would multiply that).
    A failed capture is retried, up to MAX_CAPTURE_FAILURES (module docstring).

    Example: run("s", fn, x) three times with one shape: eager, capture + replay, replay.
    """

    label = "CUDA graphs of stream calls"
    shared_pool = True

    def __init__(self, device: torch.device | str, *, max_graphs: int = 64, eager_calls: int = 1) -> None:
        super().__init__(device, max_graphs=max_graphs, eager_calls=eager_calls)

    def forget(self, stream_id: str) -> None:
        """Drop the stream's graphs and warm-up counts (its state tensors are gone or replaced)."""
        for table in (self._graphs, self._calls):
            for key in [k for k in table if k[0] == stream_id]:
                del table[key]

    def rename(self, old: str, new: str) -> None:
        """Move the graphs and warm-up counts of stream `old` to `new`, whose state is the same tensors
        (a recycled VAE stream cache). Keys naming `new` already are dropped first."""
        self.forget(new)
        self._graphs = OrderedDict(((new, *k[1:]) if k[0] == old else k, g) for k, g in self._graphs.items())
        self._calls = {((new, *k[1:]) if k[0] == old else k): n for k, n in self._calls.items()}

    def run(self, stream_id: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn(x), from a graph once this key has been seen `eager_calls` times."""
        if not self.enabled or not x.is_cuda:
            return fn(x)
        key = (stream_id, tuple(x.shape), x.stride(), x.dtype)
        captured = self._graph_for(key, lambda warm: self._capture(key, fn, x, warm=warm))
        if captured is None:
            return fn(x)
        captured.x.copy_(x)
        captured.graph.replay()
        self.num_replays += 1
        return captured.out.clone()

    def _capture(self, key: GraphKey, fn, x: torch.Tensor, *, warm: bool) -> _CapturedCall | None:
        static_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_x.copy_(x)
        result = self._capture_graph(f"stream {key[0]!r}", lambda: fn(static_x), warm=warm)
        if result is None:
            return None
        captured = _CapturedCall(result[0], static_x, result[1])
        self._store(key, captured)
        return captured
