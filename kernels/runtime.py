"""Where Triton kernels can run, decided without importing triton."""

from __future__ import annotations

import importlib.util
import os

import torch

HEAD_DIMS = (32, 64, 128)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable(device: torch.device) -> str | None:
    """None when Triton kernels run on ``device``, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if interpreting():
        return None
    return "Triton runs on the CPU only in its interpreter: pass --interpret (TRITON_INTERPRET=1)"


def triton_interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def triton_default_on(device: torch.device) -> bool:
    """In the default sweep on CUDA only: interpreter timings are not comparable."""
    return device.type == "cuda"


def triton_options() -> dict:
    """The registration options every ``triton`` implementation shares."""
    return dict(
        unavailable=triton_unavailable,
        default_on=triton_default_on,
        head_dims=HEAD_DIMS,
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        differentiable=True,
        interpreted=triton_interpreted,
    )
