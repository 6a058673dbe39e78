"""When a CUDA-graph runner captures a key: the pure bookkeeping of stages.cuda_graphs, no GPU needed."""

from __future__ import annotations

import threading

from stages.cuda_graphs import _GraphTable


def _call(table: _GraphTable, key) -> tuple[bool, bool]:
    """One call of `key` as the runners make it: count it, then ask whether it is captured now."""
    assert table._lookup(key) is None
    return table._due(key)


def _in_thread(fn):
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def test_a_key_is_captured_after_its_eager_call_and_a_warm_shape_at_once():
    table = _GraphTable("cpu", max_graphs=8, eager_calls=1)
    a, b = ("a", (4, 16)), ("b", (4, 16))  # two streams' keys of one shape (key[1:] is the shape)
    assert _call(table, a) == (False, False)  # first call: eager
    assert _call(table, a) == (True, False)  # second: captured, by the count
    table._store(a, object())
    assert _call(table, b) == (True, True)  # this thread ran the shape: b is captured at its first call
    table.warm_first_call = False  # after a failed first-call capture
    c = ("c", (4, 16))
    assert _call(table, c) == (False, False) and _call(table, c) == (True, False)


def test_no_thread_captures_a_shape_it_has_not_run():
    """A recycled state's key arrives with its eager calls counted in another thread (the engine's
    warm-up): the serving thread still runs it eagerly first, since its own cuBLAS handle cannot be
    created inside a capture."""
    table = _GraphTable("cpu", max_graphs=8, eager_calls=1)
    key = ("s", (4, 16))
    assert _call(table, key) == (False, False)  # counted in this thread
    assert _in_thread(lambda: _call(table, key)) == (False, False)  # counted twice, but a new thread
    assert _in_thread(lambda: (_call(table, key), _call(table, key))) == ((False, False), (True, False))
    assert _call(table, key) == (True, False)  # this thread has run it: the count decides
