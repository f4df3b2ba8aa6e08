import os

# Kernels run in Triton's interpreter on machines without a GPU; the variable
# must be set before triton is first imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
# FlexAttention compiles on the CPU in seconds per shape; the suite runs it eagerly
# (tests/test_flex.py compiles a few cases on purpose).
os.environ.setdefault("ATTN_ZOO_FLEX_COMPILE", "0")

import pytest
import torch

import attn_zoo

MECHANISMS = attn_zoo.names()


def qkv(n, *, batch=1, heads=2, dim=32, n_k=None, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, heads, n_k or n, dim), (batch, heads, n_k or n, dim)]
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
        for s in shapes
    ]


def small(name, **overrides):
    """The mechanism with its small-N test config."""
    mech = attn_zoo.get(name)
    return attn_zoo.get(name, **{**mech.small, **overrides})


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def check_impl(mech, impl, n, dim, dtype, causal, *, batch=1, heads=2, device="cpu"):
    """``impl`` against the float64 oracle and against ``reference`` on all rows,
    within TOLERANCE[dtype] relative error; the output must be finite."""
    from attn_zoo import oracle

    q, k, v = (x.to(device) for x in qkv(n, batch=batch, heads=heads, dim=dim, dtype=dtype))
    plan = mech.plan(q, k, v, causal)
    out = mech(q, k, v, causal=causal, impl=impl, plan=plan)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    rows = torch.arange(n)
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    tol = TOLERANCE[dtype]
    assert oracle.rel_error(out, expected) < tol, f"{impl} vs oracle"
    reference = mech(q, k, v, causal=causal, impl="reference", plan=plan)
    assert oracle.rel_error(out, reference) < tol, f"{impl} vs reference"


def interrupting(real, at: int):
    """``real``, except that its ``at``-th call raises KeyboardInterrupt (a Ctrl-C
    in the middle of a sweep)."""
    calls = []

    def flaky(*args):
        calls.append(args)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args)

    return flaky


@pytest.fixture
def no_gpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
