"""FlexAttention, the peer of the Triton kernels (torch.nn.attention.flex_attention).

Each mechanism's ``flex`` implementation states its pattern as a ``mask_mod``
(turned into a block mask, so FlexAttention skips empty tiles) and, where the
scores change, a ``score_mod``. On CUDA the call is compiled into a fused
kernel. On the CPU it is compiled too (inductor's fused C++, forward only) where
a C++ compiler is found and the caller needs no log-sum-exp (torch's CPU path
cannot return it: lsh's rounds and compressive's zero memories merge by it);
otherwise it runs eagerly and unfused, materializing the scores. Compiled
kernels are cached by inductor in memory and on disk (across runs); the first
call of each new shape or pattern pays the compile (the harness's
``first_call_ms``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from collections.abc import Callable
from functools import cache

import torch


def flex_unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no FlexAttention (needs >= 2.5)"
    return None


def flex_default_on(device: torch.device) -> bool:
    """In the default sweep on CUDA only: on the CPU its compiles from a cold cache
    take longer than the rest of the default sweep (README, "Kernels")."""
    return device.type == "cuda"


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile serves FlexAttention on ``device``; on the CPU
    ``ATTN_ZOO_FLEX_COMPILE=0`` says no (the test suite does, to skip the compiles)."""
    if device.type == "cuda":
        return True
    if os.environ.get("ATTN_ZOO_FLEX_COMPILE", "1") == "0":
        return False
    return device.type == "cpu" and cpu_compiler() is not None


def compiles_on(device: torch.device, need_lse: bool) -> bool:
    """Whether :func:`flex` runs the attention compiled (fused) on ``device``."""
    return can_compile(device) and (device.type == "cuda" or not need_lse)


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
    """flex_attention compiled for static shapes. Every mechanism, shape and pattern
    is one more entry of the same compiled frame, so dynamo's default limit of 8
    would send later calls back to eager without a word: raise it, and fail loudly
    if it is ever hit."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):  # fmt: skip
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4096))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


@cache
def _compiled_block_mask() -> Callable:
    """create_block_mask compiled, as its ``_compile=True`` did (torch 2.13 deprecates
    the flag for this form)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_mod: Callable | None = None,
    score_mod: Callable | None = None,
    *,
    per_head: bool = False,
    keep: torch.Tensor | None = None,
    need_lse: bool = True,
    gpu_options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FlexAttention of q [B, H, Nq, D] over k, v [B, H, Nk, D] with a block mask
    built from ``mask_mod(b, h, i, j)``; ``per_head``: the mask depends on b, h;
    ``keep`` [B, Nk] or [B, H, Nk] (bool, in k's order) hides padded keys;
    ``gpu_options``: FlexAttention's ``kernel_options`` on CUDA (the CPU has its own).
    Returns (out, lse [B, H, Nq] in natural log, -inf for a row that sees nothing);
    lse is None when not ``need_lse`` (which lets the CPU run it compiled)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, n_q, _ = q.shape
    if q.device.type == "cpu" and not torch.is_grad_enabled():  # CPU flex refuses inputs
        q, k, v = q.detach(), k.detach(), v.detach()  # that require grad even here
    if keep is not None:
        mask_mod, per_head = _with_key_padding(mask_mod, keep), True
    block_mask = None
    if mask_mod is not None:
        batch, heads = (b, h) if per_head else (None, None)
        # compiled, the mask is evaluated block by block instead of as an N x N tensor
        # (N = 8192 on the CPU: 0.09 s and no N x N bytes against 1.1 s and about 1 GB)
        make = _compiled_block_mask() if can_compile(q.device) else create_block_mask
        block_mask = make(mask_mod, batch, heads, n_q, k.shape[2], device=q.device)
    options = dict(score_mod=score_mod, block_mask=block_mask, return_lse=need_lse)
    if gpu_options and q.device.type == "cuda":
        options["kernel_options"] = gpu_options
    if compiles_on(q.device, need_lse):  # (on the CPU: inference only, see flex_differentiable)
        result = _compiled()(q, k, v, **options)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": known, see above
            result = flex_attention(q, k, v, **options)
    if not need_lse:
        return result, None
    out, lse = result
    return out, lse.float()
