"""compressive's peer: compressive-transformer-pytorch's ``SelfAttention`` (Rae et
al. 2020, Alg. 1), run segment by segment with its memories carried.

The package attends from the layer's input x: its own projections make q, k, v
from x, and its memories keep rows of x. The wrapper hands it x = [q | k | v]
per token, with parameter-free selections in place of the projections and the
mechanism's compression f_c (mean, max or the plan's conv) in place of its
learned conv, so its attention, causal mask, FIFO memory and compressed-memory
queue run as published on the mechanism's q, k, v. Its first segment has no
memory (the config's ``attend_initial_memory=False``) and it compresses
everything evicted (``compress_all_older``, which only matters when L > M)."""

from __future__ import annotations

import torch
from torch import nn

from attn_zoo.compressive import Compressive, CompressivePlan, compress
from attn_zoo.peers.common import peer_options, refuse_padding
from attn_zoo.validation import Unsupported

PACKAGE = ("compressive_transformer_pytorch", "compressive-transformer-pytorch")


def differences(mech: Compressive, causal: bool) -> str | None:
    cfg, said = mech.config, []
    if cfg.attend_initial_memory:
        said.append("no zero initial memories (attend_initial_memory=True)")
    if cfg.segment_len > cfg.mem_len and not cfg.compress_all_older:
        said.append("compresses every evicted position (compress_all_older=False here)")
    return "compressive-transformer-pytorch: " + "; ".join(said) if said else None


class _Split(nn.Module):
    """x = [q | k | v] rows -> the parts at ``picks`` (0: q, 1: k, 2: v), concatenated."""

    def __init__(self, *picks: int) -> None:
        super().__init__()
        self.picks = picks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(3, dim=-1)
        return torch.cat([parts[p] for p in self.picks], dim=-1)


class _Compress(nn.Module):
    """The mechanism's f_c on the k and v parts of evicted memory rows [b, m, 3 H D]."""

    def __init__(self, plan: CompressivePlan, heads: int) -> None:
        super().__init__()
        self.plan, self.heads = plan, heads

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        b, m, _ = rows.shape
        plan, out = self.plan, []
        for part, weight in zip(rows.chunk(3, dim=-1), (None, plan.conv_k, plan.conv_v),
                                strict=True):  # fmt: skip
            heads = part.reshape(b, m, self.heads, -1).transpose(1, 2)
            how = "mean" if weight is None and plan.compression == "conv" else plan.compression
            slots = compress(heads, plan.rate, how, weight)  # q's part is never read
            out.append(slots.transpose(1, 2).reshape(b, slots.shape[2], -1))
        return torch.cat(out, dim=-1)


@Compressive.implementation("peer", **peer_options(PACKAGE, variant=differences))
def compressive_peer(mech: Compressive, q, k, v, plan: CompressivePlan) -> torch.Tensor:
    from compressive_transformer_pytorch.compressive_transformer_pytorch import SelfAttention

    refuse_padding(plan, "compressive/peer")
    if not plan.causal:
        raise Unsupported("compressive/peer: compressive-transformer-pytorch is causal only; "
                          "accepted: causal=True")  # fmt: skip
    b, h, n, d = q.shape
    attention = SelfAttention(h * d, plan.segment_len, plan.mem_len, plan.cmem_len,
                              cmem_ratio=plan.rate, heads=h).eval()  # fmt: skip
    attention.to_q, attention.to_kv, attention.to_out = _Split(0), _Split(1, 2), nn.Identity()
    attention.compress_mem_fn = _Compress(plan, h)
    x = torch.cat([t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v)], dim=-1)
    memories, outs = None, []
    for segment in x.split(plan.segment_len, dim=1):
        out, memories, _ = attention(segment, memories=memories)
        outs.append(out)
    return torch.cat(outs, dim=1).reshape(b, n, h, d).transpose(1, 2)
