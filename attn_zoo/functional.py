"""``attn_zoo.attention``: every mechanism behind the signature of
``torch.nn.functional.scaled_dot_product_attention``.

    attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, mechanism="dense", impl="auto", **config)

Shapes, defaults and semantics are SDPA's, with these rules for what a
mechanism can honor (anything else is a ValueError naming what is accepted):

* ``attn_mask``: None, a boolean key-padding mask ``[B, 1, 1, Nk]`` (True =
  attend; a query that sees no key gets 0), or the causal bias objects
  ``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``.
* ``is_causal=True`` aligns upper left, as SDPA documents; the decode step of
  a KV cache is ``attn_mask=causal_lower_right(q_len, k_len)`` (the last query
  sees every key). ``q_len < k_len`` is defined for dense, sparse_fixed,
  sparse_strided and adaptive_span (position-based patterns: the queries are
  the last positions); the others are self-attention over one sequence.
* ``scale`` (default 1/sqrt(head_dim)) multiplies every score: applied as
  q * (scale * sqrt(d)), or for Transformer-XL k and W_R R * (scale * sqrt(d)),
  which is exact because each score is linear in that product.
* ``enable_gqa``: key/value heads dividing the query heads, each shared by
  H_q / H_kv consecutive query heads (SDPA's and transformers' grouping).
* ``dropout_p`` must be 0: no attn-zoo implementation drops attention weights.
* ``impl="auto"``: ``triton`` on CUDA (``reference`` while an input needs a
  gradient the kernel cannot give), ``reference`` elsewhere.
* lsh and routing use shared QK: the keys are the normalized queries, so the
  ``k`` given is not read (a warning says so once per mechanism).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from attn_zoo.interface import Mechanism
from attn_zoo.registry import get, names

_warned_shared_qk: set[str] = set()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    mechanism: str = "dense",
    impl: str = "auto",
    **config: Any,
) -> torch.Tensor:
    """Attention ``[B, H, Lq, D]`` with SDPA's arguments and ``mechanism=`` (the
    registry key) plus its config fields; see the module docstring."""
    mech = get(mechanism, **config)
    causal, keep = _causality_and_padding(attn_mask, is_causal, q, k)
    return attend(mech, q, k, v, causal=causal, keep=keep, dropout_p=dropout_p, scale=scale,
                  enable_gqa=enable_gqa, impl=impl)  # fmt: skip


def attend(
    mech: Mechanism,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: str = "none",
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    enable_gqa: bool = False,
    impl: str = "auto",
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The common path of :func:`attention`, :class:`attn_zoo.Attention` and the
    transformers integration. ``causal``: "none", "upper_left" or "lower_right";
    ``keep`` [B, Nk] bool key padding; ``params``: the mechanism's learnable
    tensors (:meth:`Mechanism.learnable`)."""
    who = f"attn_zoo.attention({mech.name})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{who}: {name} must be 4-D [batch, heads, seq, head_dim], got {shape}"
            )
    if dropout_p != 0.0:
        raise ValueError(
            f"{who}: dropout_p={dropout_p}, but no attn-zoo implementation drops attention "
            f"weights; accepted: dropout_p=0.0"
        )
    if mech.shared_qk and k is not q and mech.name not in _warned_shared_qk:
        _warned_shared_qk.add(mech.name)
        warnings.warn(
            f"attn_zoo: {mech.name} uses shared QK (keys are the normalized queries); "
            f"the k given is not read",
            stacklevel=3,
        )
    k, v = _grouped(k, v, q.shape[1], enable_gqa, who)
    n_q, n_k = q.shape[2], k.shape[2]
    if n_q > n_k:
        raise ValueError(f"{who}: q_len {n_q} > k_len {n_k}; accepted: q_len <= k_len")
    if causal == "upper_left" and n_q < n_k:  # query i sees j <= i: later keys never visible
        k, v = k[:, :, :n_q], v[:, :, :n_q]
        keep = keep[:, :n_q] if keep is not None else None
        n_k = n_q
    if n_q < n_k and not mech.decodes:
        decoders = [name for name in names() if get(name).decodes]
        raise ValueError(
            f"{who}: q_len {n_q} < k_len {n_k} (a KV cache) is defined for "
            f"{', '.join(decoders)}; {mech.name} attends within one sequence"
        )
    if n_q < n_k and mech.self_attention and causal == "none":
        raise ValueError(
            f"{who}: bidirectional attention with q_len {n_q} < k_len {n_k} is defined for "
            f"dense only; pass attn_mask=causal_lower_right(q_len, k_len) for a decode step"
        )
    chosen = _choose_impl(mech, impl, q, k, v)
    queries, skipped = q, 0
    if n_q < n_k and mech.self_attention:  # the last positions: run the whole length
        skipped = n_k - n_q
        queries = torch.cat([q.new_zeros(*q.shape[:2], skipped, q.shape[3]), q], dim=2)
    plan = mech.make_plan(queries, k, v, causal != "none", params)
    if scale is not None and not math.isclose(scale * math.sqrt(q.shape[-1]), 1.0, rel_tol=1e-12):
        if mech.shared_qk and scale <= 0:
            raise ValueError(f"{who}: scale must be > 0 with shared QK, got {scale}")
        queries, k, plan = mech.scaled(queries, k, plan, scale * math.sqrt(q.shape[-1]))
    out = mech(queries, k, v, causal=causal != "none", impl=chosen, plan=plan, key_padding=keep)
    return out[:, :, skipped:]


