"""Routing attention (Roy et al. 2020, "Efficient Content-Based Sparse
Attention with Routing Transformers", Sec. 4).

Shared QK, normalized as in lsh: the keys are the normalized queries and
``k`` is not read. Centroids (about sqrt(N) of them, drawn
from an explicit seed) are updated by online k-means: ``kmeans_iters`` steps
of mu <- decay * mu + (1 - decay) * mean of the tokens assigned to mu
(Sec. 4.1), recorded as ``centroid_update``. Bidirectional mode routes with
balanced membership: each centroid takes its top-w closest tokens,
w = ceil(N / n_clusters), so a token may be in no cluster or in several; each
cluster attends within itself. A local window (Sec. 4: 256) attends around
every token. A token's output is the mean over the local window and every
cluster that holds it (the paper puts routing and local attention in separate
heads; one head averaging both keeps every head comparable here).

Causal mode: top-w over the whole sequence lets future tokens change which
cluster a past query lands in, and centroids updated on the input have seen
the future. So causal routing uses the seeded centroids as they are, puts
each token in its nearest cluster, and lets it attend to itself and the w
most recent earlier members of that cluster; plus the causal local window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attn_zoo import oracle
from attn_zoo.flex import flex, flex_options
from attn_zoo.grouped import (
    group_pairs,
    sorted_attention,
    sorted_flex,
    visible_sorted,
)
from attn_zoo.interface import Mechanism, Plan
from attn_zoo.kernels.device_constants import on_device
from attn_zoo.kernels.runtime import triton_options
from attn_zoo.kernels.sorting import sort_by_group
from attn_zoo.lsh import shared_keys
from attn_zoo.registry import register
from attn_zoo.tiles import (
    as_tiles,
    attend,
    attend_tiles,
    blocks,
    chunks,
    gather,
    key_mask,
    run_chunk,
    window,
)

UPDATES = ("ema", "none")


@dataclass(frozen=True)
class RoutingConfig:
    n_clusters: int | None = None  # None: about sqrt(N) (Sec. 4.1)
    window: int = 256  # local attention window (Sec. 5: 256)
    centroid_update: str = "ema"  # ema | none: how centroids move (bidirectional only)
    kmeans_iters: int = 1  # EMA k-means steps on this input
    ema_decay: float = 0.99  # decay of the original implementation
    seed: int = 0  # draws the initial centroids


@dataclass(frozen=True, eq=False)
class RoutingPlan(Plan):
    window: int
    width: int  # w: members per cluster (bidirectional) / look-back (causal)
    members: torch.Tensor | None  # bidirectional: [B, H, n_clusters, w] positions, sorted
    clusters: torch.Tensor | None  # causal: [B, H, N] nearest cluster


def _local_visible(i: torch.Tensor, j: torch.Tensor, width: int, causal: bool) -> torch.Tensor:
    """Local window: 0 <= i - j < width (causal) or |i - j| <= width // 2."""
    return ((i - j >= 0) & (i - j < width)) if causal else (i - j).abs() <= width // 2


def _mean_over_parts(local: torch.Tensor, routed: torch.Tensor, members: torch.Tensor):
    """Each token's output: the mean of its local result and of the result of every
    cluster holding it. routed [B, H, C * w, D] follows members [B, H, C, w]."""
    b, h, n, d = local.shape
    flat = members.reshape(b, h, -1)
    total = local.new_zeros(b, h, n, d).scatter_add_(
        2, flat[..., None].expand(-1, -1, -1, d), routed
    )
    count = local.new_zeros(b, h, n).scatter_add_(2, flat, local.new_ones(flat.shape))
    return (local + total) / (1 + count[..., None])


def ema_step(mu: torch.Tensor, x: torch.Tensor, decay: float) -> torch.Tensor:
    """One online k-means step (Sec. 4.1): each centroid [H, C, D] moves to
    decay * mu + (1 - decay) * the mean of the tokens x [B, H, N, D] nearest to it,
    renormalized; a centroid nobody chose stays."""
    nearest = torch.matmul(x, mu.transpose(-1, -2)[None]).argmax(-1)  # x read in place
    # one_hot would check the indices' range on the host: a wait per step on a GPU
    onehot = x.new_zeros(*nearest.shape, mu.shape[1]).scatter_(-1, nearest[..., None], 1.0)
    sums = torch.einsum("bhnc,bhnd->hcd", onehot, x)
    counts = onehot.sum(dim=(0, 2))[..., None]
    means = torch.where(counts > 0, sums / counts.clamp_min(1), mu)
    return torch.nn.functional.normalize(decay * mu + (1 - decay) * means, dim=-1)


