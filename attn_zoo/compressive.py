"""Compressive Transformer attention (Rae et al. 2019, "Compressive
Transformers for Long-Range Sequence Modelling", Sec. 3, Alg. 1).

The sequence is processed as segments of length L. Segment s attends to

    [compressed memory (Mc slots); memory (the M previous positions); segment],

causally within the segment. Positions evicted from the memory are compressed
at rate c by f_c (mean pooling, max pooling, or a 1-D convolution with kernel =
stride = c), so slot g summarizes positions [g c, (g + 1) c); the Mc most
recent slots are kept. Memories get no gradient from the attention (they are
stop-gradient as in Transformer-XL); the compression is trained by the
attention-reconstruction loss, :func:`attention_reconstruction_loss`.
In bidirectional mode the whole segment is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attn_zoo import oracle
from attn_zoo.flex import flex, flex_options
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.registry import register
from attn_zoo.tiles import as_tiles, attend, blocks, gather, scatter, window
from attn_zoo.xl import segment_starts as _segment_starts

COMPRESSIONS = ("mean", "max", "conv")


@dataclass(frozen=True)
class CompressiveConfig:
    segment_len: int = 512  # L, the attention window (Sec. 5.2, WikiText-103: 512)
    mem_len: int = 512  # M (WikiText-103: 512)
    cmem_len: int = 512  # Mc, compressed slots (WikiText-103: 512)
    rate: int = 2  # c (WikiText-103: 2)
    compression: str = "mean"  # f_c: mean | max | conv
    seed: int = 0  # draws the conv compression's weights


@dataclass(frozen=True, eq=False)
class CompressivePlan(Plan):
    segment_len: int
    mem_len: int
    cmem_len: int
    rate: int
    compression: str
    conv_k: torch.Tensor | None  # [H, D_out, D_in, c] for compression == "conv"
    conv_v: torch.Tensor | None

    @property
    def slots(self) -> int:
        """Compressed slots over the whole sequence (complete groups of c)."""
        return self.n_k // self.rate


def compress(x: torch.Tensor, rate: int, how: str, weight: torch.Tensor | None = None):
    """f_c over groups of ``rate`` positions: [B, H, N, D] -> [B, H, N // rate, D]."""
    b, h, n, d = x.shape
    groups = x[:, :, : n // rate * rate].reshape(b, h, n // rate, rate, d)
    if how == "mean":
        return groups.mean(3)
    if how == "max":
        return groups.amax(3)
    return torch.einsum("bhgtd,hetd->bhge", groups, weight.transpose(-1, -2).to(x.dtype))


def attention_reconstruction_loss(
    q: torch.Tensor,
    old_k: torch.Tensor,
    old_v: torch.Tensor,
    rate: int,
    compression: str = "mean",
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rae et al. 2019, Alg. 1 (attention-reconstruction loss): the mean squared
    difference between attending to the evicted memory and to its compression,
    with queries and old memory detached, so only f_c (``weights`` for conv)
    learns from it. Shapes [B, H, *, D]."""
    q, old_k, old_v = q.detach(), old_k.detach(), old_v.detach()
    wk, wv = weights if weights is not None else (None, None)
    ck, cv = compress(old_k, rate, compression, wk), compress(old_v, rate, compression, wv)
    full, _ = attend(q, old_k, old_v)
    compressed, _ = attend(q, ck, cv)
    return F.mse_loss(compressed, full)


@register
class Compressive(Mechanism):
    name = "compressive"
    small: ClassVar[dict] = {"segment_len": 8, "mem_len": 8, "cmem_len": 4, "rate": 2}
    Config = CompressiveConfig
    citation = (
        "Rae et al. 2019, Compressive Transformers for Long-Range Sequence Modelling (Alg. 1)"
    )
    summary = "[compressed memory; memory; segment], old memory compressed at rate c"
    complexity = "O(N (Mc + M + L)) time and memory"
    oracle_summary = (
        "dense softmax over [all compressed slots; all positions] (compressed by its own "
        "pooling/conv code) with a 0/-inf mask of the visible slots and positions"
    )

    def plan(self, q, k, v, causal: bool) -> CompressivePlan:
        cfg = self.config
        if cfg.compression not in COMPRESSIONS:
            raise ValueError(
                f"compressive: unknown compression {cfg.compression!r}; "
                f"accepted: {', '.join(COMPRESSIONS)}"
            )
        if cfg.rate < 1 or cfg.segment_len % cfg.rate or cfg.mem_len % cfg.rate:
            raise ValueError(
                f"compressive: rate c={cfg.rate} must divide segment_len={cfg.segment_len} "
                f"and mem_len={cfg.mem_len}"
            )
        conv = (None, None)
        if cfg.compression == "conv":
            g = torch.Generator().manual_seed(cfg.seed)
            heads, dim = q.shape[1], q.shape[3]
            scale = (dim * cfg.rate) ** -0.5
            conv = tuple(
                (torch.randn(heads, dim, dim, cfg.rate, generator=g) * scale).to(q.device)
                for _ in range(2)
            )
        n = q.shape[2]
        return CompressivePlan(
            q.shape[0], q.shape[1], n, n, causal, cfg.segment_len, cfg.mem_len,
            cfg.cmem_len, cfg.rate, cfg.compression, *conv,
        )  # fmt: skip

    def oracle(self, q, k, v, plan: CompressivePlan, rows):
        c = plan.rate
        i = rows.to(q.device)[:, None]
        start = _segment_starts(i, plan.segment_len)
        g = torch.arange(plan.slots, device=q.device)[None, :]
        oldest = start - plan.mem_len - plan.cmem_len * c
        slot_vis = (g * c >= oldest) & ((g + 1) * c <= start - plan.mem_len)
        j = torch.arange(plan.n_k, device=q.device)[None, :]
        raw_vis = (j >= start - plan.mem_len) & (
            (j <= i) if plan.causal else (j < start + plan.segment_len)
        )
        vis = torch.cat([slot_vis, raw_vis], dim=-1)
        stop = torch.cat([torch.ones_like(slot_vis), j < start], dim=-1)
        ck = _pool(k.detach().double(), plan, plan.conv_k)
        cv = _pool(v.detach().double(), plan, plan.conv_v)
        keys, values = torch.cat([ck, k.double()], 2), torch.cat([cv, v.double()], 2)
        return [oracle.Term(oracle.mask_bias(vis), k=keys, v=values, stop_grad=stop)]


def _pool(x: torch.Tensor, plan: CompressivePlan, weight: torch.Tensor | None) -> torch.Tensor:
    """The oracle's own f_c, through torch.nn.functional's pooling and conv1d."""
    b, h, n, d = x.shape
    c = plan.rate
    if n < c:
        return x[:, :, :0]
    seq = x.transpose(-1, -2)  # [B, H, D, N]
    if plan.compression == "conv":
        per_head = [F.conv1d(seq[:, hh], weight[hh].double(), stride=c) for hh in range(h)]
        return torch.stack(per_head, 1).transpose(-1, -2)
    pool = F.avg_pool1d if plan.compression == "mean" else F.max_pool1d
    return pool(seq.reshape(b * h, d, n), c, c).reshape(b, h, d, -1).transpose(-1, -2)


@Compressive.implementation("reference")
def compressive_reference(mech, q, k, v, plan: CompressivePlan) -> torch.Tensor:
    """All segments at once: keys [Mc slots | M memory | L segment] per segment."""
    n, seg, mem, c = plan.n_q, plan.segment_len, plan.mem_len, plan.rate
    ck = compress(k.detach(), c, plan.compression, plan.conv_k)
    cv = compress(v.detach(), c, plan.compression, plan.conv_v)
    if plan.slots == 0:  # shorter than one group: a masked placeholder slot
        ck, cv = k.new_zeros(*k.shape[:2], 1, k.shape[3]), v.new_zeros(*v.shape[:2], 1, v.shape[3])
    qi = blocks(n, seg, q.device)  # [S, L]
    start = qi[:, 0]
    si = window((start - mem) // c - plan.cmem_len, plan.cmem_len, plan.slots)  # [S, Mc]
    ki = window(start - mem, mem + seg, n)  # [S, M + L]
    mem_i, cur_i = as_tiles(ki[:, :mem]), as_tiles(ki[:, mem:])
    kg = torch.cat([gather(ck, as_tiles(si)), gather(k.detach(), mem_i), gather(k, cur_i)], -2)
    vg = torch.cat([gather(cv, as_tiles(si)), gather(v.detach(), mem_i), gather(v, cur_i)], -2)
    i, j = qi[:, :, None], ki[:, None, :]
    raw_vis = (j >= 0) & (i >= 0) & ((j <= i) if plan.causal else True)
    vis = torch.cat([(si >= 0)[:, None, :].expand(-1, seg, -1), raw_vis], dim=-1)
    out, _ = attend(gather(q, as_tiles(qi)), kg, vg, vis)
    return scatter(out, as_tiles(qi), n).to(q.dtype)


@Compressive.implementation("triton", **triton_options())
def compressive_triton(mech, q, k, v, plan: CompressivePlan) -> torch.Tensor:
    """Memory + segment launch, then the compressed slots accumulated (kernels/memory.py)."""
    from attn_zoo.kernels.memory import compressive_attention

    return compressive_attention(q, k, v, plan)


@Compressive.implementation("flex", **flex_options(differentiable=False))
def compressive_flex(mech, q, k, v, plan: CompressivePlan) -> torch.Tensor:
    """Keys [all compressed slots; all positions] with one mask_mod over both. Memories
    are not detached here, so it is registered without a backward pass."""
    seg, mem, cmem, c = plan.segment_len, plan.mem_len, plan.cmem_len, plan.rate
    ck = compress(k.detach(), c, plan.compression, plan.conv_k)
    cv = compress(v.detach(), c, plan.compression, plan.conv_v)
    slots, causal = ck.shape[2], plan.causal

    def slots_memory_segment(b, h, i, j):
        start = i - i % seg
        slot = (j < slots) & (j * c >= start - mem - cmem * c) & ((j + 1) * c <= start - mem)
        r = j - slots
        raw = (r >= 0) & (r >= start - mem) & ((r <= i) if causal else (r < start + seg))
        return slot | raw

    keys, values = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
    return flex(q, keys, values, slots_memory_segment)[0]
