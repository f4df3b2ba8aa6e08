"""The harness's peak-memory figure against an analytic count."""

import pytest

from attn_zoo.bench.cases import Case
from attn_zoo.bench.measure import cpu_peak_supported
from attn_zoo.bench.peak_process import cpu_peak
from attn_zoo.tiles import DEFAULT_BUDGET


@pytest.mark.parametrize("n", [512, 1024, 2048])
def test_dense_reference_peak_matches_analytic_count(n, no_gpu):
    """BERT-base shape: 12 heads, head_dim 64, float32, batch 1. At its peak the
    reference holds the scores and their softmax (two 12 x N x N float32
    matrices), the causal mask (N x N bool) and the output."""
    if cpu_peak_supported() is not None:
        pytest.skip(cpu_peak_supported())
    heads, dim = 12, 64
    case = Case("dense", "reference", "cpu", "float32", 1, heads, dim, n, True, "fwd")
    measured, why = cpu_peak(case, seed=0, budget=DEFAULT_BUDGET)  # after one warm-up call
    assert why is None
    analytic = 2 * heads * n * n * 4 + n * n + heads * n * dim * 4
    assert abs(measured - analytic) / analytic < 0.15, (measured, analytic)


def test_the_peak_helper_reports_a_failing_case_and_goes_on(no_gpu):
    """A case the helper cannot run is a reason, not a crash; the next case is measured."""
    if cpu_peak_supported() is not None:
        pytest.skip(cpu_peak_supported())
    broken = Case("dense", "nope", "cpu", "float32", 1, 2, 16, 64, True, "fwd")
    peak, why = cpu_peak(broken, seed=0, budget=DEFAULT_BUDGET)
    assert peak is None and why.startswith("peak memory not measured: ValueError: dense:")
    fine = Case("dense", "reference", "cpu", "float32", 1, 2, 16, 64, True, "fwd")
    peak, why = cpu_peak(fine, seed=0, budget=DEFAULT_BUDGET)
    assert peak is not None and peak >= 0 and why is None
