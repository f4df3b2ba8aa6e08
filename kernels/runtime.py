"""Where Triton kernels can run, decided without importing triton."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

HEAD_DIMS = (32, 64, 128)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_installed() -> bool:
    """Looked up once per process: lsh's plan asks at every call."""
    return importlib.util.find_spec("triton") is not None


def triton_unavailable(device: torch.device) -> str | None:
    """None when Triton kernels run on ``device``, else why not."""
    if not triton_installed():
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


def tuned_runner(kind: str):
    """The ``runner`` of a ``triton`` impl: its call through the autotuner on CUDA
    (:func:`attn_zoo.kernels.tuning.tuned_call`) with the mechanism's kind."""

    def run(mech, fn, q, k, v, plan):
        from attn_zoo.kernels.tuning import tuned_call

        config = {name: value for name, value in mech.describe().items() if name != "mechanism"}
        return tuned_call(kind, mech.name, config, plan.causal, q,
                          lambda: fn(mech, q, k, v, plan))  # fmt: skip

    return run


def triton_options(kind: str = "plain") -> dict:
    """The registration options every ``triton`` implementation shares; ``kind`` (of
    :data:`attn_zoo.kernels.tuning.KINDS`) picks the autotuner's candidate tiles."""
    return dict(
        unavailable=triton_unavailable,
        default_on=triton_default_on,
        head_dims=HEAD_DIMS,
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        differentiable=True,
        interpreted=triton_interpreted,
        runner=tuned_runner(kind),
    )
