"""The harness against damaged and degenerate input: every reader of a run folder
validates it (exit 2, one line naming the file), nothing already measured is
rewritten or lost, and the gate decides from the timing samples."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch

from attn_zoo.bench import plots
from attn_zoo.bench.cli import main
from attn_zoo.bench.measure import time_call
from attn_zoo.bench.runs import load_run
from attn_zoo.bench.store import environment
from conftest import interrupting


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    code = main(["run", "--out", str(root), "--run-id", "small", "--seq-lens", "64,128",
                 "--mechanisms", "dense,sparse_fixed", "--repeats", "16",
                 "--min-time", "0.4"])  # fmt: skip
    assert code == 0
    return root / "small"


def copy(run, tmp_path, name="copy"):
    folder = tmp_path / name
    shutil.copytree(run, folder)
    return folder


def one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("bench: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


# -- readers never crash on a valid run ------------------------------------------------


def test_report_of_an_interpreter_only_run(tmp_path, capsys):
    """The README's interpreter run: nothing timed, so no time plots, and report.md
    says so instead of a ZeroDivisionError."""
    assert main(["run", "--interpret", "--impls", "triton", "--mechanisms", "dense",
                 "--seq-lens", "64", "--out", str(tmp_path), "--run-id", "i",
                 "--min-time", "0"]) == 0  # fmt: skip
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "i"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "No measured row to plot" in text and (out / "errors.png").is_file()
    assert not (out / "time.png").exists()


def test_report_of_a_header_only_run(small_run, tmp_path):
    folder = copy(small_run, tmp_path)
    lines = (folder / "results.csv").read_text().splitlines()
    (folder / "results.csv").write_text(lines[0] + "\n")
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 0
    assert "No measured row to plot" in (tmp_path / "r" / "report.md").read_text()


def test_report_of_an_all_skipped_run(tmp_path, capsys, no_gpu, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["run", "--impls", "triton", "--mechanisms", "dense,lsh", "--seq-lens", "32",
                 "--out", str(tmp_path), "--run-id", "s"]) == 1  # fmt: skip
    assert main(["report", str(tmp_path / "s"), "--out", str(tmp_path / "r")]) == 0
    assert "No measured row" in (tmp_path / "r" / "report.md").read_text()


# -- damaged files: exit 2, one line, nothing rewritten ---------------------------------


def test_resume_refuses_a_results_file_that_is_not_csv(small_run, tmp_path, capsys):
    folder = copy(small_run, tmp_path)
    (folder / "results.csv").write_text("this is not a results table\nat all\n")
    before = (folder / "results.csv").read_bytes()
    assert main(["run", "--resume", str(folder)]) == 2
    one_line_error(capsys, "results.csv", "not a results table")
    assert (folder / "results.csv").read_bytes() == before


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: (f / "meta.json").write_text('{"run_id": "x", '), "not valid JSON"),
        (lambda f: (f / "meta.json").write_bytes(b"\xff\xfe\x00garbage"), "not UTF-8"),
        (lambda f: (f / "results.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff"), "not UTF-8"),
        (lambda f: (f / "meta.json").write_text("[1, 2]"), "not a JSON object"),
    ],
    ids=["truncated-meta", "binary-meta", "binary-csv", "meta-list"],
)
@pytest.mark.parametrize("command", ["resume", "report", "compare"])
def test_damaged_files_are_one_clear_error(small_run, tmp_path, capsys, damage, message, command):
    folder = copy(small_run, tmp_path)
    damage(folder)
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    argv = {
        "resume": ["run", "--resume", str(folder)],
        "report": ["report", str(folder), "--out", str(tmp_path / "r")],
        "compare": ["compare", str(small_run), str(folder)],
    }[command]
    assert main(argv) == 2
    one_line_error(capsys, message)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot


def test_a_damaged_middle_row_is_refused_not_dropped(small_run, tmp_path, capsys):
    folder = copy(small_run, tmp_path)
    lines = (folder / "results.csv").read_text().splitlines()
    lines[2] = lines[2][:40]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    assert main(["run", "--resume", str(folder)]) == 2
    one_line_error(capsys, "line 3 is not a complete row")


def test_resume_keeps_every_byte_of_the_complete_rows(small_run, tmp_path):
    folder = copy(small_run, tmp_path)
    complete = (folder / "results.csv").read_bytes()
    lines = complete.decode().splitlines(keepends=True)
    (folder / "results.csv").write_bytes("".join(lines[:-1]).encode() + lines[-1][:25].encode())
    assert main(["run", "--resume", str(folder)]) == 0
    assert (folder / "results.csv").read_bytes().startswith("".join(lines[:-1]).encode())
    assert len(load_run(folder).table) == len(lines) - 1


def test_resume_refuses_changed_settings(small_run, tmp_path, capsys):
    folder = copy(small_run, tmp_path)
    before = (folder / "results.csv").read_bytes()
    assert main(["run", "--resume", str(folder), "--seq-lens", "64,128,256"]) == 2
    one_line_error(capsys, "--seq-lens 64,128,256 (the run has 64,128)", "Start a new run")
    assert main(["run", "--resume", str(folder), "--repeats", "7", "--no-causal"]) == 2
    one_line_error(capsys, "--repeats 7", "--causal False")
    assert (folder / "results.csv").read_bytes() == before
    assert main(["run", "--resume", str(folder), "--seq-lens", "64,128"]) == 0  # the same: fine


# -- the sweep's own messages ------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--repeats", "0", "--repeats: 0; accepted: an integer >= 1"),
        ("--warmup", "-1", "--warmup: -1; accepted: an integer >= 0"),
        ("--oracle-rows", "1", "--oracle-rows: 1; accepted: an integer >= 2"),
        ("--min-time", "-0.5", "--min-time: -0.5; accepted: seconds >= 0"),
        ("--cuda-graph", None, "--cuda-graph: replays a captured forward on CUDA"),
    ],
)
def test_each_flag_has_its_own_message(tmp_path, capsys, flag, value, message):
    args = [flag] if value is None else [flag, value]
    assert main(["run", "--out", str(tmp_path), "--seq-lens", "32", *args]) == 2
    one_line_error(capsys, message)


def test_bench_alone_lists_the_commands(capsys):
    assert main([]) == 2
    one_line_error(capsys, "accepted: run, list, report, compare")


def test_unsupported_head_dim_is_a_whole_sentence_and_exit_1(tmp_path, capsys):
    code = main(["run", "--head-dim", "96", "--impls", "triton", "--mechanisms", "dense",
                 "--seq-lens", "32", "--out", str(tmp_path), "--run-id", "h"])  # fmt: skip
    assert code == 1
    (row,) = load_run(tmp_path / "h").table.itertuples()
    if "interpret" in row.note:  # no GPU and no interpreter: that is the reason given
        pytest.skip("triton is unavailable here for another reason")
    assert row.note.endswith("accepted head dims: 32, 64, 128")
    assert "every case was skipped" in capsys.readouterr().out


def test_timing_keeps_every_sample_and_fills_the_time_budget():
    calls = []

    def nap():
        calls.append(1)
        time.sleep(0.005)

    timing = time_call(nap, torch.device("cpu"), warmup=1, repeats=3, min_time=0.1)
    assert len(timing.samples_ms) >= 15 and sum(timing.samples_ms) >= 100
    assert len(calls) == len(timing.samples_ms) + 1
    assert timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert len(timing.samples_text().split()) == len(timing.samples_ms)
    few = time_call(lambda: None, torch.device("cpu"), warmup=0, repeats=4, min_time=0)
    assert len(few.samples_ms) == 4


def test_run_rows_carry_their_samples(small_run):
    table = load_run(small_run).table
    for row in table.itertuples():
        samples = [float(x) for x in row.time_samples_ms.split()]
        assert len(samples) == row.repeats >= 3
        assert min(samples) <= row.time_ms <= max(samples)


# -- the gate --------------------------------------------------------------------------------


def slowed(run, tmp_path, factor):
    folder = copy(run, tmp_path, f"x{factor}")
    table = pd.read_csv(folder / "results.csv", dtype={"note": str, "time_samples_ms": str})
    for c in ("time_ms", "time_ms_p20", "time_ms_p80"):
        table[c] *= factor
    table["time_samples_ms"] = table["time_samples_ms"].map(
        lambda text: " ".join(f"{float(x) * factor:.6g}" for x in text.split())
    )
    table.to_csv(folder / "results.csv", index=False)
    return folder


def test_every_row_slowed_by_a_fifth_is_flagged(small_run, tmp_path, capsys):
    assert main(["compare", str(small_run), str(slowed(small_run, tmp_path, 1.2))]) == 1
    out = capsys.readouterr().out
    n = len(load_run(small_run).table)
    assert f"{n} regression(s) in {n} case(s)" in out


# -- plots and report -------------------------------------------------------------------------


def test_crossover_needs_two_points_on_the_same_side():
    n = pd.Series([512, 1024, 2048, 4096])
    assert plots.crossover(n, pd.Series([0.5, 0.8, 1.2, 1.5])) == ("crossover", 2048)
    assert plots.crossover(n, pd.Series([0.5, 0.8, 0.9, 1.5])) == ("never", None)
    assert plots.crossover(n, pd.Series([1.1, 1.2, 1.3, 1.5])) == ("always", None)
    assert plots.crossover(n, pd.Series([0.5, 1.2, 0.9, 1.5])) == ("never", None)


def test_speedups_are_against_a_named_baseline(small_run, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["report", str(small_run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Against the baseline **dense/sdpa**" in text
    assert main(["report", str(small_run), "--out", str(out), "--baseline", "dense/reference"]) == 0
    assert "**dense/reference**" in (out / "report.md").read_text()
    assert main(["report", str(small_run), "--baseline", "sdpa"]) == 2
    one_line_error(capsys, "--baseline: 'sdpa'; accepted: MECHANISM/IMPL")


def test_errors_figure_keeps_titles_apart_and_draws_the_tolerance(small_run):
    fig = plots.errors_figure([load_run(small_run)], tolerance=1e-5)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top_of_panels = max(
        ax.title.get_window_extent(renderer).y1 for ax in fig.axes if ax.get_visible()
    )
    assert fig._suptitle.get_window_extent(renderer).y0 >= top_of_panels
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "tolerance 1e-05" in labels
    lines = {line.get_label(): line for line in ax.get_lines()}
    oracle_line = lines["err_oracle · reference"]
    dense_line = lines["err_dense · reference"]
    assert oracle_line.get_color() == dense_line.get_color()  # one colour: one impl
    assert oracle_line.get_zorder() > dense_line.get_zorder()  # err_oracle on top
    assert oracle_line.get_linestyle() != dense_line.get_linestyle()
    plt.close(fig)


# -- provenance ---------------------------------------------------------------------------------


def test_a_default_run_folder_leaves_the_tree_clean():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/cpu-20990101-000000/x"],
                             cwd=root)  # fmt: skip
    assert ignored.returncode == 0, "default run folders must be ignored"
    before = environment(torch.device("cpu"))["git_dirty"]
    scratch = root / "results" / "cpu-20990101-000000"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        (scratch / "results.csv").write_text("x\n")
        assert environment(torch.device("cpu"))["git_dirty"] == before
    finally:
        shutil.rmtree(scratch)


def test_meta_records_the_settings_a_resume_needs(small_run):
    meta = json.loads((small_run / "meta.json").read_text())
    assert meta["args"]["min_time"] == 0.4 and meta["args"]["cuda_graph"] is False


# -- timing rounds --------------------------------------------------------------------------


def test_rounds_spread_each_case_over_the_sweep_and_resume_midway(tmp_path, monkeypatch):
    """Four rounds of two samples each: every row holds eight samples; a sweep killed
    in round 2 resumes from pending.jsonl without repeating round 0's rows."""
    import attn_zoo.bench.sweep as sweep

    real = sweep.more_samples
    monkeypatch.setattr(sweep, "more_samples", interrupting(real, at=3))
    argv = ["run", "--out", str(tmp_path), "--run-id", "r", "--seq-lens", "32,48",
            "--mechanisms", "dense", "--impls", "reference", "--repeats", "8", "--rounds", "4",
            "--min-time", "0"]  # fmt: skip
    assert main(argv) == 130
    assert load_run(tmp_path / "r").table.empty  # no case finished its rounds
    pending = (tmp_path / "r" / "pending.jsonl").read_text().splitlines()
    assert len(pending) == 4  # two cases' round 0, then round 1 of the first
    monkeypatch.setattr(sweep, "more_samples", real)
    zeroes = []
    monkeypatch.setattr(sweep, "run_case", lambda *a: zeroes.append(a) or {})
    assert main(["run", "--resume", str(tmp_path / "r")]) == 0
    assert not zeroes, "round 0 is not measured again"
    table = load_run(tmp_path / "r").table
    assert len(table) == 2 and (table.repeats == 8).all()
    assert all(len(s.split()) == 8 for s in table.time_samples_ms)
