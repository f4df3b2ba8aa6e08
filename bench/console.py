"""What a sweep shows while it runs: a rich progress bar on a terminal, plain
lines otherwise; and a summary table at the end."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attn_zoo.bench.cases import Case


def make_console() -> Console:
    """A rich console; 160 columns wide when the output is not a terminal."""
    return Console(width=None if sys.stdout.isatty() else 160)


STATUS_STYLE = {"ok": "green", "skipped": "dim", "oom": "yellow", "nan": "red", "failed": "red"}


def _fmt(value, spec: str) -> str:
    if value in (None, ""):
        return "-"
    return format(float(value), spec)


def describe_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('note', '')}"
    mem = row.get("peak_mem_bytes")
    where = " (interpreter: not a timing)" if row.get("interpreted") else ""
    return (
        f"ok {_fmt(row.get('time_ms'), '.3g')} ms{where}, "
        f"peak {_fmt(None if mem in (None, '') else float(mem) / 2**20, '.4g')} MiB, "
        f"err_oracle {_fmt(row.get('err_oracle'), '.1e')}"
    )


class Reporter:
    """Progress over the cases; ``finished`` is called once per case."""

    def __init__(self, total: int, console: Console | None = None) -> None:
        self.console = console or make_console()
        self.total = total
        self.done = 0
        self.fancy = sys.stdout.isatty() and self.console.is_terminal
        self.progress = None
        if self.fancy:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("starting", total=total)

    def __enter__(self) -> Reporter:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def starting(self, case: Case) -> None:
        if self.progress:
            self.progress.update(self.task, description=case.label())

    def note(self, text: str) -> None:
        """A line between rows (the end of a timing round)."""
        if self.progress:
            self.progress.console.print(text, style="dim", markup=False)
        else:
            print(text, flush=True)

    def finished(self, case: Case, row: dict) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total}] {case.label()}: {describe_row(row)}"
        if self.progress:
            self.progress.console.print(line, style=STATUS_STYLE.get(row["status"]), markup=False)
            self.progress.advance(self.task)
        else:
            print(line, flush=True)


def summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for name, justify in [
        ("mechanism", "left"), ("impl", "left"), ("N", "right"), ("dtype", "left"),
        ("status", "left"), ("time ms", "right"), ("p20-p80", "right"), ("peak MiB", "right"),
        ("err_oracle", "right"), ("err_dense", "right"), ("density", "right"),
    ]:  # fmt: skip
        table.add_column(name, justify=justify)
    for r in rows:
        mem = r.get("peak_mem_bytes")
        spread = (
            f"{_fmt(r.get('time_ms_p20'), '.3g')}-{_fmt(r.get('time_ms_p80'), '.3g')}"
            if r.get("time_ms") not in (None, "")
            else "-"
        )
        impl = f"{r['impl']} (interp.)" if r.get("interpreted") in (True, "True") else r["impl"]
        table.add_row(
            r["mechanism"], impl, str(r["seq_len"]), r["dtype"],
            f"[{STATUS_STYLE.get(r['status'], '')}]{r['status']}",
            _fmt(r.get("time_ms"), ".4g"), spread,
            _fmt(None if mem in (None, "") else float(mem) / 2**20, ".4g"),
            _fmt(r.get("err_oracle"), ".1e"), _fmt(r.get("err_dense"), ".1e"),
            _fmt(r.get("density"), ".3f"),
        )  # fmt: skip
    if any(r.get("interpreted") in (True, "True") for r in rows):
        table.caption = "(interp.): ran in Triton's CPU interpreter; correctness only, not a timing"
    return table
