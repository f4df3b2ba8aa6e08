"""The efficient references realize their savings: measured peak memory grows
from N = 2048 to N = 8192 with an exponent at most 1.6 (dense: about 2)."""

import math

import pytest
import torch

import attn_zoo
from attn_zoo.bench.measure import cpu_peak_supported, peak_memory
from conftest import MECHANISMS


def peak(name, n):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g) for _ in range(3))
    mech = attn_zoo.get(name)
    call = lambda: mech(q, k, v, causal=True)
    call()
    return peak_memory(call, torch.device("cpu"))[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in MECHANISMS if m != "dense"])
def test_memory_exponent_at_most_1_6(name, no_gpu):
    if cpu_peak_supported() is not None:
        pytest.skip(cpu_peak_supported())
    exponent = math.log(peak(name, 8192) / peak(name, 2048)) / math.log(4)
    assert exponent <= 1.6, f"{name}: peak memory grows as N^{exponent:.2f}"
