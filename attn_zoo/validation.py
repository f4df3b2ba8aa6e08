"""Input checks shared by every mechanism: one clear ValueError per problem."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class Unsupported(ValueError):
    """An implementation cannot honor this configuration or input (a peer package that
    cannot express the mechanism's config, for instance): raised, never a silent
    approximation; ``bench run`` records it as a skipped row with the message."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, self_attention: bool, who: str
) -> None:
    """Raise ValueError naming the first problem with (q, k, v)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{who}: {name} must be 4-D [batch, heads, seq, head_dim], "
                f"got shape {tuple(t.shape)}"
            )
        if t.dtype not in DTYPES.values():
            raise ValueError(
                f"{who}: unsupported dtype {dtype_name(t.dtype)} for {name}; "
                f"accepted: {', '.join(DTYPES)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"{who}: q, k, v dtypes differ ({dtype_name(q.dtype)}, {dtype_name(k.dtype)}, "
            f"{dtype_name(v.dtype)}); they must match"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{who}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
        )
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(
            f"{who}: q, k, v must share batch and heads, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{who}: k and v need the same sequence length, got {k.shape[2]} and {v.shape[2]}"
        )
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(
            f"{who}: q, k, v need the same head_dim, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}"
        )
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"{who}: empty input, shapes {tuple(q.shape)}, {tuple(k.shape)}")
    if self_attention and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{who} is self-attention: q and k need the same sequence length, "
            f"got {q.shape[2]} and {k.shape[2]}"
        )


def check_head_dim(head_dim: int, accepted: tuple[int, ...] | None, *, who: str) -> None:
    if accepted is not None and head_dim not in accepted:
        raise ValueError(
            f"{who}: unsupported head_dim {head_dim}; accepted: {', '.join(map(str, accepted))}"
        )


def check_key_padding(mask, batch: int, n_k: int, device, *, who: str) -> None:
    """A key-padding mask is bool [batch, n_k] on the inputs' device, True = attend."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{who}: key_padding must be a bool tensor [batch, n_k], True = attend")
    if tuple(mask.shape) != (batch, n_k):
        raise ValueError(
            f"{who}: key_padding must have shape [batch, n_k] = [{batch}, {n_k}], "
            f"got {list(mask.shape)}"
        )
    if mask.device != torch.device(device):
        raise ValueError(f"{who}: key_padding is on {mask.device}, the inputs on {device}")
