"""The mechanisms' forward launches found without a GPU (kernels/dry_run.py), and
the compile report's two walks weighted by where their scores fall
(bench/kernel_mix.py). No kernel runs and nothing compiles here but in the last
test."""

import json
import os
import subprocess
import sys

import pytest
import torch

import attn_zoo

pytest.importorskip("triton")
from attn_zoo.bench import kernel_mix
from attn_zoo.kernels.dry_run import Planned, dry_run


def test_a_dry_run_records_what_would_launch_and_launches_nothing():
    """Dense causal at N = 1,024 on 128-row blocks: one launch; of its 8 x 9 / 2 key
    blocks the 8 on the diagonal need the mask, the rest are full. The output is
    zeros (no kernel ran, on a CPU without the interpreter)."""
    q = torch.randn(1, 2, 1024, 64).half()
    mech = attn_zoo.get("dense")
    with dry_run() as found:
        out = mech.impl("triton").run(mech, q, q, q, mech.plan(q, q, q, True))
    assert len(found) == 1 and not out.any()
    launch = found[0]
    assert launch.tile.blocks == (128, 128)  # the GPU's tile, not the interpreter's
    block = 128 * 128 * 2  # both heads share the layout row
    assert launch.masked_scores == 8 * block and launch.full_scores == 28 * block
    assert dict(launch.flags)["RUNS"] and not dict(launch.flags)["ACCUMULATE"]


def test_a_self_bias_walks_the_blocks_holding_i_j_apart():
    """Sparse Transformer strided, bidirectional: its near part hides the pair i == j
    (the column part holds it), so of each query block's three masked blocks (the
    band of 128 on 128-row blocks) the diagonal one is walked apart; the column part
    has no self bias."""
    found = kernel_mix.launches("sparse_strided", False, 1024, 64, 2, torch.float16)
    near, columns = found
    assert dict(near.flags)["SELF"] and not dict(columns.flags)["SELF"]
    block = 128 * 128 * 2
    assert near.own_scores == 8 * block and near.masked_scores == 14 * block
    assert columns.own_scores == 0


def test_lsh_launches_a_part_per_round_all_masked():
    """Reformer's default 4 rounds: 4 launches, round r testing the r rounds before it
    (Eq. 7), merged into the ones before (ACCUMULATE); its buckets of about half a
    chunk leave no block full. Only round 0 tests the self penalty (every round shows
    the pair i == j, so later ones hide it as seen before); they walk each chunk's
    two 64-key blocks in one step of 128 (at head_dim 64), so the forward's masked
    walk visits the listed blocks plus half a step for the first chunk of each row."""
    found = kernel_mix.launches("lsh", False, 1024, 64, 2, torch.float16)
    flags = [dict(launch.flags) for launch in found]
    assert [f["DUP"] for f in flags] == [0, 1, 2, 3]
    assert [f["ACCUMULATE"] for f in flags] == [False, True, True, True]
    assert sum(launch.full_scores for launch in found) < sum(
        launch.masked_scores + launch.own_scores for launch in found) / 20  # fmt: skip
    assert [f["SELF"] for f in flags] == [True, False, False, False]
    assert found[0].own_scores and not any(launch.own_scores for launch in found[1:])
    first, later = found[0], found[1]
    assert first.tile.span == 1 and first.stepped_scores is None
    assert later.tile.step == 128 and later.tile.blocks == (64, 64)
    # 16 chunks of 64 rows: blocks c - 1 and c for c >= 1 (31 listed), one step each
    block = 64 * 64 * 2  # both heads share the layout row
    assert later.masked_scores == 31 * block and later.stepped_scores == 16 * 2 * block
    # at head_dim 128 the wide step leaves no registers for a third earlier round's codes
    wide = kernel_mix.launches("lsh", False, 1024, 128, 2, torch.float16)
    assert [launch.tile.span for launch in wide] == [1, 2, 2, 1]


