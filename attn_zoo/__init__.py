"""attn-zoo: long-context attention mechanisms behind one interface.

>>> import attn_zoo, torch
>>> q = k = v = torch.randn(1, 8, 512, 64)
>>> out = attn_zoo.get("lsh")(q, k, v, causal=True, impl="reference")
"""

# isort: off
# Importing a mechanism's module registers it; this order is the registry's.
from attn_zoo import dense, sparse, adaptive_span, xl, compressive, lsh, routing  # noqa: F401

# isort: on
from attn_zoo.interface import Impl, Mechanism, Plan
from attn_zoo.registry import get, names, register, unregister

__all__ = ["Impl", "Mechanism", "Plan", "get", "names", "register", "unregister"]
