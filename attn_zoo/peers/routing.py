"""routing's peer: routing-transformer's ``KmeansAttention`` for the clusters and
local-attention's ``LocalAttention`` for the window (the routing transformer's
own local heads), averaged per head as the mechanism averages its two parts
(Roy et al. 2020, Sec. 4).

Same counts as the plan: about sqrt(N) clusters of w = ceil(N / clusters)
members, shared QK. The package learns its own centroids (k-means from a random
pick of the tokens on the first call) and masks self pairs; a token's output is
(local + mean over the clusters holding it) / 2, where the mechanism weighs the
local window and each cluster equally."""

from __future__ import annotations

import torch

from attn_zoo.lsh import shared_keys
from attn_zoo.peers.common import local_windows, peer_options, refuse_padding, seeded
from attn_zoo.routing import Routing, RoutingPlan

PACKAGES = (("routing_transformer", "routing-transformer"), ("local_attention", "local-attention"))


def differences(mech: Routing, causal: bool) -> str:
    said = ["centroids from its own k-means on the input, not the plan's",
            "self pairs at -5e4", "output (local + mean of its clusters) / 2"]  # fmt: skip
    if causal:
        said += ["causal: top-w members per cluster with a causal mask, not the w most recent",
                 "window of W + 1 keys"]  # fmt: skip
    return "routing-transformer KmeansAttention + LocalAttention: " + "; ".join(said)


@Routing.implementation("peer", **peer_options(*PACKAGES, variant=differences))
def routing_peer(mech: Routing, q, k, v, plan: RoutingPlan) -> torch.Tensor:
    from routing_transformer.routing_transformer import KmeansAttention

    refuse_padding(plan, "routing/peer")
    _, h, n, d = q.shape
    window = plan.window if plan.causal else max(1, plan.window // 2)
    keys = shared_keys(q)
    near = local_windows(q, keys, v, window, causal=plan.causal, look_backward=1,
                         look_forward=0 if plan.causal else 1, exact_windowsize=True)  # fmt: skip
    clusters = mech.cluster_count(n)
    with seeded(mech.config.seed, q.device):
        routed = KmeansAttention(clusters, plan.width, h, d, causal=plan.causal,
                                 ema_decay=mech.config.ema_decay, shared_qk=True)  # fmt: skip
        routed = routed.to(q.device).eval()(q, keys, v)[0]
    return ((near + routed) / 2).to(q.dtype)
