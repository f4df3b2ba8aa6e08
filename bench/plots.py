"""Matplotlib figures of one or more runs, drawn headless (Agg)."""

from __future__ import annotations

import math
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from attn_zoo.bench.runs import Run

STYLES = ["-", "--", ":", "-."]


def _grid(mechanisms: list[str]):
    cols = min(4, len(mechanisms))
    rows = math.ceil(len(mechanisms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(mechanisms) :]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def panels(
    runs: list[Run],
    value: Callable[[pd.DataFrame], pd.Series],
    ylabel: str,
    title: str,
    *,
    logy: bool = True,
    mechanisms: list[str] | None = None,
    hline: float | None = None,
):
    """One panel per mechanism, one line per (run, impl). Cases that are not ok
    are drawn as red crosses on the x axis, labelled with their status."""
    mechanisms = mechanisms or list(dict.fromkeys(m for r in runs for m in r.table.mechanism))
    fig, axes = _grid(mechanisms)
    for ax, mech in zip(axes, mechanisms, strict=False):
        for style, run in zip(STYLES * 4, runs, strict=False):
            t = run.table[run.table.mechanism == mech]
            for impl, rows in t.groupby("impl", sort=False):
                ok = rows[rows.status == "ok"].sort_values("seq_len")
                y = value(ok)
                label = impl if len(runs) == 1 else f"{impl} · {run.meta.get('run_id')}"
                if len(ok) and y.notna().any():
                    ax.plot(ok.seq_len, y, style, marker="o", ms=3, label=label)
                for _, bad in rows[rows.status != "ok"].iterrows():
                    ax.plot(
                        bad.seq_len,
                        0,
                        "x",
                        color="red",
                        ms=8,
                        clip_on=False,
                        transform=ax.get_xaxis_transform(),
                    )
                    ax.annotate(
                        f"{impl}: {bad.status}",
                        (bad.seq_len, 0.02),
                        fontsize=6,
                        color="red",
                        xycoords=("data", "axes fraction"),
                        rotation=90,
                    )
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(mech)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def crossover(n: pd.Series, ratio: pd.Series) -> float | None:
    """The first N from which the ratio stays >= 1, or None."""
    above = (ratio >= 1).to_numpy()
    for idx in range(len(above)):
        if above[idx:].all():
            return float(n.iloc[idx])
    return None


def versus_dense(runs: list[Run], ycol: str) -> pd.DataFrame:
    """Per (run, mechanism, impl, N): dense's figure over the mechanism's (>1: better).
    Dense with the same impl is the baseline where it exists, else dense reference."""
    out = []
    for run in runs:
        t = run.table[run.table.status == "ok"]
        dense = t[t.mechanism == "dense"]
        for (mech, impl), rows in t[t.mechanism != "dense"].groupby(["mechanism", "impl"]):
            base = dense[dense.impl == impl]
            base = base if len(base) else dense[dense.impl == "reference"]
            keyed = base.set_index(["seq_len", "dtype", "mode"])[ycol]
            for _, r in rows.iterrows():
                ref = keyed.get((r["seq_len"], r["dtype"], r["mode"]))
                if ref is not None and pd.notna(r[ycol]) and r[ycol] > 0:
                    out.append(
                        {
                            "run": run.meta.get("run_id"),
                            "mechanism": mech,
                            "impl": impl,
                            "seq_len": r.seq_len,
                            "ratio": ref / r[ycol],
                        }
                    )
    return pd.DataFrame(out, columns=["run", "mechanism", "impl", "seq_len", "ratio"])


def speedup_figure(runs: list[Run]):
    """Speedup and memory saving over dense; crossover lengths marked."""
    time_r, mem_r = versus_dense(runs, "time_ms"), versus_dense(runs, "peak_mem_bytes")
    mechanisms = list(dict.fromkeys(time_r.mechanism)) or ["(no efficient mechanism)"]
    fig, axes = _grid(mechanisms)
    for ax, mech in zip(axes, mechanisms, strict=False):
        for what, frame, style in (("time", time_r, "-"), ("memory", mem_r, "--")):
            for (run, impl), rows in frame[frame.mechanism == mech].groupby(["run", "impl"]):
                rows = rows.sort_values("seq_len")
                (line,) = ax.plot(
                    rows.seq_len,
                    rows.ratio,
                    style,
                    marker="o",
                    ms=3,
                    label=f"{what} · {impl}" + (f" · {run}" if len(runs) > 1 else ""),
                )
                n0 = crossover(rows.seq_len, rows.ratio)
                if n0 is not None:
                    ax.axvline(n0, color=line.get_color(), ls=style, lw=0.8, alpha=0.7)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(mech)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel("dense / mechanism (x, >1 is better)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Speedup (solid) and memory saving (dashed) over dense; vertical lines: crossover")
    fig.tight_layout()
    return fig, time_r, mem_r


def errors_figure(runs: list[Run]):
    fig = panels(runs, lambda t: t.err_oracle.clip(lower=1e-12), "relative error", "")
    for ax in fig.axes:
        mech = ax.get_title()
        for run in runs:
            t = run.table[(run.table.mechanism == mech) & (run.table.status == "ok")]
            for impl, rows in t.groupby("impl"):
                rows = rows.sort_values("seq_len")
                ax.plot(
                    rows.seq_len,
                    rows.err_dense.clip(lower=1e-12),
                    ":",
                    marker="s",
                    ms=3,
                    label=f"err_dense · {impl}",
                )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(
        "err_oracle (solid: is it the mechanism?) and err_dense (dotted: distance from dense)"
    )
    return fig