@register
class Routing(Mechanism):
    name = "routing"
    small: ClassVar[dict] = {"window": 8}
    Config = RoutingConfig
    citation = "Roy et al. 2020, Efficient Content-Based Sparse Attention with Routing Transformers"
    summary = (
        "keys in the same k-means cluster (about sqrt(N) clusters), plus a local window "
        "(shared QK: k is not read)"
    )
    shared_qk = True
    complexity = "O(N (sqrt N + window)) time and memory"
    oracle_summary = (
        "weighted sum of dense softmaxes over shared-QK scores: the local window and each "
        "cluster holding the query, each with weight 1 / (1 + clusters holding it)"
    )

    def inputs(self, q, k, v):
        return q, shared_keys(q), v

    def cluster_count(self, n: int) -> int:
        """The config's ``n_clusters``, by default about sqrt(N) (Sec. 4.1), at most N."""
        return min(n, self.config.n_clusters or max(1, round(math.sqrt(n))))

    def centroids(self, heads: int, head_dim: int, n_clusters: int) -> torch.Tensor:
        """The seeded initial centroids [H, C, D], unit length."""
        g = torch.Generator().manual_seed(self.config.seed)
        mu = torch.randn(heads, n_clusters, head_dim, generator=g, dtype=torch.float32)
        return torch.nn.functional.normalize(mu, dim=-1)

    def buffers(self, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """The centroids [H, C, D] a model keeps, when ``n_clusters`` fixes C (the
        default follows N, so it leaves the seeded ones to ``plan``)."""
        clusters = self.config.n_clusters
        return {"centroids": self.centroids(heads, head_dim, clusters)} if clusters else {}

    def updated_buffers(self, buffers: dict[str, torch.Tensor], q: torch.Tensor) -> dict:
        """One online k-means step toward the tokens routed to each centroid (Sec. 4.1)."""
        if "centroids" not in buffers:
            return {}
        x = shared_keys(q).float()
        return {"centroids": ema_step(buffers["centroids"], x, self.config.ema_decay)}

    def plan(self, q, k, v, causal: bool, params: dict | None = None) -> RoutingPlan:
        """``params={"centroids": [H, C, D]}`` routes with given centroids (a model's
        buffer, :class:`attn_zoo.Attention`) instead of the seeded ones."""
        cfg = self.config
        if cfg.centroid_update not in UPDATES:
            raise ValueError(
                f"routing: unknown centroid_update {cfg.centroid_update!r}; "
                f"accepted: {', '.join(UPDATES)}"
            )
        if cfg.window < 1:
            raise ValueError("routing: window must be >= 1")
        b, h, n, d = q.shape
        if params:
            mu = params["centroids"].detach().float().to(q.device)
            n_clusters = mu.shape[1]
        else:
            n_clusters = self.cluster_count(n)
            mu = on_device(q.device, lambda: self.centroids(h, d, n_clusters), self.name, cfg,
                           h, d, n_clusters)  # fmt: skip
        x = shared_keys(q).float().detach()
        if not causal and cfg.centroid_update == "ema":
            for _ in range(cfg.kmeans_iters):
                mu = ema_step(mu, x, cfg.ema_decay)
        similarity = torch.matmul(mu[None], x.transpose(-1, -2))  # [B, H, C, N], no copy of x
        width = math.ceil(n / n_clusters)
        if causal:
            return RoutingPlan(b, h, n, n, causal, cfg.window, width, None, similarity.argmax(2))
        members = similarity.topk(width, dim=-1).indices.sort(dim=-1).values
        return RoutingPlan(b, h, n, n, causal, cfg.window, width, members, None)

    def oracle(self, q, k, v, plan: RoutingPlan, rows):
        rows = rows.to(q.device)
        i = rows[:, None]
        j = torch.arange(plan.n_k, device=q.device)[None, :]
        keys = self.inputs(q, k, v)[1]
        local = oracle.mask_bias(_local_visible(i, j, plan.window, plan.causal))
        if plan.causal:
            _, rank = sort_by_group(plan.clusters)
            c = plan.clusters
            vis = visible_sorted(rank[..., rows, None], rank[..., None, :], c[..., rows, None],
                                 c[..., None, :], plan.width, "window")  # fmt: skip
            half = torch.full((), 0.5, dtype=torch.float64, device=q.device)
            return [
                oracle.Term(local, half, k=keys, keep=plan.keep),
                oracle.Term(oracle.mask_bias(vis), half, k=keys, keep=plan.keep),
            ]
        # holds[b, h, c, n]: token n is a member of cluster c
        b, h, n_clusters, _ = plan.members.shape
        holds = torch.zeros(b, h, n_clusters, plan.n_k, dtype=torch.bool, device=q.device)
        holds.scatter_(-1, plan.members, True)
        row_holds = holds[..., rows]  # [B, H, C, R]
        weight = 1.0 / (1.0 + row_holds.sum(2, dtype=torch.float64))[..., None]  # [B, H, R, 1]
        terms = [oracle.Term(local, weight, k=keys, keep=plan.keep)]
        # one term per "k-th cluster holding the row", so each row sums only its own clusters
        order = row_holds.to(torch.int8).argsort(dim=2, descending=True, stable=True)
        for slot in range(int(row_holds.sum(2).max())):
            cluster = order[:, :, slot]  # [B, H, R]
            present = row_holds.gather(2, cluster[:, :, None]).squeeze(2)[..., None]
            vis = holds.gather(2, cluster[..., None].expand(-1, -1, -1, plan.n_k))
            terms.append(
                oracle.Term(oracle.mask_bias(vis), weight * present, k=keys, keep=plan.keep)
            )
        return terms

    def pairs(self, q, k, v, plan: RoutingPlan) -> int:
        n, win = plan.n_q, plan.window
        i = torch.arange(n)
        local = (i.clamp_max(win - 1) + 1) if plan.causal else (
            (i + win // 2).clamp_max(n - 1) - (i - win // 2).clamp_min(0) + 1
        )  # fmt: skip
        total = int(local.sum()) * plan.batch * plan.heads
        if plan.causal:
            return total + group_pairs(plan.clusters, plan.width, "window")
        return total + plan.members.numel() * plan.width


@Routing.implementation("reference")
def routing_reference(mech, q, k, v, plan: RoutingPlan) -> torch.Tensor:
    n = plan.n_q
    keys = shared_keys(q)
    # local window, on tiles of `window` queries
    qi = blocks(n, plan.window, q.device)
    before = plan.window if plan.causal else plan.window // 2
    after = 0 if plan.causal else plan.window // 2
    ki = window(qi[:, 0] - before, before + plan.window + after, n)
    vis = (ki[:, None, :] >= 0) & _local_visible(
        qi[:, :, None], ki[:, None, :], plan.window, plan.causal
    )
    local, _ = attend_tiles(q, keys, v, as_tiles(qi), as_tiles(ki), vis, keep=plan.keep,
                            need_lse=False)  # fmt: skip
    if plan.causal:
        routed, _ = sorted_attention(q, keys, v, plan.clusters, plan.width, "window", 0.0,
                                     keep=plan.keep)  # fmt: skip
        return ((local + routed) / 2).to(q.dtype)
    # each cluster attends within itself; a token averages over the clusters holding it
    members = plan.members

    def clusters(q, keys, v, members):
        return attend(gather(q, members), gather(keys, members), gather(v, members),
                      keep=key_mask(plan.keep, members), need_lse=False)[0]  # fmt: skip

    width = members.shape[-1]
    routed = [run_chunk(clusters, q, keys, v, members[:, :, part])
              for part in chunks(members.shape[2], width, width, q)]  # fmt: skip
    return _mean_over_parts(local, torch.cat(routed, 2).flatten(2, 3), members).to(q.dtype)


@Routing.implementation("triton", **triton_options())
def routing_triton(mech, q, k, v, plan: RoutingPlan) -> torch.Tensor:
    """A banded launch for the local window, then a sorted (causal) or member-list
    (bidirectional) launch for the clusters (kernels/grouped.py)."""
    from attn_zoo.kernels.autograd import attend
    from attn_zoo.kernels.dense import band_attention
    from attn_zoo.kernels.grouped import clustered_flash, sorted_parts
    from attn_zoo.kernels.layout import Band

    keys, half = shared_keys(q), plan.window // 2
    band = Band(lo=0, hi=plan.window - 1) if plan.causal else Band(lo=-half, hi=half)
    local = band_attention(q, keys, v, band, keep=plan.keep)
    if plan.causal:
        part, = sorted_parts(q, keys, v, plan.clusters[:, :, None], plan.width, "window", None,
                             keep=plan.keep)  # fmt: skip
        routed = attend(q, [part])[0]
        return ((local.float() + routed.float()) / 2).to(q.dtype)
    routed = clustered_flash(q, keys, v, plan.members, keep=plan.keep).float()
    return _mean_over_parts(local.float(), routed, plan.members).to(q.dtype)


@Routing.implementation("flex", **flex_options())
def routing_flex(mech, q, k, v, plan: RoutingPlan) -> torch.Tensor:
    """The local window as a band mask; clusters in sorted order (causal) or as the
    gathered member list with a block-diagonal mask (bidirectional)."""
    keys, win, causal = shared_keys(q), plan.window, plan.causal

    def local_window(b, h, i, j):
        return _local_visible(i, j, win, causal)

    local = flex(q, keys, v, local_window, keep=plan.keep, need_lse=False)[0].float()
    if causal:
        routed = sorted_flex(q, keys, v, plan.clusters, plan.width, "window", None,
                             keep=plan.keep, need_lse=False)[0]  # fmt: skip
        return ((local + routed.float()) / 2).to(q.dtype)
    width = plan.members.shape[-1]
    index = plan.members.flatten(2, 3)

    def same_cluster(b, h, i, j):
        return i // width == j // width

    keep = key_mask(plan.keep, index)  # [B, H, C * w] in member order
    routed = flex(gather(q, index), gather(keys, index), gather(v, index), same_cluster,
                  keep=keep, need_lse=False)[0]  # fmt: skip
    return _mean_over_parts(local, routed.float(), plan.members).to(q.dtype)
