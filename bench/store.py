"""A run folder ``results/<run-id>/``: ``results.csv`` (one row per case,
appended and flushed as each case finishes) and ``meta.json``."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from attn_zoo.bench.cases import KEY_COLUMNS, Case
from attn_zoo.bench.errors import UsageError

COLUMNS = (
    *KEY_COLUMNS,
    "status", "note", "time_ms", "time_ms_p20", "time_ms_p80", "peak_mem_bytes",
    "err_oracle", "err_dense", "oracle_rows", "flops", "density", "interpreted",
    "repeats", "config",
)  # fmt: skip

STATUSES = ("ok", "oom", "nan", "failed", "skipped")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What ran the sweep: device, CPU, versions, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
    }
    if device.type == "cuda":
        from attn_zoo.bench.measure import matmul_tflops

        env["matmul_tflops"] = round(matmul_tflops(device), 1)
    return env


class RunStore:
    """Writes one run folder; ``open_existing`` reopens it for ``--resume``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.csv_path = folder / "results.csv"
        self.meta_path = folder / "meta.json"

    @classmethod
    def create(cls, root: Path, run_id: str, meta: dict) -> RunStore:
        folder = root / run_id
        try:
            folder.mkdir(parents=True, exist_ok=False)
            store = cls(folder)
            store.write_meta(meta)
            with open(store.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
        except FileExistsError:
            raise UsageError(
                f"--out: run folder {folder} already exists; pick another --run-id "
                f"or continue it with --resume {folder}"
            ) from None
        except OSError as e:
            raise UsageError(f"--out: cannot write results to {root}: {e.strerror}") from None
        return store

    @classmethod
    def open_existing(cls, folder: Path) -> RunStore:
        store = cls(folder)
        if not store.meta_path.is_file() or not store.csv_path.is_file():
            raise UsageError(
                f"--resume: {folder} is not a run folder (needs meta.json and results.csv)"
            )
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--resume: cannot write to {folder}")
        store._drop_partial_rows()
        return store

    def read_meta(self) -> dict:
        return json.loads(self.meta_path.read_text())

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        tmp.replace(self.meta_path)

    def rows(self) -> list[dict]:
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def done_keys(self) -> set[tuple[str, ...]]:
        return {tuple(row[c] for c in KEY_COLUMNS) for row in self.rows()}

    def _drop_partial_rows(self) -> None:
        """A run killed mid-write may leave a truncated last line: keep whole rows only."""
        rows = [r for r in self.rows() if None not in r.values() and r.get("status") in STATUSES]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, case: Case, row: dict) -> None:
        full = {**{c: getattr(case, c) for c in KEY_COLUMNS}, **row}
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(
                {c: _fmt(full.get(c)) for c in COLUMNS}
            )
            f.flush()
            os.fsync(f.fileno())


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def new_run_id(device: str) -> str:
    return f"{device}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
