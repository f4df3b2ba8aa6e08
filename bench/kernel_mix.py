"""What each mechanism's forward costs per score on the core as it launches: the
compile report's walks weighted by where the mechanism's scores fall.

Every kernel of the core walks a query block's *full* key blocks (no element
mask) and then its *masked* ones (with a bias on the pair i == j, the masked
blocks holding that pair last, in an *own* walk), and the loops cost very
differently per score (``reports/kernels-sm90/compile.md``:
``warp_instr_per_4k``, ``masked_per_4k``, ``own_per_4k``). A causal dense
layout has one masked block per row of blocks; lsh's and the strided columns'
have nothing else. So the figure a mechanism is judged by is

    sum over its launches and walks of (scores in the walk x the walk's figure)
    / (all its scores)

in sm_90 SASS warp-instructions per 4,096 scores, each launch compiled with its
own flags and tile (:func:`attn_zoo.kernels.compile_check.compile_variant`) and
its scores counted from the block layouts it builds at the given length
(:func:`attn_zoo.kernels.dry_run.dry_run`: no GPU, no launch). The target beside
it: within 1.6x of dense attention with the same causality, at the same head_dim.

The backward beside it (``--passes fwd,bwd``, the default): its dQ pass walks the
forward's blocks, its dK/dV pass those whose keys get a gradient (stop-gradient
memories get none), each with its own figures; ``bwd_per_4k`` is both passes'
warp-instructions per 4,096 of the forward's scores, ``bwd_ratio`` against dense's
backward (no target: a reference for the GPU's timings).

``python -m attn_zoo.bench.kernel_mix [--seq-len 8192] [--dims 64,128] [--heads 8]
[--dtype fp16] [--passes fwd,bwd] [--out reports/kernels-sm90]`` writes
``mechanisms.json`` and ``mechanisms.md``. TRITON_INTERPRET must be unset (the
compiler is needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import attn_zoo
from attn_zoo.kernels.dry_run import Planned, dry_run

#: Target: a mechanism's weighted figure within this factor of dense attention's.
LIMIT = 1.6
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

PASSES = ("fwd", "bwd")
#: (full walk, masked walk, own walk) warp-instructions per 4,096 scores of one launch's
#: kernel (``fwd``, ``bwd_dq``, ``bwd_dkdv``; None for a walk the kernel does not have).
Figures = Callable[[Planned, int, str, str], tuple[int | None, int | None, int | None]]


def launches(name: str, causal: bool, n: int, head_dim: int, heads: int,
             dtype: torch.dtype) -> list[Planned]:  # fmt: skip
    """The forward launches of mechanism ``name``'s triton impl (paper-default
    config) on one sequence of ``n`` tokens, as a GPU would run them."""
    mech = attn_zoo.get(name)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=generator).to(dtype)
               for _ in range(3))  # fmt: skip
    plan = mech.plan(q, k, v, causal)
    with torch.no_grad(), dry_run() as found:
        mech.impl("triton").run(mech, q, k, v, plan)
    return found


def compiled_figures(arch: int = 90) -> Figures:
    """Figures from compiling each launch's flags and tile (cached per variant)."""
    from attn_zoo.kernels.compile_check import compile_variant

    cache: dict = {}

    def figures(launch: Planned, head_dim: int, dtype: str, kernel: str = "fwd") -> tuple:
        key = (kernel, launch.flags, launch.tile, head_dim, dtype)
        if key not in cache:
            row = compile_variant(kernel, dict(launch.flags), dtype, head_dim, arch, launch.tile)
            cache[key] = tuple(row.get(f) for f in ("warp_instr_per_4k", "masked_per_4k",
                                                    "own_per_4k"))  # fmt: skip
        return cache[key]

    return figures


def _cost(found: list[Planned], figures: Figures, head_dim: int, dtype: str,
          kernel: str) -> float:  # fmt: skip
    """Warp-instructions x 4,096 of ``kernel`` over the launches: each walk's scores times
    its figure (dK/dV's walks: the pairs whose keys get a gradient)."""
    cost = 0.0
    for launch in found:
        walks = {"fwd": launch.forward_walks, "bwd_dq": launch.walks,
                 "bwd_dkdv": launch.key_walks}[kernel]  # fmt: skip
        for scores, figure in zip(walks, figures(launch, head_dim, dtype, kernel), strict=True):
            if scores and figure is None:  # a walk the SASS analysis did not find
                raise ValueError(f"kernel_mix: no {kernel} instruction count for a walk of "
                                 f"{launch}")  # fmt: skip
            cost += scores * (figure or 0)
    return cost