def test_weighting_and_the_ratio_to_dense_with_stand_in_figures():
    """Stand-in figures (full walk 1,000, masked walk 2,000 per 4,096 scores): a
    mechanism's figure is the score-weighted mean, its ratio against dense with the
    same causality, and the target met at most 1.6x."""
    found = [Planned((("DUP", 0),), None, full_scores=300, masked_scores=100),
             Planned((("DUP", 1),), None, full_scores=0, masked_scores=100)]  # fmt: skip
    stand_in = (1000, 2000, None)
    row = kernel_mix.weighted(found, lambda launch, dim, dtype, kernel: stand_in, 64, "fp16")
    assert row == {"launches": 2, "scores": 500, "masked_share": 0.4, "per_4k": 1400}
    # a self bias's own walk (3,000) weighs its scores; a walk with scores needs a figure
    found.append(Planned((("SELF", True),), None, full_scores=0, masked_scores=0,
                         own_scores=500))  # fmt: skip
    own = kernel_mix.weighted(found, lambda launch, dim, dtype, kernel: (1000, 2000, 3000), 64,
                              "fp16")  # fmt: skip
    assert own == {"launches": 3, "scores": 1000, "masked_share": 0.7, "per_4k": 2200}
    with pytest.raises(ValueError, match="no fwd instruction count for a walk"):
        kernel_mix.weighted(found, lambda launch, dim, dtype, kernel: stand_in, 64, "fp16")

    def figures(launch, dim, dtype, kernel="fwd"):
        return (1000, 3000, 3000)

    rows = kernel_mix.mix_rows(["dense", "lsh"], 1024, [64], 2, "fp16", figures)
    by = {(r["mechanism"], r["causal"]): r for r in rows}
    assert by["lsh", True]["masked_share"] > 0.95 and by["lsh", True]["met"] is False
    assert by["dense", False]["per_4k"] == 1000 and by["dense", False]["met"] is None
    assert by["lsh", False]["ratio"] == round(by["lsh", False]["per_4k"] / 1000, 2)


def test_the_backward_weighs_dq_on_the_forward_walks_and_dkdv_on_its_own():
    """Stand-in figures per kernel: dQ walks the forward's scores, dK/dV the pairs whose
    keys get a gradient (here a stop-gradient memory leaves it 200 of 400); both per
    4,096 of the forward's scores, and the ratio against dense's backward."""
    found = [Planned((), None, full_scores=300, masked_scores=100, key_scores=(100, 100, 0))]
    stand_in = {"fwd": (1000, 2000, None), "bwd_dq": (2000, 3000, None),
                "bwd_dkdv": (3000, 4000, None)}  # fmt: skip
    row = kernel_mix.weighted(found, lambda launch, dim, dtype, kernel: stand_in[kernel], 64,
                              "fp16", backward=True)  # fmt: skip
    assert row["per_4k"] == 1250  # (300 x 1,000 + 100 x 2,000) / 400
    # dQ 300 x 2,000 + 100 x 3,000, dK/dV 100 x 3,000 + 100 x 4,000, over 400
    assert row["bwd_per_4k"] == 4000
    assert "bwd_per_4k" not in kernel_mix.weighted(
        found, lambda launch, dim, dtype, kernel: stand_in[kernel], 64, "fp16")  # fmt: skip
    rows = kernel_mix.mix_rows(["dense", "xl"], 1024, [64], 2, "fp16",
                               lambda launch, dim, dtype, kernel: stand_in[kernel],
                               backward=True)  # fmt: skip
    by = {(r["mechanism"], r["causal"]): r for r in rows}
    assert by["dense", True]["bwd_ratio"] == 1.0
    # xl's memories get no dK/dV: its backward walks fewer pairs than its forward
    xl = by["xl", True]
    assert xl["bwd_ratio"] == round(xl["bwd_per_4k"] / by["dense", True]["bwd_per_4k"], 2)


def test_a_dry_run_counts_the_pairs_whose_keys_get_a_gradient():
    """xl's stop-gradient memory: the dK/dV pass walks fewer pairs than the forward;
    dense's walks them all."""
    (xl,) = kernel_mix.launches("xl", True, 1024, 64, 2, torch.float16)
    assert 0 < sum(xl.key_walks) < sum(xl.walks)
    (dense,) = kernel_mix.launches("dense", True, 1024, 64, 2, torch.float16)
    assert dense.key_walks == dense.walks


