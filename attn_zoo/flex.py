"""FlexAttention, the peer of the Triton kernels (torch.nn.attention.flex_attention).

Each mechanism's ``flex`` implementation states its pattern as a ``mask_mod``
(turned into a block mask, so FlexAttention skips empty tiles) and, where the
scores change, a ``score_mod``. On CUDA the call is compiled into a fused
kernel; on the CPU it runs eagerly and unfused (it materializes the scores),
so it is not in the CPU default sweep.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from functools import cache

import torch


def flex_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no FlexAttention (needs >= 2.5)"
    return None


def flex_default_on(device: torch.device) -> bool:
    """In the default sweep on CUDA only: eager CPU flex is not the fused kernel."""
    return device.type == "cuda"


def flex_differentiable(device: torch.device) -> bool:
    """FlexAttention has no backward pass on the CPU."""
    return device.type != "cpu"


def flex_options(differentiable: bool = True) -> dict:
    """The registration options every ``flex`` implementation shares."""
    return dict(
        unavailable=flex_unavailable,
        default_on=flex_default_on,
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        differentiable=flex_differentiable if differentiable else False,
    )


def _with_key_padding(mask_mod: Callable | None, keep: torch.Tensor) -> Callable:
    """``mask_mod`` that also hides the keys ``keep`` marks False."""
    kept = keep if keep.dim() == 3 else keep[:, None, :]

    def padded(b, h, i, j):
        visible = kept[b, h if kept.shape[1] > 1 else 0, j]
        return visible if mask_mod is None else visible & mask_mod(b, h, i, j)

    return padded


@cache
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: Callable | None = None,
    score_mod: Callable | None = None,
    *,
    per_head: bool = False,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention of q [B, H, Nq, D] over k, v [B, H, Nk, D] with a block mask
    built from ``mask_mod(b, h, i, j)``; ``per_head``: the mask depends on b, h;
    ``keep`` [B, Nk] or [B, H, Nk] (bool, in k's order) hides padded keys.
    Returns (out, lse [B, H, Nq] in natural log, -inf for a row that sees nothing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, n_q, _ = q.shape
    if q.device.type == "cpu" and not torch.is_grad_enabled():  # CPU flex refuses inputs
        q, k, v = q.detach(), k.detach(), v.detach()  # that require grad even here
    if keep is not None:
        mask_mod, per_head = _with_key_padding(mask_mod, keep), True
    block_mask = None
    if mask_mod is not None:
        batch, heads = (b, h) if per_head else (None, None)
        block_mask = create_block_mask(mask_mod, batch, heads, n_q, k.shape[2], device=q.device)
    if q.device.type == "cuda":
        out, lse = _compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": known, see above
            out, lse = flex_attention(
                q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True
            )
    return out, lse.float()
