"""Compile the flash core ahead of time for an NVIDIA target, without a GPU.

``python -m attn_zoo.kernels.compile_check [--arch 90] [--dtypes fp16,bf16,fp32]
[--dims 32,64,128]`` runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the
bundled ptxas) for every combination of compile-time flags a mechanism
launches, and checks each kernel's shared memory against the sm_90 limit (a
launch would fail above it), so a kernel that only works in the interpreter
fails here. It needs no driver; it cannot replace running on the GPU.
TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

#: The flag sets the mechanisms launch (kernels/<family>.py), by name.
VARIANTS: dict[str, dict[str, bool | int]] = {
    "dense / band": {},
    "strided near, bidirectional": {"SELF": True},
    "strided columns": dict.fromkeys(
        ("GATHER_Q", "GATHER_K", "SCATTER_O", "GROUPS", "ACCUMULATE"), True
    ),
    "fixed own block, compressive raw": {"WINDOW": True},
    "fixed summaries": {"GATHER_K": True, "WINDOW": True, "ACCUMULATE": True},
    "compressive slots": {"WINDOW": True, "ACCUMULATE": True},
    "adaptive span, causal": {"RAMP": True},
    "adaptive span, bidirectional": {"RAMP": True, "SYMMETRIC": True, "SELF": True},
    "xl": {"WINDOW": True, "REL_TERM": True},
    "lsh buckets": dict.fromkeys(
        ("GATHER_Q", "GATHER_K", "SCATTER_O", "WINDOW", "GROUPS", "SELF", "ACCUMULATE"), True
    )
    | {"DUP": 1},
    "lsh across buckets": dict.fromkeys(
        ("GATHER_Q", "GATHER_K", "SCATTER_O", "WINDOW", "SELF", "ACCUMULATE"), True
    )
    | {"DUP": 2},
    "lsh causal": dict.fromkeys(
        ("GATHER_Q", "GATHER_K", "SCATTER_O", "GROUPS", "SELF", "ACCUMULATE"), True
    )
    | {"DUP": 3},
    "routing causal clusters": dict.fromkeys(("GATHER_Q", "GATHER_K", "SCATTER_O", "GROUPS"), True),
    "routing member lists": dict.fromkeys(("GATHER_Q", "GATHER_K", "WINDOW"), True),
}
FLAGS = ("GATHER_Q", "GATHER_K", "SCATTER_O", "WINDOW", "GROUPS", "SELF", "RAMP", "SYMMETRIC",
         "REL_TERM", "DUP", "ACCUMULATE")  # fmt: skip
POINTERS = {"LSE": "fp32", "U": "fp32", "VB": "fp32", "SPANS": "fp32"} | dict.fromkeys(
    ("QIDX", "KIDX", "QGRP", "KGRP", "RGRP", "RRANK", "FULL", "FULL_COUNT", "PARTIAL",
     "PARTIAL_COUNT"), "i32"
)  # fmt: skip
SHARED_LIMIT = 227 * 1024  # per block on sm_90 (H100/H200)
INT64 = {"lo", "hi", "offset", "seg_len", "seg_step", "win_lo", "win_hi"}
FLOAT = {"self_bias", "ramp", "qk_scale"}


def signature(kernel, dtype: str) -> dict[str, str]:
    sig = {}
    for name, param in zip(kernel.arg_names, kernel.params, strict=True):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in POINTERS or name in ("Q", "K", "V", "O", "REL"):
            sig[name] = "*" + POINTERS.get(name, dtype)
        else:
            sig[name] = "i64" if name in INT64 else "fp32" if name in FLOAT else "i32"
    return sig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_zoo.kernels.compile_check")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32")
    parser.add_argument("--dims", default="32,64,128")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from attn_zoo.kernels.flash import _flash_fwd, block_size

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype in args.dtypes.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            for name, flags in VARIANTS.items():
                block = block_size(dim)
                constants = {flag: flags.get(flag, 0 if flag == "DUP" else False)
                             for flag in FLAGS}  # fmt: skip
                constants |= dict(HEAD_DIM=dim, BLOCK_M=block, BLOCK_N=block,
                                  PRECISION="ieee" if dtype == "fp32" else None)  # fmt: skip
                start = time.perf_counter()
                try:
                    source = ASTSource(_flash_fwd, signature(_flash_fwd, dtype), constants)
                    compiled = triton.compile(source, target=target)
                    shared = compiled.metadata.shared
                    status = f"ok, shared memory {shared / 1024:.0f} KiB"
                    if shared > SHARED_LIMIT:
                        failures += 1
                        status = f"FAILED: needs {shared / 1024:.0f} KiB of shared memory"
                except Exception as error:  # report every variant, then fail
                    failures += 1
                    status = f"FAILED: {type(error).__name__}: {str(error)[:400]}"
                took = time.perf_counter() - start
                print(f"sm_{args.arch} {dtype} d={dim} {name}: {status} ({took:.1f} s)", flush=True)
    print(f"compile_check: triton {triton.__version__}, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
