"""``bench report`` and ``bench compare`` on fixture runs."""

import json
import shutil

import pandas as pd
import pytest

from attn_zoo.bench.cli import main


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    code = main(["run", "--out", str(root), "--run-id", "base", "--seq-lens", "64,128",
                 "--mechanisms", "dense,sparse_strided,lsh", "--repeats", "16",
                 "--min-time", "1.0"])  # fmt: skip
    assert code == 0
    return root / "base"


def planted(base_run, tmp_path, edit):
    """A copy of the base run with ``edit`` applied to its table."""
    folder = tmp_path / "cand"
    shutil.copytree(base_run, folder)
    table = pd.read_csv(folder / "results.csv", dtype={"note": str})
    edit(table)
    table.to_csv(folder / "results.csv", index=False)
    return folder


def compare(base, cand, *extra):
    return main(["compare", str(base), str(cand), *extra])


def test_identical_runs_pass(base_run, tmp_path):
    assert compare(base_run, planted(base_run, tmp_path, lambda t: None)) == 0


def scale_times(t, rows, factor):
    """Every timing figure of ``rows``, samples included, times ``factor``."""
    for c in ("time_ms", "time_ms_p20", "time_ms_p80"):
        t.loc[rows, c] *= factor
    t.loc[rows, "time_samples_ms"] = t.loc[rows, "time_samples_ms"].map(
        lambda text: " ".join(f"{float(x) * factor:.6g}" for x in text.split())
    )


def quiet(t):
    """Every row's samples about 10 ms within 2%, as a quiet machine times them: the
    base run's own timings are as noisy as the machine running the tests."""
    t["time_samples_ms"] = "10 10.1 9.9 10.2 9.8 10 10.05 9.95"
    t["time_ms"], t["time_ms_p20"], t["time_ms_p80"] = 10.0, 9.9, 10.1


def test_planted_slowdown_is_caught(base_run, tmp_path, capsys):
    base = planted(base_run, tmp_path / "b", quiet)

    def slower(t):
        quiet(t)
        scale_times(t, t.mechanism == "lsh", 1.2)

    assert compare(base, planted(base_run, tmp_path, slower)) == 1
    out = capsys.readouterr().out
    assert "time x1.20 at the fast end" in out and "flagged lsh/reference N=64" in out


def test_change_within_the_noise_is_ignored(base_run, tmp_path):
    """Medians 10 -> 12 ms, but five samples each that overlap: not proven slower."""

    def samples(text):
        return lambda t: t.update({"time_samples_ms": [text] * len(t)})

    base = planted(base_run, tmp_path / "b", samples("10 14 7 12 9"))
    assert compare(base, planted(base_run, tmp_path, samples("12 8 15 11 13"))) == 0


def test_compare_a_run_with_itself_is_clean_whatever_its_statuses(base_run, tmp_path):
    def failing(t):
        t.loc[t.mechanism == "lsh", ["status", "note", "err_oracle"]] = ["failed", "x", 0.5]

    run = planted(base_run, tmp_path, failing)
    assert compare(run, run) == 0


