import os

# Kernels run in Triton's interpreter on machines without a GPU; the variable
# must be set before triton is first imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FORCE_GPU"):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture
def no_gpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
