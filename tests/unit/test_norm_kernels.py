"""The DiT norm pieces' Triton kernels (stages.triton_norms) on CPU, through Triton's interpreter, and
the dispatch in stages.fused that falls back to the compiled pieces where the kernels cannot run.
The same kernels on a GPU: tests/gpu/test_triton_norms.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from stages import fused
from stages import triton_norms as tn

CHECK = textwrap.dedent("""
    import torch
    from stages import fused, triton_norms as tn
    torch.manual_seed(0)
    B, F, Fp, D = 2, 2, 3, 40  # ragged width; the per-frame vectors switch at token 3
    x, y = torch.randn(B, F * Fp, D), torch.randn(B, F * Fp, D)
    mod = torch.randn(B, F, 6, D)
    shift, scale, gate = mod[:, :, 0:1], mod[:, :, 1:2], mod[:, :, 2:3]
    w, b = torch.randn(D), torch.randn(D)
    pairs = [(tn.modulate(x, shift, scale, 1e-6), fused.modulate(x, shift, scale, 1e-6))]
    pairs += zip(tn.gated_residual_norm(x, y, gate, w, b, 1e-6), fused.gated_residual_norm(x, y, gate, w, b, 1e-6))
    pairs += zip(tn.residual_modulate(x, y, shift, scale, 1e-6), fused.residual_modulate(x, y, shift, scale, 1e-6))
    N, Dh = 5, 8  # RMSNorm + RoPE over 5 heads of 4 pairs; cos/sin per row, or one for every row
    q = torch.randn(B, F * Fp, N * Dh)
    wq = torch.randn(N * Dh)
    for rows in (B, 1):
        cos, sin = torch.randn(rows, F * Fp, 1, Dh // 2), torch.randn(rows, F * Fp, 1, Dh // 2)
        pairs.append((tn.rms_norm_rotate(q, wq, 1e-6, N, cos, sin), fused.rms_norm_rotate(q, wq, 1e-6, N, cos, sin)))
    pairs.append((tn.rms_norm(q, wq, 1e-6), fused.rms_norm(q, wq, 1e-6)))
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    print("ok", len(pairs))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")
def test_kernels_in_the_interpreter_equal_the_eager_pieces_in_fp32():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "8"]


def test_cpu_tensors_take_the_compiled_pieces():
    x = torch.randn(1, 6, 8)
    assert not tn.usable(x) and not tn.usable(torch.randn(1, 8, 6).transpose(1, 2))  # CPU; not contiguous
    mod = torch.randn(1, 2, 6, 8)
    shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]
    ops = fused.compiled_ops()
    expected = fused.modulate(x, shift, scale, 1e-6)
    torch.testing.assert_close(ops.modulate(x, shift, scale, 1e-6), expected, rtol=1e-5, atol=1e-5)


def test_bad_rope_tables_are_refused_with_the_shapes():
    x = torch.randn(1, 6, 16)
    with pytest.raises(ValueError, match=r"need \[B or 1, L, 1, 4\]"):
        tn._launch_rms(x, torch.ones(16), 1e-6, torch.randn(1, 6, 1, 3), torch.randn(1, 6, 1, 3), num_heads=2)


def test_bad_per_frame_vectors_are_refused_with_the_shapes():
    x = torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match=r"\[B or 1, F, 1, D\]"):
        tn._per_frame_strides(torch.randn(2, 2, 1, 4), x)
    with pytest.raises(ValueError, match="do not split into 4 frames"):
        tn._per_frame_strides(torch.randn(2, 4, 1, 8), x)


def test_the_dits_tokens_are_contiguous_for_the_kernels():
    """The patch embedding's token-major view is made contiguous, so every block's pieces get
    contiguous [B, L, D] rows (a strided x would send every LayerNorm piece to its fallback)."""
    from stages.config import DIT_PRESETS
    from stages.dit import WanDiT

    cfg = DIT_PRESETS["tiny"]
    x_BLD = WanDiT(cfg).embed(torch.randn(1, cfg.in_dim, 2, 8, 8))
    assert x_BLD.is_contiguous() and x_BLD.shape[1] == 2 * 4 * 4


def test_a_failing_kernel_is_replaced_by_its_compiled_piece_for_good(monkeypatch, caplog):
    calls = []

    def kernel(x, *args):
        calls.append("kernel")
        raise RuntimeError("no kernel for this GPU")

    def fallback(x, *args):
        calls.append("fallback")
        return x + 1

    monkeypatch.setattr(tn, "available", lambda: True)
    monkeypatch.setattr(tn, "usable", lambda x: True)
    piece = fused._norm_kernel_or(kernel, fallback)
    x = torch.zeros(1, 2, 4)
    assert torch.equal(piece(x), x + 1) and torch.equal(piece(x), x + 1)
    assert calls == ["kernel", "fallback", "fallback"]
    assert "no kernel for this GPU" in caplog.text and "compiled piece runs from now on" in caplog.text
    monkeypatch.setenv("WEIR_NORM_KERNELS", "0")
    assert fused._norm_kernel_or(kernel, fallback) is fallback
