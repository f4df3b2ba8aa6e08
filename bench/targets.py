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


#: Issue #15's targets for each reference against its peer, measured in one run.
PEER_TIME_TARGET = 1.25
PEER_MEMORY_TARGET = 1.0

PEERS_TEXT = (
    f"time: reference time / peer time (target <= {PEER_TIME_TARGET}); memory: reference peak "
    f"/ peer peak (target <= {PEER_MEMORY_TARGET:g}); same run, same case. A peer computes "
    "the package's variant; its differences from the mechanism are in the note."
)


def peer_targets(table: pd.DataFrame) -> pd.DataFrame:
    """One row per case measured by both a mechanism's reference and its peer: the
    two times and peaks, their ratios and whether the targets are met."""
    ok = table[(table.status == "ok") & ~table.interpreted.astype(bool)]
    peer = _by_case(ok, "peer")
    if peer.empty:
        return pd.DataFrame()
    ref = _by_case(ok, "reference").reindex(peer.index)
    time, memory = ref.time_ms / peer.time_ms, ref.peak_mem_bytes / peer.peak_mem_bytes
    out = pd.DataFrame(
        {
            "ref_ms": ref.time_ms,
            "peer_ms": peer.time_ms,
            "time": time,
            "time_met": (time <= PEER_TIME_TARGET).where(time.notna()),
            "ref_MiB": ref.peak_mem_bytes / 2**20,
            "peer_MiB": peer.peak_mem_bytes / 2**20,
            "memory": memory,
            "memory_met": (memory <= PEER_MEMORY_TARGET).where(memory.notna()),
            "peer_note": peer.note.fillna("").str.removeprefix("no err_oracle: "),
        }
    )
    return out.reset_index()