def test_duplicated_and_missing_cases(base_run, tmp_path, capsys):
    folder = planted(base_run, tmp_path / "dup", lambda t: None)
    lines = (folder / "results.csv").read_text().splitlines()
    (folder / "results.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    assert compare(base_run, folder) == 2
    assert "repeated cases" in capsys.readouterr().err
    folder = planted(base_run, tmp_path / "gone", lambda t: None)
    (folder / "results.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert compare(base_run, folder) == 1
    assert "missing from the candidate" in capsys.readouterr().out


def test_equivalence_failure_is_caught(base_run, tmp_path, capsys):
    def broken(t):
        t.loc[t.mechanism == "sparse_strided", "err_oracle"] = 3e-3

    assert compare(base_run, planted(base_run, tmp_path, broken)) == 1
    assert "err_oracle" in capsys.readouterr().out


def test_ok_that_became_oom_is_caught(base_run, tmp_path, capsys):
    def oom(t):
        row = (t.mechanism == "dense") & (t.seq_len == 128)
        t.loc[row, "status"] = "oom"
        t.loc[row, ["time_ms", "time_ms_p20", "time_ms_p80"]] = float("nan")

    assert compare(base_run, planted(base_run, tmp_path, oom)) == 1
    assert "status ok -> oom" in capsys.readouterr().out


def test_memory_growth_is_caught(base_run, tmp_path):
    def bigger(t):
        t.loc[t.mechanism == "lsh", "peak_mem_bytes"] *= 1.5

    assert compare(base_run, planted(base_run, tmp_path, bigger)) == 1


def test_different_devices_need_force(base_run, tmp_path, capsys):
    cand = planted(base_run, tmp_path, lambda t: None)
    meta = json.loads((cand / "meta.json").read_text())
    meta["device_name"] = "Another CPU"
    (cand / "meta.json").write_text(json.dumps(meta))
    assert compare(base_run, cand) == 2
    assert "different devices" in capsys.readouterr().err
    assert compare(base_run, cand, "--force") == 0


def test_missing_files_exit_2(tmp_path, capsys):
    assert compare(tmp_path / "nope", tmp_path / "nada") == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_report_writes_every_promised_file(base_run, tmp_path):
    def with_failures(t):
        t.loc[(t.mechanism == "lsh") & (t.seq_len == 128), ["status", "note"]] = ["oom", "planted"]
        t.loc[(t.mechanism == "dense") & (t.impl == "sdpa"), ["status", "note"]] = ["failed", "x"]

    run = planted(base_run, tmp_path, with_failures)
    out = tmp_path / "report"
    assert main(["report", str(base_run), str(run), "--out", str(out)]) == 0
    for name in ("time.png", "memory.png", "speedup.png", "errors.png", "report.md"):
        assert (out / name).stat().st_size > 1000, name
    text = (out / "report.md").read_text()
    assert "lsh/reference N=128: oom (planted)" in text
    assert "Crossover lengths" in text and "growth exponents" in text


def interpreted_lsh(t):
    t["interpreted"] = t.mechanism == "lsh"


def test_interpreter_rows_never_gate_on_time_or_memory(base_run, tmp_path):
    def slow(t):
        interpreted_lsh(t)
        scale_times(t, t.mechanism == "lsh", 50)
        t.loc[t.mechanism == "lsh", "peak_mem_bytes"] *= 50

    base = planted(base_run, tmp_path / "b", interpreted_lsh)
    assert compare(base, planted(base_run, tmp_path, slow)) == 0


def test_report_leaves_interpreter_rows_out_of_timings(base_run, tmp_path):
    from attn_zoo.bench.runs import load_run

    run = load_run(planted(base_run, tmp_path, interpreted_lsh))
    assert set(run.measured().table.mechanism) == {"dense", "sparse_strided"}
    out = tmp_path / "report"
    assert main(["report", str(run.folder), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    rows = len(run.table[run.table.mechanism == "lsh"])
    assert f"{rows} row(s) ran in Triton's CPU interpreter" in text
    crossovers = text.split("## Crossover lengths")[1].split("## Results")[0]
    assert "sparse_strided" in crossovers and "lsh" not in crossovers


def test_kernel_targets_are_ratios_within_one_run():
    from attn_zoo.bench.targets import kernel_targets

    shape = dict(device="cuda", dtype="float16", batch=1, heads=2, head_dim=64, seq_len=1024)

    def row(mech, impl, time_ms, flops, mem, interpreted=False):
        measured = dict(time_ms=time_ms, flops=flops, peak_mem_bytes=mem, interpreted=interpreted)
        return dict(mechanism=mech, impl=impl, **shape, causal=True, mode="fwd", status="ok",
                    **measured)  # fmt: skip

    io = 1 * 2 * 1024 * 64 * 2
    table = pd.DataFrame(
        [
            row("dense", "triton", 1.0, 1e9, io + 8192),
            row("dense", "sdpa", 0.9, 1e9, io),
            row("dense", "flex", 1.2, 1e9, io),
            row("xl", "triton", 0.5, 4e8, 2 * io),
            row("xl", "flex", 0.4, 4e8, io),
            row("lsh", "triton", 9.0, 1e11, io, interpreted=True),
        ]
    )
    got = kernel_targets(table).set_index("mechanism")
    assert list(got.index) == ["dense", "xl"]  # the interpreter row never enters
    assert got.loc["dense", "tflops"] == pytest.approx(1.0)
    assert got.loc["dense", "vs_sdpa"] == pytest.approx(0.9)
    assert got.loc["dense", "vs_flex"] == pytest.approx(1.2)
    assert got.loc["xl", "tflops_vs_dense"] == pytest.approx(0.8)
    assert got.loc["xl", "vs_flex"] == pytest.approx(0.8)
    assert pd.isna(got.loc["xl", "vs_sdpa"])
    assert got.loc["xl", "mem_vs_qkvo"] == pytest.approx(5 / 4)
