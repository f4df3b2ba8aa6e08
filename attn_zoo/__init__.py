"""attn-zoo: long-context attention mechanisms behind one interface.

>>> import attn_zoo, torch
>>> q = k = v = torch.randn(1, 8, 512, 64)
>>> out = attn_zoo.get("lsh")(q, k, v, causal=True, impl="reference")

In a model: :func:`attention` (SDPA's signature plus ``mechanism=``),
:class:`Attention` (an ``nn.Module`` owning the mechanism's parameters) and
:func:`attn_zoo.integrations.transformers.register` (Hugging Face).
"""

# isort: off
# Importing a mechanism's module registers it; this order is the registry's.
from attn_zoo import dense, sparse, adaptive_span, xl, compressive, lsh, routing  # noqa: F401
from attn_zoo import peers  # noqa: F401  (each mechanism's `peer` impl)

# isort: on
from attn_zoo.functional import attention
from attn_zoo.interface import Impl, Mechanism, Plan
from attn_zoo.module import Attention
from attn_zoo.registry import get, names, register, unregister

__all__ = [
    "Attention",
    "Impl",
    "Mechanism",
    "Plan",
    "attention",
    "get",
    "names",
    "register",
    "unregister",
]