def test_kernel_mix_refuses_bad_arguments_in_one_line(capsys):
    assert kernel_mix.main(["--mechanisms", "dense,nope"]) == 2
    assert capsys.readouterr().out.startswith("kernel_mix: unknown mechanism 'nope'; accepted: ")
    assert kernel_mix.main(["--dtype", "fp32"]) == 2
    assert capsys.readouterr().out.strip() == (
        "kernel_mix: unknown dtype 'fp32'; accepted: fp16, bf16")  # fmt: skip
    assert kernel_mix.main(["--passes", "bwd"]) == 2
    assert capsys.readouterr().out.strip() == (
        "kernel_mix: passes 'bwd'; accepted: fwd, or fwd,bwd")  # fmt: skip


@pytest.mark.slow
def test_kernel_mix_compiles_each_launch_for_h100(tmp_path):
    """The whole path at a small length: every launch of two mechanisms compiled for
    sm_90 (Triton's bundled ptxas, no GPU; outside the interpreter the tests run
    in), both walks found, the table written."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-W", "ignore", "-m", "attn_zoo.bench.kernel_mix",
               "--mechanisms", "dense,sparse_fixed", "--seq-len", "1024", "--dims", "64",
               "--heads", "2", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "mechanisms.json").read_text())
    assert len(rows) == 4 and all(r["per_4k"] > 0 and r["bwd_per_4k"] > 0 for r in rows)
    assert "| sparse_fixed | True | 64 |" in (tmp_path / "mechanisms.md").read_text()


def test_bench_report_links_the_kernel_reports(tmp_path):
    """bench report's section: links relative to the report's folder and the table's
    figures; a missing or damaged table is one line saying how to write it."""
    folder = tmp_path / "reports" / "kernels-sm90"
    folder.mkdir(parents=True)
    row = {"mechanism": "lsh", "causal": True, "head_dim": 64, "masked_share": 1.0,
           "per_4k": 2637, "ratio": 2.73}  # fmt: skip
    (folder / "mechanisms.json").write_text(json.dumps([row]))
    lines = kernel_mix.report_section(tmp_path / "reports" / "run", folder)
    assert "[compile report](../kernels-sm90/compile.md)" in lines[2]
    assert "| lsh | True | 64 | 100% | 2637 | 2.73x |" in lines
    (folder / "mechanisms.json").write_text("{not json")
    assert "unreadable" in kernel_mix.report_section(tmp_path, folder)[2]
    assert "write it" in kernel_mix.report_section(tmp_path, tmp_path / "none")[2]


def test_the_report_compiles_flag_sets_the_mechanisms_launch():
    """Each variant of the compile report is the flag set of a launch some mechanism
    makes, backward flags included (where each backward launch puts its rows): lsh's
    last round, the trax option across buckets, dense with padded keys among them."""
    import dataclasses

    from attn_zoo.kernels.compile_check import VARIANTS

    def flag_sets(mech, causal, keep=None):
        q = torch.randn(1, 1, 2048, 64, generator=torch.Generator().manual_seed(0)).half()
        plan = mech.plan(q, q, q, causal)
        plan = plan if keep is None else dataclasses.replace(plan, keep=keep)
        with torch.no_grad(), dry_run() as found:
            mech.impl("triton").run(mech, q, q.clone(), q.clone(), plan)
        return {frozenset((f, v) for f, v in launch.flags if v and f != "RUNS")
                for launch in found}  # fmt: skip

    launched = set()
    for name in attn_zoo.registry.pick("all"):
        for causal in (True, False):
            launched |= flag_sets(attn_zoo.get(name), causal)
    launched |= flag_sets(attn_zoo.get("lsh", attend_across_buckets=True), False)
    launched |= flag_sets(attn_zoo.get("dense"), True, torch.rand(1, 2048) < 0.9)
    for variant, flags in VARIANTS.items():
        assert frozenset((f, v) for f, v in flags.items() if v) in launched, variant
