"""Reading run folders back: the results table and meta of each run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from attn_zoo.bench.errors import UsageError
from attn_zoo.bench.store import read_meta, read_results

NUMERIC = (
    "batch", "heads", "head_dim", "seq_len", "time_ms", "time_ms_p20", "time_ms_p80",
    "peak_mem_bytes", "err_oracle", "err_dense", "oracle_rows", "flops", "density", "repeats",
    "first_call_ms",
)  # fmt: skip


@dataclass
class Run:
    folder: Path
    meta: dict
    table: pd.DataFrame

    def measured(self) -> Run:
        """The rows whose time and memory mean something: not interpreter runs."""
        return Run(self.folder, self.meta, self.table[~self.table.interpreted])

    @property
    def label(self) -> str:
        return f"{self.meta.get('run_id', self.folder.name)} ({self.meta.get('device_name', '?')})"


def load_run(path: str | Path) -> Run:
    """A run folder, validated (a damaged file is a UsageError naming it)."""
    folder = Path(path)
    csv_path, meta_path = folder / "results.csv", folder / "meta.json"
    if not csv_path.is_file() or not meta_path.is_file():
        raise UsageError(f"{folder} is not a run folder (needs results.csv and meta.json)")
    meta = read_meta(meta_path)
    header, rows, _ = read_results(csv_path, legacy=True)
    table = pd.DataFrame(rows, columns=header, dtype=object)
    for column in NUMERIC:
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce")
    table["causal"] = table["causal"].astype(str) == "True"
    interpreted = table["interpreted"] if "interpreted" in table else pd.Series(False, table.index)
    table["interpreted"] = interpreted.astype(str) == "True"
    table["note"] = table["note"].fillna("")
    if "time_samples_ms" not in table:
        table["time_samples_ms"] = ""
    if "first_call_ms" not in table:  # runs written before the column
        table["first_call_ms"] = float("nan")
    return Run(folder, meta, table)
