"""``bench compare BASELINE CANDIDATE``: a regression gate that holds on a noisy
machine.

Cases are matched strictly on their key columns: a duplicated case in either
run is an error (exit 2); a case missing from the candidate is a regression; a
case only in the candidate is listed as new. A case regresses when

* **time**: the candidate is slower at the fast end of its samples, and
  surely so: the ratio of the runs' 10th-percentile times is above
  1 + ``--time-tol``, and its one-sided 95% bootstrap lower bound (both runs'
  samples resampled 2,000 times, seeded) is above 1. On a shared machine load
  only adds time, so the fast end moves least between two runs of the same
  code (measured on this project's 2-core machine: the median moved by up to
  24% between two identical sweeps, the 10th percentile by far less), while a
  real slowdown moves every sample. A single noisy repeat cannot flag a case.
  Rows without samples (older runs) fall back to the median ratio beyond the
  sum of both 20th-80th percentile spreads;
* **memory**: peak memory grew by more than ``--mem-tol`` and by more than
  256 KiB (the CPU's resident-set figure moves by ~100 KiB between runs);
* **status**: it was ok and is not, or err_oracle newly exceeds its tolerance.

A run compared with itself is clean whatever its statuses. Every flagged row
prints why. Exit status: 0 clean, 1 regression, 2 bad input.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table

from attn_zoo.bench.cases import KEY_COLUMNS
from attn_zoo.bench.console import make_console
from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.runner import TOLERANCE
from attn_zoo.bench.runs import load_run

MATCH = [c for c in KEY_COLUMNS if c != "device"]
BOOTSTRAP = 2000
LOWER, UPPER = 0.05, 0.95  # the one-sided 95% lower bound, and its mirror
FAST_END = 0.10  # the quantile of each run's samples that is compared
MEMORY_FLOOR = 256 * 1024  # bytes: a smaller growth is measurement noise


def samples(row: pd.Series, suffix: str) -> np.ndarray:
    """A row's timing samples (ms), from the samples column."""
    text = row.get(f"time_samples_ms{suffix}")
    if not isinstance(text, str) or not text.strip():
        return np.empty(0)
    return np.array([float(x) for x in text.split()])


def ratio_interval(
    base: np.ndarray, cand: np.ndarray, rng: np.random.Generator, q: float = FAST_END
) -> tuple[float, float, float]:
    """(ratio of the runs' q-quantiles, 5th and 95th percentiles of its bootstrap
    distribution)."""
    ratio = float(np.quantile(cand, q) / np.quantile(base, q))
    b = np.quantile(rng.choice(base, (BOOTSTRAP, len(base))), q, axis=1)
    c = np.quantile(rng.choice(cand, (BOOTSTRAP, len(cand))), q, axis=1)
    lower, upper = np.quantile(c / b, [LOWER, UPPER])
    return ratio, float(lower), float(upper)