def weighted(found: list[Planned], figures: Figures, head_dim: int, dtype: str,
             backward: bool = False) -> dict:  # fmt: skip
    """The scores in each walk and the weighted warp-instructions per 4,096 scores
    (``masked_share``: the scores in masked blocks, own ones included); with
    ``backward``, both backward passes' per 4,096 of the forward's scores."""
    full = sum(launch.full_scores for launch in found)
    masked = sum(launch.masked_scores + launch.own_scores for launch in found)
    total = full + masked
    row = {"launches": len(found), "scores": total,
           "masked_share": round(masked / total, 3) if total else None,
           "per_4k": round(_cost(found, figures, head_dim, dtype, "fwd") / total)
           if total else None}  # fmt: skip
    if backward:
        cost = sum(_cost(found, figures, head_dim, dtype, k) for k in ("bwd_dq", "bwd_dkdv"))
        row["bwd_per_4k"] = round(cost / total) if total else None
    return row


def mix_rows(names: list[str], n: int, dims: list[int], heads: int, dtype: str,
             figures: Figures, backward: bool = False) -> list[dict]:  # fmt: skip
    """One row per mechanism, causality and head_dim, with the ratio to dense (and, with
    ``backward``, the backward's figure and its ratio to dense's backward)."""
    rows = []
    for dim in dims:
        for causal in (True, False):
            dense: dict = {}
            for name in ["dense", *(m for m in names if m != "dense")]:
                found = launches(name, causal, n, dim, heads, DTYPES[dtype])
                row = {"mechanism": name, "causal": causal, "head_dim": dim, "seq_len": n,
                       "dtype": dtype} | weighted(found, figures, dim, dtype, backward)  # fmt: skip
                if name == "dense":
                    dense = row
                row["ratio"] = _ratio(row, dense, "per_4k")
                row["met"] = None if name == "dense" or row["ratio"] is None else (
                    row["ratio"] <= LIMIT)  # fmt: skip
                if backward:
                    row["bwd_ratio"] = _ratio(row, dense, "bwd_per_4k")
                if name in names:
                    rows.append(row)
    return rows


def _ratio(row: dict, dense: dict, figure: str) -> float | None:
    """``row``'s ``figure`` over dense's, to two decimals (None without both)."""
    if not row.get(figure) or not dense.get(figure):
        return None
    return round(row[figure] / dense[figure], 2)


