"""Quality beside cost in ``bench report``: a quality run (quality.csv) drawn
against a sweep run's time and peak memory at the same N, and tabulated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import NullFormatter, ScalarFormatter

from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.plots import _finish
from attn_zoo.bench.runs import Run
from attn_zoo.bench.store import read_meta


@dataclass
class QualityRun:
    folder: Path
    meta: dict
    table: pd.DataFrame  # one row per (mechanism, task, seq_len, seed, metric)

    @property
    def label(self) -> str:
        return f"{self.meta.get('run_id', self.folder.name)} (quality)"


def is_quality_run(path: str | Path) -> bool:
    return (Path(path) / "quality.csv").is_file()


def load_quality(path: str | Path) -> QualityRun:
    from attn_zoo.bench.quality import QualityStore

    store = QualityStore(Path(path))
    meta = read_meta(store.meta_path) if store.meta_path.is_file() else None
    if meta is None:
        raise UsageError(f"{path} is not a quality run folder (needs meta.json)")
    table = pd.DataFrame(store.rows())
    if len(table):
        table["value"] = pd.to_numeric(table["value"], errors="coerce")
        table["seq_len"] = pd.to_numeric(table["seq_len"], errors="coerce")
    return QualityRun(Path(path), meta, table)


def _ok(q: QualityRun, task: str) -> pd.DataFrame:
    t = q.table
    return t[(t.task == task) & (t.status == "ok")] if len(t) else t


def real_model_summary(q: QualityRun, sweeps: list[Run]) -> pd.DataFrame:
    """Per mechanism: embedding cosine, mean per-layer error and mass share, and the
    sweep's reference time and peak memory at the same N (when it has that N)."""
    t = _ok(q, "minilm")
    if not len(t):
        return pd.DataFrame()
    rows = []
    for mech, part in t.groupby("mechanism", sort=False):
        metric = part.set_index("metric").value
        layer_err = metric[metric.index.str.endswith("_rel_error")]
        layer_share = metric[metric.index.str.endswith("_mass_share")]
        n = int(part.seq_len.iloc[0])
        cost = _cost(sweeps, mech, n)
        rows.append({"mechanism": mech, "N": n, "cosine": metric.get("embedding_cosine"),
                     "mean layer error": layer_err.mean(), "mass share": layer_share.mean(),
                     "time_ms": cost[0], "peak MiB": cost[1]})  # fmt: skip
    return pd.DataFrame(rows)


def _cost(sweeps: list[Run], mechanism: str, n: int) -> tuple[float | None, float | None]:
    for run in sweeps:
        t = run.table
        hit = t[(t.mechanism == mechanism) & (t.seq_len == n) & (t.status == "ok")
                & (t.impl == "reference") & ~t.interpreted]  # fmt: skip
        if len(hit):
            return float(hit.time_ms.iloc[0]), float(hit.peak_mem_bytes.iloc[0] / 2**20)
    return None, None


def task_summary(q: QualityRun) -> pd.DataFrame:
    """Accuracy (mean over seeds), chance and training time per mechanism, task, N."""
    t = q.table
    if not len(t):
        return pd.DataFrame()
    trained = t[(t.task != "minilm") & (t.status == "ok")]
    if not len(trained):
        return pd.DataFrame()
    wide = trained.pivot_table(index=["mechanism", "task", "seq_len"], columns="metric",
                               values="value", aggfunc="mean", sort=False)  # fmt: skip
    wide = wide.reset_index().rename(columns={"seq_len": "N"})
    keep = [c for c in ("mechanism", "task", "N", "accuracy", "chance", "train_seconds")
            if c in wide]  # fmt: skip
    return wide[keep]


def pareto_figure(summary: pd.DataFrame, title: str):
    """Embedding cosine against time and against peak memory, one point per mechanism."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, column, label in ((axes[0][0], "time_ms", "time (ms, reference, same N)"),
                              (axes[0][1], "peak MiB", "peak memory (MiB, same N)")):  # fmt: skip
        shown = summary.dropna(subset=[column, "cosine"])
        ax.scatter(shown[column], shown.cosine, s=25)
        for _, r in shown.iterrows():
            ax.annotate(r.mechanism, (r[column], r.cosine), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        if len(shown):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded minor labels
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("embedding cosine vs dense (1 = no loss)")
        ax.grid(True, which="both", alpha=0.3)
    _finish(fig, title)
    return fig


def layers_figure(q: QualityRun):
    """Per layer: relative error against dense attention and mass share inside the pattern."""
    t = _ok(q, "minilm")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    panels = ((axes[0][0], "_rel_error", "relative output error vs dense"),
              (axes[0][1], "_mass_share", "dense mass inside the pattern"))  # fmt: skip
    for ax, suffix, label in panels:
        for mech, part in t.groupby("mechanism", sort=False):
            rows = part[part.metric.str.endswith(suffix)]
            layers = rows.metric.str.extract(r"layer(\d+)_")[0].astype(int)
            ax.plot(layers, rows.value, marker="o", ms=3, label=mech)
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _finish(fig, "all-MiniLM-L6-v2, each layer fed dense attention's input (teacher-forced)")
    return fig
