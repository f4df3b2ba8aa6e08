"""``bench compare BASELINE CANDIDATE``: a noise-aware regression gate.

Cases are matched on their key columns. A case regresses when

* its time grew by more than ``--time-tol`` *and* by more than the measured
  spread of the two runs (the sum of each run's 20th-80th percentile range),
* its peak memory grew by more than ``--mem-tol``,
* it fails equivalence (err_oracle over its dtype's tolerance), or
* its status got worse (ok became anything else), or it is missing.

Exit status: 0 clean, 1 regression, 2 bad input.
"""

from __future__ import annotations

import argparse

import pandas as pd
from rich.table import Table

from attn_zoo.bench.cases import KEY_COLUMNS
from attn_zoo.bench.console import make_console
from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.runner import TOLERANCE
from attn_zoo.bench.runs import load_run

MATCH = [c for c in KEY_COLUMNS if c != "device"]


def compare_tables(base: pd.DataFrame, cand: pd.DataFrame, time_tol: float, mem_tol: float):
    """One row per baseline case: the figures side by side and what regressed."""
    merged = base.merge(cand, on=MATCH, how="left", suffixes=("_base", "_cand"), indicator=True)
    findings = []
    for _, r in merged.iterrows():
        problems = []
        if r["_merge"] == "left_only":
            problems.append("missing from candidate")
        else:
            if r["status_base"] == "ok" and r["status_cand"] != "ok":
                problems.append(f"status ok -> {r['status_cand']}")
            err, tol = r["err_oracle_cand"], TOLERANCE.get(r["dtype"], 1e-5)
            if pd.notna(err) and err > tol:
                problems.append(f"err_oracle {err:.2g} > {tol:g}")
            t0, t1 = r["time_ms_base"], r["time_ms_cand"]
            timed = not (r["interpreted_base"] or r["interpreted_cand"])
            if timed and pd.notna(t0) and pd.notna(t1) and t0 > 0:
                spread = (r["time_ms_p80_base"] - r["time_ms_p20_base"]) + (
                    r["time_ms_p80_cand"] - r["time_ms_p20_cand"]
                )
                if t1 > t0 * (1 + time_tol) and t1 - t0 > spread:
                    problems.append(f"time +{(t1 / t0 - 1):.0%} (spread {spread:.3g} ms)")
            m0, m1 = r["peak_mem_bytes_base"], r["peak_mem_bytes_cand"]
            if (
                timed
                and pd.notna(m0)
                and pd.notna(m1)
                and m1 > m0 * (1 + mem_tol)
                and m1 - m0 > 4096
            ):
                problems.append(f"memory +{(m1 / max(m0, 1) - 1):.0%}")
        findings.append({**{c: r[c] for c in MATCH}, "row": r, "problems": problems})
    return findings


def _ratio(a, b) -> str:
    return f"{b / a:.2f}x" if pd.notna(a) and pd.notna(b) and a > 0 else "-"


def run_compare(args: argparse.Namespace) -> int:
    if args.time_tol < 0 or args.mem_tol < 0:
        raise UsageError("--time-tol and --mem-tol must be >= 0 (fractions, e.g. 0.10)")
    base, cand = load_run(args.baseline), load_run(args.candidate)
    devices = (base.meta.get("device_name"), cand.meta.get("device_name"))
    if devices[0] != devices[1] and not args.force:
        raise UsageError(
            f"runs come from different devices ({devices[0]} vs {devices[1]}); "
            "timings do not compare (pass --force to compare anyway)"
        )
    findings = compare_tables(base.table, cand.table, args.time_tol, args.mem_tol)
    table = Table(title=f"{base.label} -> {cand.label}")
    for column in ("case", "status", "time", "memory", "err_oracle", "verdict"):
        table.add_column(column)
    bad = 0
    for f in findings:
        r = f["row"]
        case = f"{f['mechanism']}/{f['impl']} N={f['seq_len']} {f['dtype']} {f['mode']}"
        bad += bool(f["problems"])
        verdict = "[red]" + "; ".join(f["problems"]) if f["problems"] else "[green]ok"
        table.add_row(
            case,
            f"{r['status_base']} -> {r.get('status_cand', '-')}",
            _ratio(r["time_ms_base"], r.get("time_ms_cand")),
            _ratio(r["peak_mem_bytes_base"], r.get("peak_mem_bytes_cand")),
            f"{r.get('err_oracle_cand', float('nan')):.1e}",
            verdict,
        )
    console = make_console()
    console.print(table)
    console.print(
        f"bench compare: {bad} regression(s) in {len(findings)} case(s) "
        f"(time tolerance {args.time_tol:.0%} beyond spread, memory {args.mem_tol:.0%})"
    )
    return 1 if bad else 0
