"""Dense attention on the block-sparse core: every key block (causal: those on
or below the diagonal, the diagonal ones element-masked), and any other pure band."""

from __future__ import annotations

import torch

from attn_zoo.kernels.autograd import attend
from attn_zoo.kernels.flash import Part
from attn_zoo.kernels.layout import Band, cached_layout
from attn_zoo.kernels.tuning import tile_for


def dense_band(n_q: int, n_k: int, causal: bool) -> Band:
    """Causal with keys longer than queries: query i is position i + (n_k - n_q)."""
    return Band(lo=0, offset=n_k - n_q) if causal else Band()


def band_attention(q, k, v, band: Band, keep=None) -> torch.Tensor:
    """One launch over the key blocks a band touches (dense, local windows)."""
    n_q, n_k = q.shape[2], k.shape[2]
    tile = tile_for(q, "dense")
    layout = cached_layout(n_q, n_k, band, None, tile.blocks, q.device)
    return attend(q, [Part(k, v, layout, band, keep=keep, tile=tile)])[0]


def dense_attention(q, k, v, causal: bool, keep=None) -> torch.Tensor:
    return band_attention(q, k, v, dense_band(q.shape[2], k.shape[2], causal), keep=keep)
