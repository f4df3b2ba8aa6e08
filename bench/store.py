"""A run folder ``results/<run-id>/``: ``results.csv`` (one row per case,
appended and flushed as each case finishes) and ``meta.json``.

Reading a run folder back validates it: a damaged meta.json or results.csv is
a :class:`UsageError` naming the file and the problem, and no reader ever
rewrites or drops a complete row. The one repair is cutting a last line that
a killed run left half-written (it never was a row).
"""

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
    "repeats", "config", "time_samples_ms", "first_call_ms",
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
    status = _git("status", "--porcelain", "--untracked-files=no")  # run folders are untracked
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
        from attn_zoo.bench.measure import gpu_state, matmul_tflops

        env["matmul_tflops"] = round(matmul_tflops(device), 1)
        env["gpu"] = gpu_state(device)
    return env


class RunStore:
    """Writes one run folder; ``open_existing`` reopens it for ``--resume``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.csv_path = folder / "results.csv"
        self.meta_path = folder / "meta.json"
        #: Timing rounds of cases whose row is not written yet (one JSON line each), so
        #: that an interrupted sweep resumes mid-case; a row's timing is its rounds'.
        self.pending_path = folder / "pending.jsonl"

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
        meta = store.read_meta()
        if not isinstance(meta.get("args"), dict):
            raise UsageError(f"--resume: {store.meta_path} has no sweep settings ('args')")
        store._cut_half_written_row()
        return store

    def read_meta(self) -> dict:
        return read_meta(self.meta_path)

    def write_meta(self, meta: dict) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        tmp.replace(self.meta_path)

    def rows(self) -> list[dict]:
        header, rows, _ = read_results(self.csv_path)
        return [dict(zip(header, row, strict=True)) for row in rows]

    def done_keys(self) -> set[tuple[str, ...]]:
        return {tuple(row[c] for c in KEY_COLUMNS) for row in self.rows()}

    def _cut_half_written_row(self) -> None:
        """A run killed mid-write may leave a last line without its newline: cut
        it off (the bytes of every complete row stay as they are)."""
        _, _, complete = read_results(self.csv_path, allow_partial_tail=True)
        if complete < self.csv_path.stat().st_size:
            with open(self.csv_path, "r+b") as f:
                f.truncate(complete)

    def append_round(self, case: Case, number: int, samples: list[float], row: dict | None):
        """Record one timing round of ``case`` (round 0 carries its measured row)."""
        line = {"key": list(case.key()), "round": number, "samples": samples, "row": row}
        with open(self.pending_path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> dict[tuple[str, ...], dict]:
        """Per case key: {"row": round 0's row, "rounds": {number: samples}}. A last
        line a killed run left half-written is ignored; other damage is an error."""
        if not self.pending_path.is_file():
            return {}
        try:
            lines = self.pending_path.read_bytes().decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raise UsageError(f"{self.pending_path}: not UTF-8 text (damaged)") from None
        found: dict[tuple[str, ...], dict] = {}
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
                key, index = tuple(entry["key"]), int(entry["round"])
            except (ValueError, KeyError, TypeError):
                if number == len(lines):  # the unterminated last line
                    continue
                raise UsageError(f"{self.pending_path}: line {number} is damaged") from None
            state = found.setdefault(key, {"row": None, "rounds": {}})
            if entry.get("row") is not None:
                state["row"] = entry["row"]
            state["rounds"][index] = [float(x) for x in entry["samples"]]
        return found

    def append(self, case: Case, row: dict) -> None:
        full = {**{c: getattr(case, c) for c in KEY_COLUMNS}, **row}
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(
                {c: _fmt(full.get(c)) for c in COLUMNS}
            )
            f.flush()
            os.fsync(f.fileno())


def read_meta(path: Path) -> dict:
    """meta.json as a dict, or a UsageError naming the file and the damage."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text (damaged meta.json)") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: not a JSON object")
    return meta


#: The columns of earlier results.csv formats, which readers accept: the first (no timing
#: samples), the second (no first call).
LEGACY_HEADERS = (
    COLUMNS[: COLUMNS.index("config") + 1],
    COLUMNS[: COLUMNS.index("time_samples_ms") + 1],
)


def read_results(path: Path, allow_partial_tail: bool = False, legacy: bool = False):
    """(header, rows, bytes of complete lines) of a results.csv, checked: UTF-8, a
    bench header (``legacy``: or an earlier format's), every row as wide as the
    header and with a known status. With ``allow_partial_tail`` a last line
    without its newline is left out."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path}: not UTF-8 text at byte {e.start} (damaged results.csv)"
        ) from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    complete = len(data)
    if allow_partial_tail and text and not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        complete = len(text[:cut].encode("utf-8"))
        text = text[:cut]
    lines = list(csv.reader(text.splitlines()))
    headers = [list(h) for h in (COLUMNS, *(LEGACY_HEADERS if legacy else ()))]
    if not lines or lines[0] not in headers:
        first = ",".join(lines[0])[:60] if lines else "(empty)"
        raise UsageError(
            f"{path}: not a results table of this attn-zoo (header {first!r}); "
            f"its columns are {', '.join(COLUMNS[:3])}, ..."
        )
    rows = lines[1:]
    width = len(lines[0])
    for number, row in enumerate(rows, start=2):
        if len(row) != width or row[COLUMNS.index("status")] not in STATUSES:
            raise UsageError(
                f"{path}: line {number} is not a complete row ({len(row)} of {width} "
                f"fields, status {row[COLUMNS.index('status')] if len(row) > 10 else '?'!r}); "
                f"the file is damaged"
            )
    return lines[0], rows, complete


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
