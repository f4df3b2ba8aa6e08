"""The efficient references realize their savings: measured peak memory grows
from N = 2048 to N = 8192 with an exponent at most 1.6 (dense: about 2)."""

import math

import pytest

from attn_zoo.bench.cases import Case
from attn_zoo.bench.measure import cpu_peak_supported
from attn_zoo.bench.peak_process import cpu_peak
from attn_zoo.tiles import DEFAULT_BUDGET
from conftest import MECHANISMS


def peak(name, n):
    """The harness's figure: the helper process, after one warm-up call."""
    case = Case(name, "reference", "cpu", "float32", 1, 4, 64, n, True, "fwd")
    measured, why = cpu_peak(case, seed=0, budget=DEFAULT_BUDGET)
    assert why is None, why
    return measured


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MECHANISMS if m != "dense"])
def test_memory_exponent_at_most_1_6(name, no_gpu):
    if cpu_peak_supported() is not None:
        pytest.skip(cpu_peak_supported())
    exponent = math.log(peak(name, 8192) / peak(name, 2048)) / math.log(4)
    assert exponent <= 1.6, f"{name}: peak memory grows as N^{exponent:.2f}"
