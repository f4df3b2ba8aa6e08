"""``bench`` end to end on small sizes: output files, bad input, resume, oom."""

import csv
import dataclasses
import json
import os

import pytest
import torch

import attn_zoo
import attn_zoo.bench.runner
from attn_zoo.bench.cli import main
from attn_zoo.bench.store import COLUMNS
from conftest import interrupting


def run(tmp_path, *args, run_id="r"):
    return main(["run", "--out", str(tmp_path), "--run-id", run_id, "--repeats", "2",
                 "--rounds", "1", "--min-time", "0.05", *args])  # fmt: skip


def rows(tmp_path, run_id="r"):
    with open(tmp_path / run_id / "results.csv") as f:
        return list(csv.DictReader(f))


def test_run_writes_results_and_meta(tmp_path, capsys):
    assert run(tmp_path, "--seq-lens", "64,96", "--mechanisms", "dense,lsh") == 0
    table = rows(tmp_path)
    assert {(r["mechanism"], r["impl"], r["seq_len"]) for r in table} == {
        ("dense", "reference", "64"), ("dense", "sdpa", "64"), ("lsh", "reference", "64"),
        ("dense", "reference", "96"), ("dense", "sdpa", "96"), ("lsh", "reference", "96"),
    }  # fmt: skip
    for r in table:
        assert list(r) == list(COLUMNS)
        assert r["status"] == "ok", r["note"]
        assert float(r["err_oracle"]) < 1e-5
        assert float(r["time_ms_p20"]) <= float(r["time_ms"]) <= float(r["time_ms_p80"])
        assert float(r["first_call_ms"]) > 0  # the warm-up call, timed apart
        assert float(r["flops"]) > 0 and float(r["density"]) > 0  # lsh rounds may exceed 1
    dense = [r for r in table if r["mechanism"] == "dense"]
    assert all(float(r["err_dense"]) < 1e-5 for r in dense)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    for key in ("device", "cpu_model", "python", "torch", "triton", "git_commit", "git_dirty",
                "command", "started", "args"):  # fmt: skip
        assert key in meta
    assert "bench: wrote" in capsys.readouterr().out