def _duplicates(table: pd.DataFrame, which: str) -> None:
    dup = table[table.duplicated(MATCH, keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise UsageError(
            f"{which} has {len(dup)} rows for repeated cases (e.g. {first.mechanism}/"
            f"{first.impl} N={first.seq_len} {first.dtype} {first.mode}); each case must "
            f"appear once"
        )


def _time_problem(r: pd.Series, time_tol: float, rng) -> str | None:
    t0, t1 = r["time_ms_base"], r["time_ms_cand"]
    if pd.isna(t0) or pd.isna(t1) or t0 <= 0:
        return None
    a, b = samples(r, "_base"), samples(r, "_cand")
    if len(a) >= 2 and len(b) >= 2:
        ratio, lower, upper = ratio_interval(a, b, rng)
        if ratio > 1 + time_tol and lower > 1:
            return (
                f"time x{ratio:.2f} at the fast end (10th percentiles; 90% interval "
                f"{lower:.2f}-{upper:.2f}, above 1; {len(a)} vs {len(b)} samples)"
            )
        return None
    spread = (r["time_ms_p80_base"] - r["time_ms_p20_base"]) + (
        r["time_ms_p80_cand"] - r["time_ms_p20_cand"]
    )
    if t1 > t0 * (1 + time_tol) and t1 - t0 > spread:
        return f"time x{t1 / t0:.2f} beyond the spread {spread:.3g} ms (no samples recorded)"
    return None


def compare_tables(base: pd.DataFrame, cand: pd.DataFrame, time_tol: float, mem_tol: float):
    """One finding per case of either run: the figures side by side, what regressed."""
    _duplicates(base, "the baseline")
    _duplicates(cand, "the candidate")
    merged = base.merge(cand, on=MATCH, how="outer", suffixes=("_base", "_cand"), indicator=True)
    rng = np.random.default_rng(0)
    findings = []
    for _, r in merged.iterrows():
        problems, notes = [], []
        if r["_merge"] == "left_only":
            problems.append("missing from the candidate")
        elif r["_merge"] == "right_only":
            notes.append("new in the candidate")
        else:
            if r["status_base"] == "ok" and r["status_cand"] != "ok":
                why = f": {r['note_cand']}" if r.get("note_cand") else ""
                problems.append(f"status ok -> {r['status_cand']}{why}")
            tol = TOLERANCE.get(r["dtype"], 1e-5)
            e0, e1 = r["err_oracle_base"], r["err_oracle_cand"]
            if pd.notna(e1) and e1 > tol and not (pd.notna(e0) and e0 > tol):
                problems.append(f"err_oracle {e1:.2g} above the {r['dtype']} tolerance {tol:g}")
            timed = not (r["interpreted_base"] or r["interpreted_cand"])
            both_ok = r["status_base"] == "ok" and r["status_cand"] == "ok"
            slower = _time_problem(r, time_tol, rng) if timed and both_ok else None
            if slower:
                problems.append(slower)
            m0, m1 = r["peak_mem_bytes_base"], r["peak_mem_bytes_cand"]
            measured = timed and both_ok and pd.notna(m0) and pd.notna(m1)
            if measured and m1 > m0 * (1 + mem_tol) and m1 - m0 > MEMORY_FLOOR:
                problems.append(f"memory x{m1 / max(m0, 1):.2f} (> 1 + {mem_tol:g})")
        findings.append({**{c: r[c] for c in MATCH}, "row": r, "problems": problems,
                         "notes": notes})  # fmt: skip
    return findings


def _ratio(a, b) -> str:
    return f"{b / a:.2f}x" if pd.notna(a) and pd.notna(b) and a > 0 else "-"


def run_compare(args: argparse.Namespace) -> int:
    if not (args.time_tol >= 0 and args.mem_tol >= 0):
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
    for column in ("case", "status", "time", "memory", "verdict"):
        table.add_column(column, overflow="fold")
    bad = 0
    for f in findings:
        r = f["row"]
        case = f"{f['mechanism']}/{f['impl']} N={f['seq_len']} {f['dtype']} {f['mode']}"
        bad += bool(f["problems"])
        if f["problems"]:
            verdict = "[red]" + escape("; ".join(f["problems"]))
        else:
            verdict = "[green]" + escape("; ".join(f["notes"]) or "ok")
        table.add_row(
            case,
            f"{r.get('status_base', '-')} -> {r.get('status_cand', '-')}",
            _ratio(r.get("time_ms_base"), r.get("time_ms_cand")),
            _ratio(r.get("peak_mem_bytes_base"), r.get("peak_mem_bytes_cand")),
            verdict,
        )
    console = make_console()
    console.print(table)
    for f in findings:
        if f["problems"]:
            case = f"{f['mechanism']}/{f['impl']} N={f['seq_len']} {f['dtype']} {f['mode']}"
            console.print(f"flagged {escape(case)}: {escape('; '.join(f['problems']))}")
    console.print(
        f"bench compare: {bad} regression(s) in {len(findings)} case(s) (time: 10th-percentile "
        f"ratio above 1 + {args.time_tol:g} with its 95% lower bound above 1; memory: above "
        f"1 + {args.mem_tol:g})"
    )
    return 1 if bad else 0
