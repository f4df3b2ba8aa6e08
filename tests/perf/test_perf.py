"""pytest-benchmark over the registry: every mechanism x every implementation
the harness would run here by default.

CPU CI runs these with ``--benchmark-disable`` (each case runs once, as a
smoke test). GPU runners enable them and compare against a saved baseline:

    pytest tests/perf --benchmark-enable --benchmark-compare \\
        --benchmark-compare-fail=median:10%
"""

import os

import pytest
import torch

import attn_zoo
from attn_zoo.bench.measure import synchronized

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = int(os.environ.get("ATTN_ZOO_PERF_N", 4096 if DEVICE.type == "cuda" else 256))
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32

CASES = [
    (name, impl)
    for name in attn_zoo.names()
    for impl, spec in attn_zoo.get(name).impls.items()
    if spec.default_on(DEVICE) and spec.unavailable(DEVICE) is None
]


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_forward(benchmark, name, impl):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, N, 64, generator=g).to(DEVICE, DTYPE) for _ in range(3))
    mech = attn_zoo.get(name)
    plan = mech.plan(q, k, v, True)
    call = synchronized(lambda: mech(q, k, v, causal=True, impl=impl, plan=plan), DEVICE)
    benchmark.group = f"N={N} {DTYPE}"
    out = benchmark(call)
    assert torch.isfinite(out).all()
