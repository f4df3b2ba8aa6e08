"""attn-zoo: long-context attention mechanisms behind one interface.

>>> import attn_zoo, torch
>>> q = k = v = torch.randn(1, 8, 512, 64)
>>> out = attn_zoo.get("dense")(q, k, v, causal=True, impl="reference")
"""

from attn_zoo import adaptive_span, compressive, dense, lsh, routing, sparse, xl  # noqa: F401  (importing registers the mechanisms)
from attn_zoo.interface import Impl, Mechanism, Plan
from attn_zoo.registry import get, names, register, unregister

__all__ = ["Impl", "Mechanism", "Plan", "get", "names", "register", "unregister"]
