"""Dense attention on the block-sparse core: every key block (causal: those on
or below the diagonal, the diagonal ones element-masked)."""

from __future__ import annotations

from functools import lru_cache

import torch

from kernels.flash import BIG, BlockLayout, band_layout, block_sparse_attention


@lru_cache(maxsize=64)
def dense_layout(n_q: int, n_k: int, causal: bool, device: torch.device, block: int) -> BlockLayout:
    lo = 0 if causal else -BIG
    return band_layout(n_q, n_k, lo, BIG, n_k - n_q, block, block, device)


def dense_attention(q, k, v, causal: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    n_q, n_k = q.shape[2], k.shape[2]
    block = 64 if q.shape[-1] <= 64 else 32
    layout = dense_layout(n_q, n_k, causal, q.device, block)
    lo = 0 if causal else -BIG
    return block_sparse_attention(q, k, v, layout, lo, BIG, n_k - n_q, out=out)[0]
