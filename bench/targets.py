"""The kernel figures of one run, each a ratio of two rows measured in that run
on the same device, shape, dtype and mode (issue #4's targets):

* ``vs_sdpa``: dense triton's speed over sdpa's (target >= 0.9 for N >= 2048);
* ``tflops_vs_dense``: a mechanism's effective TFLOP/s (useful FLOPs / time)
  over dense triton's at the same N (target >= 0.8);
* ``vs_flex``: triton's speed over flex's for the same mechanism (target >= 1);
* ``mem_vs_qkvo``: (peak above the inputs + the inputs) / bytes of q, k, v and
  o (target <= 1.25 plus O(N)).

Interpreter rows and rows that are not ``ok`` never enter.
"""

from __future__ import annotations

import pandas as pd

ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
SHAPE = ["device", "dtype", "batch", "heads", "head_dim", "seq_len", "causal", "mode"]


def _by_case(ok: pd.DataFrame, impl: str) -> pd.DataFrame:
    return ok[ok.impl == impl].set_index([*SHAPE, "mechanism"])


def kernel_targets(table: pd.DataFrame) -> pd.DataFrame:
    """One row per measured triton case with its ratios (NaN where a peer is missing)."""
    ok = table[(table.status == "ok") & ~table.interpreted.astype(bool)]
    triton = _by_case(ok, "triton")
    if triton.empty:
        return pd.DataFrame()
    flop_s = triton.flops / (triton.time_ms * 1e-3)
    mechanisms = flop_s.index.get_level_values("mechanism")
    dense = flop_s.xs("dense", level="mechanism") if "dense" in mechanisms else flop_s.iloc[:0]
    shape = triton.index.to_frame(index=False)
    io = shape.batch * shape.heads * shape.seq_len * shape.head_dim * shape.dtype.map(ITEMSIZE)
    out = pd.DataFrame(
        {
            "tflops": flop_s / 1e12,
            "tflops_vs_dense": flop_s / dense.reindex(triton.index.droplevel("mechanism")).values,
            "vs_sdpa": _by_case(ok, "sdpa").time_ms.reindex(triton.index) / triton.time_ms,
            "vs_flex": _by_case(ok, "flex").time_ms.reindex(triton.index) / triton.time_ms,
            "mem_vs_qkvo": (triton.peak_mem_bytes + 3 * io.values) / (4 * io.values),
        }
    )
    return out.reset_index()