def test_list_shows_every_mechanism(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in attn_zoo.names():
        assert name in out


BAD = [
    (["--seq-lens", "abc"], "--seq-lens: 'abc' is not an integer"),
    (["--seq-lens", "0"], "--seq-lens: 0 is not positive"),
    (["--seq-lens", "512,-1"], "is not positive"),
    (["--mechanisms", "dense,nope"], "--mechanisms: unknown 'nope'; accepted: dense"),
    (["--impls", "fastest"], "--impls: unknown 'fastest'; accepted: reference"),
    (["--dtype", "int8"], "--dtype: unknown 'int8'; accepted: float32"),
    (["--mode", "train"], "--mode: unknown 'train'; accepted: fwd, fwd_bwd"),
    (["--reference-budget", "0"], "--reference-budget: 0.0; accepted: megabytes > 0"),
    (["--batch", "x"], "--batch: 'x' is not an integer"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    assert run(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bench: error: ") and message in err
    assert not (tmp_path / "r").exists(), "no run folder for a rejected command"


def test_cuda_without_cuda_is_refused(tmp_path, capsys, no_gpu):
    assert run(tmp_path, "--device", "cuda") == 2
    assert (
        "CUDA is not available on this machine; accepted here: auto, cpu" in capsys.readouterr().err
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["run", "--out", str(locked / "x"), "--seq-lens", "32"]) == 2
    assert "--out: cannot write results to" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["run", "--out", str(tmp_path / "file"), "--seq-lens", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench: error: --out: cannot write results to") and err.count("\n") == 1


def test_resume_finishes_an_interrupted_run(tmp_path, monkeypatch):
    real = attn_zoo.bench.runner.run_case
    monkeypatch.setattr("attn_zoo.bench.sweep.run_case", interrupting(real, at=3))
    args = ["--seq-lens", "32,48", "--mechanisms", "dense,sparse_fixed"]
    assert run(tmp_path, *args) == 130
    first = rows(tmp_path)
    assert len(first) == 2
    monkeypatch.setattr("attn_zoo.bench.sweep.run_case", real)
    assert main(["run", "--resume", str(tmp_path / "r")]) == 0
    final = rows(tmp_path)
    keys = [(r["mechanism"], r["impl"], r["seq_len"]) for r in final]
    assert len(final) == 6 and len(set(keys)) == 6
    assert final[:2] == first, "finished rows are kept as they were"
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert len(meta["resumed"]) == 1


def test_resume_drops_a_half_written_row(tmp_path):
    assert run(tmp_path, "--seq-lens", "32", "--mechanisms", "dense") == 0
    path = tmp_path / "r" / "results.csv"
    path.write_text(path.read_text() + "dense,reference,cpu,float32,1")
    assert main(["run", "--resume", str(tmp_path / "r")]) == 0
    assert len(rows(tmp_path)) == 2


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


@pytest.fixture
def exploding_mechanism():
    """A mechanism whose reference runs out of memory from N = 64 on, or
    returns NaN at N = 48."""
    dense = attn_zoo.get("dense")

    @attn_zoo.register
    class Exploding(type(dense)):
        name = "exploding"

        @dataclasses.dataclass(frozen=True)
        class Config:
            pass

    @Exploding.implementation("reference")
    def _(mech, q, k, v, plan):
        if q.shape[2] >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        out = dense(q, k, v, causal=plan.causal)
        return out * torch.nan if q.shape[2] == 48 else out

    yield "exploding"
    attn_zoo.unregister("exploding")


def test_failing_cases_become_rows_and_the_sweep_goes_on(tmp_path, exploding_mechanism):
    code = run(tmp_path, "--seq-lens", "32,48,64,80", "--mechanisms", "exploding,dense",
               "--impls", "reference")  # fmt: skip
    assert code == 0
    status = {(r["mechanism"], r["seq_len"]): r["status"] for r in rows(tmp_path)}
    assert status == {
        ("exploding", "32"): "ok", ("exploding", "48"): "nan", ("exploding", "64"): "oom",
        ("exploding", "80"): "oom", ("dense", "32"): "ok", ("dense", "48"): "ok",
        ("dense", "64"): "ok", ("dense", "80"): "ok",
    }  # fmt: skip
    oom = next(r for r in rows(tmp_path) if r["status"] == "oom")
    assert "OutOfMemoryError" in oom["note"]


def test_unavailable_impl_is_a_skipped_row(tmp_path, no_gpu, monkeypatch, capsys):
    """A sweep whose every row is skipped measured nothing: it says so, exit 1."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run(tmp_path, "--seq-lens", "32", "--mechanisms", "dense", "--impls", "triton") == 1
    (row,) = rows(tmp_path)
    assert row["status"] == "skipped" and "interpret" in row["note"]
    assert "every case was skipped, nothing was measured" in capsys.readouterr().out


def test_fwd_bwd_mode(tmp_path):
    assert run(tmp_path, "--seq-lens", "40", "--mechanisms", "xl", "--mode", "fwd_bwd") == 0
    (row,) = rows(tmp_path)
    assert row["status"] == "ok" and row["mode"] == "fwd_bwd"


def test_fwd_bwd_mode_times_every_triton_impl_and_skips_those_without_backward(tmp_path):
    """In the interpreter: the backward kernels give an ok row for every mechanism;
    flex, which has no backward on the CPU, gives skipped rows saying so."""
    pytest.importorskip("triton")
    args = ["--seq-lens", "64", "--impls", "triton,flex", "--mode", "fwd_bwd", "--interpret"]
    assert run(tmp_path, *args, "--repeats", "1") == 0
    table = rows(tmp_path)
    triton = {r["mechanism"]: r for r in table if r["impl"] == "triton"}
    assert set(triton) == set(attn_zoo.names())
    assert all(r["status"] == "ok" and float(r["err_oracle"]) < 1e-5 for r in triton.values())
    flex = [r for r in table if r["impl"] == "flex"]
    assert flex and all(r["status"] == "skipped" for r in flex)
    assert all("has no backward pass on cpu" in r["note"] for r in flex)


def test_pairs_are_counted_once_per_mechanism_and_inputs(tmp_path, monkeypatch):
    """Every impl of a mechanism on the same inputs attends the same pairs: the sweep
    counts them once (from the oracle's bias that is 12-28 s a case at N = 8,192 on the
    CPU for adaptive span, xl and compressive), and each row carries the same work."""
    counted = []
    real = attn_zoo.dense.Dense.pairs
    monkeypatch.setattr(attn_zoo.dense.Dense, "pairs",
                        lambda *a: counted.append(1) or real(*a))  # fmt: skip
    monkeypatch.setattr(attn_zoo.bench.runner, "_PAIRS", {}, raising=False)
    assert run(tmp_path, "--seq-lens", "64,96", "--mechanisms", "dense",
               "--impls", "reference,sdpa", "--mode", "fwd,fwd_bwd") == 0  # fmt: skip
    table = rows(tmp_path)
    assert len(table) == 8 and len(counted) == 2  # one per length
    for n in ("64", "96"):
        assert len({(r["flops"], r["density"]) for r in table
                    if r["seq_len"] == n and r["mode"] == "fwd"}) == 1  # fmt: skip
