"""lsh's peer: reformer-pytorch's ``LSHAttention`` (Kitaev et al. 2020, Sec. 2).

The package hashes with its own random rotations into N / bucket_size buckets
and sorts tokens into chunks of ``bucket_size``, each attending to itself and
the previous chunk, as the paper's Sec. 2.3; it needs N divisible by
2 x bucket_size, so shorter multiples are padded and the padding masked (what
the package's own ``Autopadder`` does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn_zoo.lsh import LSH, LSHPlan
from attn_zoo.peers.common import heads_as_batch, peer_options, refuse_padding, seeded

PACKAGE = ("reformer_pytorch", "reformer-pytorch")


def differences(mech: LSH, causal: bool) -> str | None:
    cfg = mech.config
    plan_buckets = cfg.n_buckets or "2N / bucket_size, Sec. 2.3"
    said = [
        "its own random rotations (torch.randn), not the plan's seeded ones",
        f"n_buckets = N / bucket_size (the plan: {plan_buckets})",
        f"self pairs at -5e4 (config: {cfg.self_penalty:g})",
    ]
    if causal:
        said.append("causal: chunks of the sort with a causal mask, not the sorted window")
    return "reformer-pytorch LSHAttention: " + "; ".join(said)


@LSH.implementation("peer", **peer_options(PACKAGE, variant=differences))
def lsh_peer(mech: LSH, q, k, v, plan: LSHPlan) -> torch.Tensor:
    from reformer_pytorch import LSHAttention

    refuse_padding(plan, "lsh/peer")
    cfg, n = mech.config, plan.n_q
    attention = LSHAttention(
        bucket_size=cfg.bucket_size,
        n_hashes=cfg.n_hashes,
        causal=plan.causal,
        allow_duplicate_attention=cfg.allow_duplicate_attention,
        attend_across_buckets=cfg.attend_across_buckets,
    ).eval()
    pad = -n % (2 * cfg.bucket_size)
    qk, values = (F.pad(heads_as_batch(x), (0, 0, 0, pad)) for x in (q, v))
    real = (torch.arange(n + pad, device=q.device) < n).expand(qk.shape[0], -1) if pad else None
    with seeded(cfg.seed, q.device):
        out = attention(qk, values, input_mask=real)[0]
    return out[:, :n].reshape(q.shape)