def write(rows: list[dict], out: Path, arch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "mechanisms.json").write_text(json.dumps(rows, indent=1) + "\n")
    n = rows[0]["seq_len"] if rows else 0
    lines = [
        f"# Each mechanism on the core, sm_{arch}: its walks, weighted (forward; backward beside)",
        "",
        f"What a forward of each mechanism (paper-default config, N = {n:,}, one batch, "
        f"{rows[0]['dtype'] if rows else ''}) launches, found without a GPU "
        "(`python -m attn_zoo.bench.kernel_mix`): every launch compiled with its own flags "
        "and tile, its full-block walk and masked-block walk weighted by the scores each "
        "visits (and the masked blocks holding a pair i == j that a self bias marks, "
        "walked apart). `masked_share`: the scores in masked blocks; `per_4k`: SASS "
        "warp-instructions per 4,096 scores; `ratio`: to dense attention with the same "
        f"causality and head_dim; target within {LIMIT}x. A static count, not a timing.",
    ]
    backward = any("bwd_per_4k" in r for r in rows)
    columns = ["mechanism", "causal", "head_dim", "launches", "masked_share", "per_4k", "ratio",
               "met"]  # fmt: skip
    if backward:
        lines += ["", "`bwd_per_4k`: the backward's dQ and dK/dV passes together, per 4,096 of "
                  "the forward's scores (dK/dV walks the pairs whose keys get a gradient: "
                  "stop-gradient memories get none); `bwd_ratio`: to dense's backward with "
                  "the same causality and head_dim (no target)."]  # fmt: skip
        columns += ["bwd_per_4k", "bwd_ratio"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        met = "" if r["met"] is None else "yes" if r["met"] else "no"
        share = "" if r["masked_share"] is None else f"{r['masked_share']:.0%}"
        cells = [r["mechanism"], r["causal"], r["head_dim"], r["launches"], share, r["per_4k"],
                 _times(r["ratio"]), met]  # fmt: skip
        if backward:
            cells += [r.get("bwd_per_4k", ""), _times(r.get("bwd_ratio"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (out / "mechanisms.md").write_text("\n".join(lines) + "\n")


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


#: Where the compile report and this table are committed, from the repository root.
REPORT_FOLDER = Path("reports/kernels-sm90")


def report_section(out: Path, folder: Path = REPORT_FOLDER) -> list[str]:
    """``bench report``'s section on the kernels as compiled for sm_90: links to the
    compile report and this table (relative to the report's folder ``out``), and the
    table's figures; how to write them when they are missing."""
    title = ["## Kernels compiled for sm_90 (no GPU)", ""]
    table = folder / "mechanisms.json"
    if not table.is_file():
        return [*title, f"No {table} here: `python -m attn_zoo.kernels.compile_check` and "
                "`python -m attn_zoo.bench.kernel_mix` write it.", ""]  # fmt: skip
    try:
        rows = json.loads(table.read_text())
        backward = any("bwd_per_4k" in r for r in rows)
        shown = [f"| {r['mechanism']} | {r['causal']} | {r['head_dim']} | "
                 f"{r['masked_share']:.0%} | {r['per_4k']} | {_times(r['ratio'])} |"
                 + (f" {r['bwd_per_4k']} | {_times(r['bwd_ratio'])} |" if backward else "")
                 for r in rows]  # fmt: skip
    except (ValueError, KeyError, TypeError) as error:
        return [*title, f"{table} is unreadable ({type(error).__name__}); rewrite it with "
                "`python -m attn_zoo.bench.kernel_mix`.", ""]  # fmt: skip
    here = Path(os.path.relpath(folder, out))
    links = (f"Static SASS counts, not timings: [compile report]({here / 'compile.md'}) "
             f"(every variant's walks), [each mechanism's launches weighted]"
             f"({here / 'mechanisms.md'}) (target within {LIMIT}x of dense with the same "
             "causality).")  # fmt: skip
    header = ["| mechanism | causal | head_dim | masked_share | per_4k | ratio |"
              + (" bwd_per_4k | bwd_ratio |" if backward else ""),
              "|---|---|---|---|---|---|" + ("---|---|" if backward else "")]  # fmt: skip
    return [*title, links, "", *header, *shown, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_zoo.bench.kernel_mix")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", default="fp16", help="of " + ", ".join(DTYPES))
    parser.add_argument("--mechanisms", default="all", help="comma-separated, or all")
    parser.add_argument("--passes", default="fwd,bwd", help="of " + ", ".join(PASSES))
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", default="reports/kernels-sm90")
    args = parser.parse_args(argv)
    try:
        names = attn_zoo.registry.pick(args.mechanisms)
    except ValueError as error:
        print(f"kernel_mix: {error}")
        return 2
    if args.dtype not in DTYPES:
        print(f"kernel_mix: unknown dtype {args.dtype!r}; accepted: {', '.join(DTYPES)}")
        return 2
    passes = args.passes.split(",")
    if "fwd" not in passes or not set(passes) <= set(PASSES):
        print(f"kernel_mix: passes {args.passes!r}; accepted: fwd, or fwd,bwd")
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_mix: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    dims = [int(d) for d in args.dims.split(",")]
    rows = mix_rows(names, args.seq_len, dims, args.heads, args.dtype,
                    compiled_figures(args.arch), "bwd" in passes)  # fmt: skip
    write(rows, Path(args.out), args.arch)
    missed = [r for r in rows if r["met"] is False]
    print(f"kernel_mix: {len(rows)} rows, {len(missed)} past {LIMIT}x dense; "
          f"report in {args.out}/mechanisms.md")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
