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
    mechanisms = mechanisms or ["(nothing measured)"]
    cols = min(4, len(mechanisms))
    rows = math.ceil(len(mechanisms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(mechanisms) :]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _finish(fig, title: str) -> None:
    """A figure title above the panel titles, never over them."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))


def _log_if_positive(ax, axis: str = "y") -> None:
    """Log scale only where the axis holds positive data (else matplotlib refuses)."""
    data = [line.get_ydata() if axis == "y" else line.get_xdata() for line in ax.get_lines()]
    if any((pd.to_numeric(pd.Series(d), errors="coerce") > 0).any() for d in data):
        if axis == "y":
            ax.set_yscale("log")
        else:
            ax.set_xscale("log", base=2)


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
    """One panel per mechanism, one line per (run, impl): the colour names the impl
    in every panel and run, the line style the run. Cases that are not ok are drawn
    as red crosses on the x axis, labelled with their status."""
    mechanisms = mechanisms or list(dict.fromkeys(m for r in runs for m in r.table.mechanism))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    impls = dict.fromkeys(i for r in runs for i in r.table.impl)
    color = {impl: palette[n % len(palette)] for n, impl in enumerate(impls)}
    fig, axes = _grid(mechanisms)
    for ax, mech in zip(axes, mechanisms, strict=False):
        for style, run in zip(STYLES * 4, runs, strict=False):
            t = run.table[run.table.mechanism == mech]
            for impl, rows in t.groupby("impl", sort=False):
                ok = rows[rows.status == "ok"].sort_values("seq_len")
                y = value(ok)
                label = impl if len(runs) == 1 else f"{impl} · {run.meta.get('run_id')}"
                if len(ok) and y.notna().any():
                    ax.plot(ok.seq_len, y, style, marker="o", ms=3, label=label,
                            color=color[impl])  # fmt: skip
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
        _log_if_positive(ax, "x")
        if logy:
            _log_if_positive(ax, "y")
        ax.set_title(mech)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _finish(fig, title)
    return fig


def crossover(n: pd.Series, ratio: pd.Series) -> tuple[str, float | None]:
    """Where a mechanism overtakes the baseline (ratio >= 1 is better), read so that
    one noisy point decides nothing: ("crossover", N) when the ratio is below 1
    before N and >= 1 at N and every later point, at least two of them;
    ("always", None) when >= 1 at every point (two or more); ("never", None)
    otherwise, including a single last point above 1."""
    above = (pd.Series(ratio).to_numpy() >= 1).tolist()
    xs = pd.Series(n).tolist()
    if len(above) >= 2 and all(above):
        return "always", None
    for idx in range(1, len(above) - 1):
        if not above[idx - 1] and all(above[idx:]):
            return "crossover", float(xs[idx])
    return "never", None


def describe_crossover(result: tuple[str, float | None]) -> str:
    kind, n = result
    if kind == "crossover":
        return f"from N = {int(n)}"
    return "faster at every N measured" if kind == "always" else "none in the sweep"


def pick_baseline(run: Run, wanted: str | None = None) -> tuple[str, str] | None:
    """(mechanism, impl) the speedups of ``run`` are measured against: ``wanted``
    ("mechanism/impl"), else the fastest dense implementation over the lengths
    every dense implementation measured (sdpa where present)."""
    t = run.table[(run.table.status == "ok") & ~run.table.interpreted]
    if wanted is not None:
        mech, _, impl = wanted.partition("/")
        return (mech, impl) if len(t[(t.mechanism == mech) & (t.impl == impl)]) else None
    dense = t[t.mechanism == "dense"]
    if not len(dense):
        return None
    per_impl = dense.pivot_table(index="seq_len", columns="impl", values="time_ms", aggfunc="min")
    shared = per_impl.dropna()
    if not len(shared):
        return "dense", str(dense.groupby("impl").time_ms.median().idxmin())
    return "dense", str(shared.sum().idxmin())


def versus_baseline(runs: list[Run], ycol: str, wanted: str | None = None) -> pd.DataFrame:
    """Per (run, mechanism, impl, N): the baseline's figure over the mechanism's (>1:
    the mechanism is better); the baseline is :func:`pick_baseline`'s."""
    out = []
    for run in runs:
        baseline = pick_baseline(run, wanted)
        if baseline is None:
            continue
        t = run.table[(run.table.status == "ok") & ~run.table.interpreted]
        base = t[(t.mechanism == baseline[0]) & (t.impl == baseline[1])]
        keyed = base.set_index(["seq_len", "dtype", "mode"])[ycol]
        others = t[(t.mechanism != baseline[0])]
        for (mech, impl), rows in others.groupby(["mechanism", "impl"]):
            for _, r in rows.iterrows():
                ref = keyed.get((r["seq_len"], r["dtype"], r["mode"]))
                if ref is not None and pd.notna(ref) and pd.notna(r[ycol]) and r[ycol] > 0:
                    out.append({"run": run.meta.get("run_id"), "mechanism": mech, "impl": impl,
                                "seq_len": r.seq_len, "ratio": ref / r[ycol],
                                "baseline": "/".join(baseline)})  # fmt: skip
    return pd.DataFrame(out, columns=["run", "mechanism", "impl", "seq_len", "ratio", "baseline"])


def speedup_figure(runs: list[Run], wanted: str | None = None):
    """Speedup and memory saving over the named baseline; crossover lengths marked."""
    time_r = versus_baseline(runs, "time_ms", wanted)
    mem_r = versus_baseline(runs, "peak_mem_bytes", wanted)
    baselines = ", ".join(sorted(set(time_r.baseline))) or "(no baseline in the run)"
    mechanisms = list(dict.fromkeys(time_r.mechanism))
    fig, axes = _grid(mechanisms)
    for ax, mech in zip(axes, mechanisms, strict=False):
        for what, frame, style in (("time", time_r, "-"), ("memory", mem_r, "--")):
            for (run, impl), rows in frame[frame.mechanism == mech].groupby(["run", "impl"]):
                rows = rows.sort_values("seq_len")
                (line,) = ax.plot(
                    rows.seq_len, rows.ratio, style, marker="o", ms=3,
                    label=f"{what} · {impl}" + (f" · {run}" if len(runs) > 1 else ""),
                )  # fmt: skip
                kind, n0 = crossover(rows.seq_len, rows.ratio)
                if kind == "crossover":
                    ax.axvline(n0, color=line.get_color(), ls=style, lw=0.8, alpha=0.7)
        ax.axhline(1, color="grey", lw=0.8)
        _log_if_positive(ax, "x")
        _log_if_positive(ax, "y")
        ax.set_title(mech)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(f"{baselines} / mechanism (>1 is better)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _finish(fig, f"Speedup (solid) and memory saving (dashed) over {baselines}; "
                 "vertical lines: crossover (two points on the same side)")  # fmt: skip
    return fig, time_r, mem_r


def errors_figure(runs: list[Run], tolerance: float | None = None):
    """err_oracle (filled, solid: is it the mechanism?) above err_dense (hollow,
    dashed: how far from dense), one colour per implementation, the equivalence
    tolerance as a red line."""
    mechanisms = list(dict.fromkeys(m for r in runs for m in r.table.mechanism))
    fig, axes = _grid(mechanisms)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    impls = list(dict.fromkeys(i for r in runs for i in r.table.impl))
    color_of = {impl: colors[i % len(colors)] for i, impl in enumerate(impls)}
    for ax, mech in zip(axes, mechanisms, strict=False):
        for run in runs:
            t = run.table[(run.table.mechanism == mech) & (run.table.status == "ok")]
            for impl, rows in t.groupby("impl", sort=False):
                rows = rows.sort_values("seq_len")
                c = color_of[impl]
                ax.plot(rows.seq_len, rows.err_dense.clip(lower=1e-12), "--", color=c, marker="s",
                        mfc="none", ms=5, lw=1, alpha=0.7, zorder=2,
                        label=f"err_dense · {impl}")  # fmt: skip
                ax.plot(rows.seq_len, rows.err_oracle.clip(lower=1e-12), "-", color=c,
                        marker="o", ms=3, lw=1.5, zorder=3,
                        label=f"err_oracle · {impl}")  # fmt: skip
        if tolerance is not None:
            ax.axhline(tolerance, color="red", lw=0.8, ls=":", label=f"tolerance {tolerance:g}")
        _log_if_positive(ax, "x")
        _log_if_positive(ax, "y")
        ax.set_title(mech)
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel("relative error")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    _finish(fig, "err_oracle (filled, solid) and err_dense (hollow, dashed); red: the "
                 "err_oracle tolerance")  # fmt: skip
    return fig