def _grouped(k, v, heads: int, enable_gqa: bool, who: str):
    """Key/value heads shared by groups of query heads (SDPA's enable_gqa)."""
    kv_heads = k.shape[1]
    if kv_heads == heads:
        return k, v
    if not enable_gqa:
        raise ValueError(
            f"{who}: q has {heads} heads, k and v {kv_heads}; pass enable_gqa=True for "
            f"grouped-query attention"
        )
    if v.shape[1] != kv_heads or heads % kv_heads:
        raise ValueError(
            f"{who}: enable_gqa needs k and v heads ({kv_heads}, {v.shape[1]}) equal and "
            f"dividing the {heads} query heads"
        )
    group = heads // kv_heads
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _choose_impl(mech: Mechanism, impl: str, q, k, v) -> str:
    if impl != "auto":
        return impl
    if q.device.type != "cuda" or "triton" not in mech.impls:
        return "reference"
    triton_impl = mech.impls["triton"]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if triton_impl.unavailable(q.device) is not None:
        return "reference"
    if wants_grad and not triton_impl.differentiable(q.device):
        return "reference"
    return "triton"


def _causality_and_padding(attn_mask, is_causal: bool, q, k) -> tuple[str, torch.Tensor | None]:
    """SDPA's (attn_mask, is_causal) as (causal alignment, key padding [B, Nk])."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    accepted = (
        "accepted: None, a bool key-padding mask [batch, 1, 1, k_len] (True = attend), "
        "causal_upper_left(q_len, k_len) or causal_lower_right(q_len, k_len)"
    )
    if attn_mask is None:
        return ("upper_left" if is_causal else "none"), None
    if is_causal:
        raise ValueError("attn_zoo.attention: pass attn_mask or is_causal=True, not both (as SDPA)")
    if isinstance(attn_mask, CausalBias):
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (q.shape[2], k.shape[2]):
            raise ValueError(
                f"attn_zoo.attention: causal bias for ({attn_mask.seq_len_q}, "
                f"{attn_mask.seq_len_kv}), inputs are ({q.shape[2]}, {k.shape[2]})"
            )
        lower = attn_mask.variant == CausalVariant.LOWER_RIGHT
        return ("lower_right" if lower else "upper_left"), None
    if not isinstance(attn_mask, torch.Tensor):
        raise ValueError(
            f"attn_zoo.attention: unsupported attn_mask {type(attn_mask).__name__}; {accepted}"
        )
    batch, n_k = q.shape[0], k.shape[2]
    shape = tuple(attn_mask.shape)
    if (
        attn_mask.dtype != torch.bool
        or attn_mask.dim() != 4
        or shape[1:3] != (1, 1)
        or (shape[3] != n_k or shape[0] not in (1, batch))
    ):
        dtype = str(attn_mask.dtype).removeprefix("torch.")
        raise ValueError(
            f"attn_zoo.attention: unsupported attn_mask ({dtype}, shape {list(shape)}); {accepted}"
        )
    return "none", attn_mask[:, 0, 0, :].expand(batch, n_k).to(q.device)
