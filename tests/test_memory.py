"""The harness's peak-memory figure against an analytic count."""

import pytest
import torch

import attn_zoo
from attn_zoo.bench.measure import cpu_peak_supported, peak_memory


@pytest.mark.parametrize("n", [512, 1024, 2048])
def test_dense_reference_peak_matches_analytic_count(n, no_gpu):
    """BERT-base shape: 12 heads, head_dim 64, float32, batch 1. At its peak the
    reference holds the scores and their softmax (two 12 x N x N float32
    matrices), the causal mask (N x N bool) and the output."""
    if cpu_peak_supported() is not None:
        pytest.skip(cpu_peak_supported())
    heads, dim = 12, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
    dense = attn_zoo.get("dense")
    call = lambda: dense(q, k, v, causal=True, impl="reference")
    call()  # warm-up, as the harness does: first-call allocations are not the case's
    measured, _ = peak_memory(call, torch.device("cpu"))
    analytic = 2 * heads * n * n * 4 + n * n + heads * n * dim * 4
    assert abs(measured - analytic) / analytic < 0.15, (measured, analytic)
