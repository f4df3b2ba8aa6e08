"""Hugging Face transformers: any mechanism as an attention implementation.

    from attn_zoo.integrations.transformers import register
    name = register("sparse_strided", stride=64)          # -> "attn_zoo_sparse_strided"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    # or, for a model already built: model.set_attn_implementation(name)

``register`` adds the function to transformers' ``AttentionInterface`` and
asks its mask builder for SDPA's boolean masks, which the function reads back
as (causal alignment, key padding): grouped-query attention through the
module's key/value groups, padding from the attention mask, the scale from the
module (``scaling``), decode steps of a KV cache as SDPA's lower-right causal
alignment. Masks that are not causal plus key padding (sliding windows,
packed sequences) are a clear error, never ignored. transformers is an
optional extra (``pip install attn-zoo[hf]``), imported only here.
"""

from __future__ import annotations

from typing import Any

import torch

from attn_zoo.functional import attend
from attn_zoo.registry import get


def register(
    mechanism: str, *, impl: str = "auto", params: dict | None = None, **config: Any
) -> str:
    """Register ``mechanism`` (with its config) in transformers' attention
    interface as ``"attn_zoo_<mechanism>"`` and return that name. ``params``: the
    mechanism's learnable tensors (:meth:`Mechanism.learnable`), else seeded ones."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError as error:
        raise ImportError(
            "attn_zoo.integrations.transformers needs transformers: pip install 'attn-zoo[hf]'"
        ) from error
    mech = get(mechanism, **config)  # a bad name or config fails here, not in the model
    name = f"attn_zoo_{mechanism}"

    def attn_zoo_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if kwargs.get("output_attentions"):
            raise ValueError(f"{name}: output_attentions is not available; use eager attention")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        alignment, keep = read_mask(attention_mask, bool(causal), query, key, who=name)
        out = attend(mech, query, key, value, causal=alignment, keep=keep, dropout_p=dropout,
                     scale=scaling, enable_gqa=key.shape[1] != query.shape[1],
                     impl=impl, params=params)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attn_zoo_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def read_mask(
    mask: torch.Tensor | None, causal: bool, query: torch.Tensor, key: torch.Tensor, *, who: str
) -> tuple[str, torch.Tensor | None]:
    """transformers' 4-D mask [B, 1|H, Lq, Lk] (bool, True = attend, or additive
    float) as (alignment, key padding [B, Lk]); None: no padding."""
    n_q, n_k = query.shape[2], key.shape[2]
    alignment = "lower_right" if causal else "none"  # the queries are the last positions
    if mask is None:
        return alignment, None
    if mask.dim() != 4 or mask.shape[-2:] != (n_q, n_k):
        raise ValueError(
            f"{who}: attention mask of shape {list(mask.shape)}; want [B, 1, {n_q}, {n_k}]"
        )
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    visible = visible[:, 0].expand(query.shape[0], n_q, n_k)
    keep = visible.any(dim=1)  # a key some query sees is not padding
    expected = keep[:, None, :].expand(-1, n_q, -1)
    if causal:
        expected = expected & torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).tril(
            n_k - n_q
        )
    rows = expected.any(-1, keepdim=True)  # rows with no key may be filled in by transformers
    if not torch.equal(visible & rows, expected):
        raise ValueError(
            f"{who}: the attention mask is not {'causal plus ' if causal else ''}key padding "
            f"(sliding windows and packed sequences are not supported)"
        )
    return alignment, keep if not bool(keep.all()) else None
