"""Which device and dtypes a sweep may ask for on this machine."""

from __future__ import annotations

import torch

from attn_zoo.bench.errors import UsageError

#: dtypes each device type runs (bfloat16 on CUDA only where the GPU has it).
DEVICE_DTYPES = {
    "cpu": ["float32", "float64", "float16", "bfloat16"],
    "cuda": ["float32", "float16", "bfloat16"],
}


def resolve_device(text: str) -> torch.device:
    accepted = ["auto", "cpu", "cuda"] if torch.cuda.is_available() else ["auto", "cpu"]
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: CUDA is not available on this machine; accepted here: "
            + ", ".join(accepted)
        )
    if text not in ("cpu", "cuda"):
        raise UsageError(f"--device: unknown {text!r}; accepted: {', '.join(accepted)}")
    return torch.device(text)


def device_dtypes(device: torch.device) -> list[str]:
    dtypes = list(DEVICE_DTYPES[device.type])
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtypes.remove("bfloat16")
    return dtypes
