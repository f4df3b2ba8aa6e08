"""Triton kernels against the references and the oracle. Without a GPU they
run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small N."""

import pytest
import torch

import attn_zoo
from attn_zoo import oracle
from conftest import qkv

pytest.importorskip("triton")
import attn_zoo.kernels.flash
from attn_zoo.kernels.dense import dense_attention
from attn_zoo.kernels.flash import flash_attention
from attn_zoo.kernels.layout import Band, build_layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernel launchers allocate starts as NaN."""

    def nan_filled(q, shape, dtype):
        return torch.full(shape, float("nan"), device=q.device, dtype=dtype)

    monkeypatch.setattr(attn_zoo.kernels.flash, "new_output", nan_filled)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n", [64, 77])
def test_dense_kernel_matches_oracle(n, causal, dim, dtype, tol):
    q, k, v = (x.to(DEVICE) for x in qkv(n, heads=2, dim=dim, dtype=dtype))
    out = dense_attention(q, k, v, causal)
    rows = torch.arange(n)
    assert torch.isfinite(out).all()
    assert oracle.rel_error(out, oracle.dense(q, k, v, causal, rows)) < tol
    reference = attn_zoo.get("dense")(q, k, v, causal=causal, impl="reference")
    assert oracle.rel_error(out, reference) < tol


def test_keys_longer_than_queries_with_causal_offset():
    q, k, v = qkv(40, n_k=100, heads=2, dim=32)
    band = Band(lo=0, offset=60)
    layout = build_layout(40, 100, band, block_m=32, block_n=32)
    out, lse = flash_attention(q, k, v, layout, band)
    visible = torch.ones(40, 100, dtype=torch.bool).tril(60)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    assert oracle.rel_error(out, expected) < 1e-5
    scores = (q @ k.transpose(-1, -2)) * 32**-0.5
    torch.testing.assert_close(lse, scores.masked_fill(~visible, -torch.inf).logsumexp(-1))


def test_rows_with_no_visible_key_give_zero_and_minus_inf():
    q, k, v = qkv(64, heads=1, dim=32)
    band = Band(lo=100)  # nothing is 100 behind in 64 tokens
    layout = build_layout(64, 64, band, block_m=32, block_n=32)
    out, lse = flash_attention(q, k, v, layout, band)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_layout_separates_full_and_masked_blocks():
    layout = build_layout(256, 256, Band(lo=0))
    assert layout.full_count.tolist() == [[0, 1, 2, 3]]  # below the diagonal
    assert layout.partial_count.tolist() == [[1, 1, 1, 1]]  # the diagonal
    assert layout.blocks_visited == 10


def test_triton_refuses_float64_and_odd_head_dims():
    q, k, v = qkv(16, heads=1, dim=32, dtype=torch.float64)
    with pytest.raises(ValueError, match="dense/triton: unsupported dtype float64"):
        attn_zoo.get("dense")(q, k, v, impl="triton")
    q, k, v = qkv(16, heads=1, dim=48)
    with pytest.raises(ValueError, match="unsupported head_dim 48; accepted: 32, 64, 128"):
        attn_zoo.get("dense")(q, k, v, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_kernel_on_gpu(dtype, causal):
    q, k, v = (x.cuda() for x in qkv(2048 + 17, heads=4, dim=128, dtype=dtype))
    out = dense_attention(q, k, v, causal)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert oracle.rel_error(out, expected) < 1e-2


def compile_check(*args: str) -> str:
    """``python -m attn_zoo.kernels.compile_check *args`` (compiled, not interpreted):
    its output, once it exits 0."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-W", "ignore", "-m", "attn_zoo.kernels.compile_check", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def strict() -> list[str]:
    """--strict where its known gaps were measured: Triton >= 3.9. Triton 3.6 (the GPU
    image's) compiles every variant too but spills a little more (xl 8 B at head_dim
    64, lsh up to 208 B), so there the check is compile-only."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return ["--strict"] if (major, minor) >= (3, 9) else []


@pytest.mark.parametrize(
    "kernels,dtypes,dims",
    [
        ("fwd", "fp16,bf16", "32,64,128"),
        ("fwd", "fp32", "32,64,128"),
        ("bwd_dq,bwd_dkdv", "fp16", "64,128"),
    ],
)
def test_core_compiles_for_h100_without_a_gpu(kernels, dtypes, dims, tmp_path):
    """Triton's whole pipeline down to a cubin for sm_90, for every flag set the
    mechanisms launch, forward and backward: a kernel that only works in the
    interpreter fails here, and (--strict) so does a new spill or a missing HGMMA
    at head_dim >= 64."""
    out = compile_check("--arch", "90", "--kernels", kernels, "--dtypes", dtypes,
                        "--dims", dims, "--out", str(tmp_path), *strict())  # fmt: skip
    assert "0 failure(s)" in out
    import json

    rows = json.loads((tmp_path / "compile.json").read_text())
    combinations = len(kernels.split(",")) * len(dtypes.split(",")) * len(dims.split(","))
    assert len(rows) == combinations * 15
    for row in rows:  # the analysis read every compiled variant
        assert row["registers"] > 0 and row["spill_store_bytes"] is not None, row
        if row["dtype"] != "fp32":  # fp32 (IEEE) dots run on FMA units, not MMA
            assert row["hgmma"] + row["hmma"] > 0, row
        assert row["loop_instructions"] > 0, row  # the hot loop was found in the SASS
    report, _, targets = (tmp_path / "compile.md").read_text().partition("## Targets")
    assert report.count("\n| ") == len(rows) + 1
    assert "| met |" in targets
    if "fwd" in kernels and "fp16" in dtypes:  # lsh's floor: its rules' cost apart
        floor = json.loads((tmp_path / "lsh-floor.json").read_text())
        assert "## lsh's floor" in targets and len(floor) == 2 * 5  # at 64 and 128
        for dim in (64, 128):
            walks = [r for r in floor if r["head_dim"] == dim]
            assert walks[0]["walk"] == "dense, element mask only"
            # Eq. 7's tests cost instructions: a DUP the kernel ignored would not
            assert walks[1]["masked_per_4k"] < walks[2]["masked_per_4k"] < walks[4]["masked_per_4k"]
            if strict():  # where the spills were measured
                assert all(r["spill_store_bytes"] == 0 for r in walks)


def test_core_compiles_where_an_integer_argument_is_one():
    """The JIT turns an integer argument equal to 1 into a constant, a Python int with
    no tensor methods: lsh's reach of 1 failed to compile so on an H100 (``reach.to``),
    which no interpreter run and no aligned compile shows. Every variant of the three
    kernels compiles with every integer argument 1 and with 64-bit row offsets (whose
    branch compiled nowhere before either)."""
    out = compile_check("--dtypes", "fp16", "--dims", "32", "--unit-scalars")
    assert out.count(": ok") == 3 * 15
    assert "0 failure(s); integer arguments of 1" in out


def test_hot_loop_counts_the_first_loop_holding_a_matrix_instruction():
    """SASS as cuobjdump prints it (branch targets as addresses, or as labels in older
    versions): the loop without an MMA is passed over; the body counts from the target
    to the backward branch."""
    from attn_zoo.kernels.compile_check import hot_loop

    def line(address, text):
        return f"        /*{address:04x}*/                   {text} ;   /* 0x0 */"

    body = [line(0x00, "MOV R1, R2"), line(0x10, "IADD3 R1, R1, 0x1, RZ"),
            line(0x20, "@P0 BRA 0x10"),  # a loop without MMA
            line(0x30, "LDS R4, [R2]"), line(0x40, "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24"),
            line(0x50, "FADD R3, R3, R4"), line(0x60, "@P1 BRA 0x30"),
            line(0x70, "EXIT")]  # fmt: skip
    assert hot_loop("\n".join(body)) == 4
    labelled = [line(0x00, "MOV R1, R2"), ".L_x_1:", line(0x10, "HMMA.16816.F32 R4, R8, R12, R4"),
                line(0x20, "@P1 BRA `(.L_x_1)"), line(0x30, "EXIT")]  # fmt: skip
    assert hot_loop("\n".join(labelled)) == 2
    assert hot_loop(line(0x00, "EXIT")) is None


@pytest.mark.parametrize(
    "args,message",
    [(["--dtypes", "float16"], "unknown dtype 'float16'; accepted: fp16, bf16, fp32"),
     (["--kernels", "bwd"], "unknown kernel 'bwd'; accepted: fwd, bwd_dq, bwd_dkdv")],
)  # fmt: skip
def test_compile_check_refuses_bad_arguments_in_one_line(args, message, capsys):
    from attn_zoo.kernels.compile_check import main

    assert main(args) == 2
    assert capsys.readouterr().out.strip() == f"compile_check: {message}"


def test_strict_gaps_name_new_gaps_and_fixed_known_ones(monkeypatch):
    """--strict fails on a spill, a missing HGMMA or a single-buffered band forward
    that KNOWN_GAPS does not list, and on a listed gap that is gone (a stale list
    would hide the next regression)."""
    from attn_zoo.kernels import compile_check

    monkeypatch.setattr(compile_check, "KNOWN_GAPS", {("bwd_dq", "xl", 64, "spills")})
    row = dict(kernel="bwd_dq", variant="xl", dtype="fp16", head_dim=64, hgmma=8)
    assert compile_check._gaps(row | {"spill_store_bytes": 96}) == []
    assert compile_check._gaps(row | {"spill_store_bytes": 0}) == [
        "spills is fixed (drop it from KNOWN_GAPS)"
    ]
    dense = dict(kernel="fwd", variant="dense / band", dtype="bf16", head_dim=128, stages=3,
                 loop_async_copies=16)  # fmt: skip
    assert compile_check._gaps(dense | {"spill_store_bytes": 8, "hgmma": 0}) == [
        "spills", "no HGMMA"
    ]  # fmt: skip
    # a band forward whose K/V loads the pipeliner left synchronous (xl's, behind a
    # tl.debug_barrier), or that runs one stage
    for single in ({"loop_async_copies": 0}, {"stages": 1}):
        row = dense | {"variant": "xl", "spill_store_bytes": 0, "hgmma": 8} | single
        assert compile_check._gaps(row) == ["K/V single-buffered"]
    gathered = dense | {"variant": "lsh buckets", "spill_store_bytes": 0, "hgmma": 8}
    assert compile_check._gaps(gathered | {"loop_async_copies": 0}) == []
    # float32 runs on the FMA units (no HGMMA); its forward must not spill, at every head_dim
    fp32 = dense | {"dtype": "fp32", "hgmma": 0, "head_dim": 32}
    assert compile_check._gaps(fp32 | {"spill_store_bytes": 0}) == []
    assert compile_check._gaps(fp32 | {"spill_store_bytes": 8}) == ["spills"]
    assert compile_check._gaps(fp32 | {"spill_store_bytes": 8, "kernel": "bwd_dkdv"}) == []


@pytest.mark.parametrize("mode", ["buckets", "chunks", "window"])
def test_round_codes_fold_each_lsh_rule_into_one_range_test(mode):
    """Eq. 7's per-round visibility from the codes, against the rule stated directly
    on groups and sorted places (attn_zoo.grouped), for every pair."""
    from attn_zoo.kernels.grouped import round_codes
    from attn_zoo.kernels.sorting import sort_by_group

    torch.manual_seed(0)
    n, chunk = 37, 4
    rounds = torch.randint(0, 5, (1, 1, 3, n))
    dup = round_codes(rounds, 1, 1, chunk, mode)
    _, place = sort_by_group(rounds)
    for r in range(3):
        g, p = rounds[0, 0, r], place[0, 0, r]
        same = g[:, None] == g[None, :]
        if mode == "window":
            back = p[:, None] - p[None, :]
            rule = same & (back >= 0) & (back <= chunk)
        else:
            step = (p // chunk)[:, None] - (p // chunk)[None, :]
            rule = (step == 0) | (step == 1)
            rule = rule & same if mode == "buckets" else rule
        code = dup.codes[0, r].long()
        diff = code[:, None] - code[None, :]
        assert torch.equal((diff >= 0) & (diff <= dup.reach), rule)
    assert dup.round == 0 and dup.for_round(2).round == 2
    assert dup.for_round(2).codes is dup.codes


@pytest.mark.parametrize("mode", ["buckets", "window"])
def test_rounds_built_together_give_each_rounds_own_layout(mode, monkeypatch):
    """sorted_parts builds every round's layout in one call (one sort, one layout of
    R x B x H rows, split per round): each round's part must list the blocks that
    round's own layout lists, in the same order, and keep the order of its tokens."""
    import attn_zoo.kernels.grouped as grouped
    from attn_zoo.kernels.sorting import sort_by_group

    torch.manual_seed(2)
    b, h, rounds, n, chunk = 2, 3, 3, 150, 8
    groups = torch.randint(0, 7, (b, h, rounds, n))
    q = torch.zeros(b, h, n, 32)
    built = []
    real = grouped.build_layout
    monkeypatch.setattr(grouped, "build_layout", lambda *a, **k: built.append(1) or real(*a, **k))
    parts = grouped.sorted_parts(q, q, q, groups, chunk, mode, self_bias=-1e4)
    assert len(built) == 1 and len(parts) == rounds
    for r, part in enumerate(parts):
        perm, _ = sort_by_group(groups[:, :, r].reshape(b * h, n))
        assert torch.equal(part.q_index, perm.to(torch.int32)) and part.k_index is part.q_index
        ordered = groups[:, :, r].reshape(b * h, n).gather(-1, perm).to(torch.int32)
        got = part.layout
        want = real(n, n, part.band, part.window, q_groups=ordered, k_groups=ordered,
                    self_pairs=True, block_m=got.block_m, block_n=got.block_n)  # fmt: skip
        for name in ("full", "partial"):
            count = getattr(want, name + "_count")
            assert torch.equal(getattr(got, name + "_count"), count)
            width = getattr(want, name).shape[-1]  # the rounds' widest row pads the others
            listed = getattr(got, name)[..., :width]
            keep = torch.arange(width) < count[..., None]
            assert torch.equal(torch.where(keep, listed, -1), getattr(want, name))
        assert torch.equal(got.own_count, want.own_count)
        assert got.full_runs == want.full_runs or not got.full_runs


@pytest.mark.parametrize("self_pairs", [False, True])
@pytest.mark.parametrize("rule", ["band", "window"])
def test_a_grouped_layout_lists_the_blocks_its_pairs_decide_and_reads_nothing_back(
    rule, self_pairs
):  # fmt: skip
    """A layout with groups (built per call by lsh and routing) is sized by the same
    positions without groups, kept on the host: warm, it reads no value back from its
    tensors. Against the pairs themselves: a block pair is listed full exactly when
    every pair in it is visible (and, with self pairs, none is i == j), listed as
    partial when some is but not all, and never both; the blocks holding i == j lead
    the partial list; full runs are contiguous; the key-major lists agree."""
    from attn_zoo.bench.host_ops import _Counter
    from attn_zoo.kernels.layout import Window

    torch.manual_seed(3)
    n, block = 150, 16
    groups = torch.randint(0, 5, (4, n)).sort(-1).values.to(torch.int32)
    band, window = (Band(lo=0, hi=20), None) if rule == "band" else (Band(), Window(8, 8, -8, 7))

    def build():
        return build_layout(n, n, band, window, q_groups=groups, k_groups=groups,
                            self_pairs=self_pairs, block_m=block, block_n=block)  # fmt: skip

    assert build().by_key.n_kb  # the host bound, built and cached once
    with _Counter() as counter:
        layout = build()
        by_key = layout.by_key
    assert counter.syncs == 0
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (i - j >= band.lo) & (i - j <= band.hi) & (groups[:, :, None] == groups[:, None, :])
    if window is not None:
        seg = (i // window.seg_len) * window.step
        visible &= (j >= seg + window.lo) & (j <= seg + window.hi)
    blocks = range(0, n, block)
    for g in range(groups.shape[0]):
        for qb, a in enumerate(blocks):
            full = set(layout.full[g, qb, : layout.full_count[g, qb]].tolist())
            partial = layout.partial[g, qb, : layout.partial_count[g, qb]].tolist()
            own = layout.own_count[g, qb] if self_pairs else 0
            if layout.full_runs and full:
                assert full == set(range(min(full), min(full) + len(full)))
            for kb, c in enumerate(blocks):
                pairs = visible[g, a : a + block, c : c + block]
                holds_self = a == c
                whole = pairs.all() and pairs.shape == (block, block)
                is_full = bool(whole and not (self_pairs and holds_self))
                assert (kb in full) == is_full, (g, qb, kb)
                assert kb not in partial or not is_full
                if pairs.any() and not is_full:
                    assert kb in partial, (g, qb, kb)
                if self_pairs and kb in partial:
                    assert (partial.index(kb) < own) == holds_self
                assert (qb in by_key.full[g, kb, : by_key.full_count[g, kb]].tolist()) == is_full
                listed = by_key.partial[g, kb, : by_key.partial_count[g, kb]].tolist()
                assert (qb in listed) == (kb in partial)


def test_a_partial_only_layout_lists_every_visited_block_as_partial():
    """For a launch testing groups its layout was not given (lsh), every block the
    positions visit is partial: the same blocks, none full, own blocks still first."""
    from attn_zoo.kernels.layout import Window

    window = Window(16, 16, -16, 15)
    blocks = dict(block_m=16, block_n=16)
    plain = build_layout(150, 150, Band(), window, self_pairs=True, **blocks)
    partial = build_layout(150, 150, Band(), window, self_pairs=True, partial_only=True, **blocks)
    assert int(plain.full_count.sum()) > 0 and int(partial.full_count.sum()) == 0
    assert torch.equal(partial.partial_count, plain.full_count + plain.partial_count)
    assert torch.equal(partial.own_count, plain.own_count)
    for row in range(plain.full.shape[1]):
        visited = set(plain.full[0, row, : plain.full_count[0, row]].tolist())
        visited |= set(plain.partial[0, row, : plain.partial_count[0, row]].tolist())
        listed = partial.partial[0, row, : partial.partial_count[0, row]].tolist()
        assert set(listed) == visited
        own = plain.own_count[0, row]
        assert listed[:own] == plain.partial[0, row, :own].tolist()


def test_a_layout_walks_in_steps_of_several_blocks_only_where_its_lists_allow():
    """The forward's wide steps (Tile.span) start at every span-th masked entry of a
    row: lsh's chunk windows list blocks c - 1 and c, one step; listed own block first
    (self pairs), a gap, or a last step reaching a full block would not be walked
    right, and the forward then takes a block a step (flash.forward_tile)."""
    from attn_zoo.kernels.layout import BlockLayout, Window

    chunks = dict(band=Band(), window=Window(16, 16, -16, 15), partial_only=True,
                  block_m=16, block_n=16)  # fmt: skip
    assert build_layout(150, 150, **chunks).walks_in_steps(2)
    assert not build_layout(150, 150, self_pairs=True, **chunks).walks_in_steps(2)
    # causal: the diagonal block is a row's only masked one, the step past it unseen
    causal = build_layout(150, 150, Band(lo=0), block_m=16, block_n=16)
    assert causal.walks_in_steps(2) and causal.walks_in_steps(1)
    # keys at or after the query: the step past the diagonal block reaches a full one
    ahead = build_layout(150, 150, Band(hi=0), block_m=16, block_n=16)
    assert not ahead.walks_in_steps(2)

    def listing(partial: list[int]) -> BlockLayout:
        none = torch.full((1, 1, 1), -1, dtype=torch.int32)
        return BlockLayout(16, 16, none, torch.zeros(1, 1, dtype=torch.int32),
                           torch.tensor([[partial]], dtype=torch.int32),
                           torch.tensor([[len(partial)]], dtype=torch.int32), 8)  # fmt: skip

    assert listing([2, 3, 6]).walks_in_steps(2) and not listing([2, 4]).walks_in_steps(2)
    assert not listing([3, 2]).walks_in_steps(2)  # descending: the step from 3 misses 2
    assert listing([0, 1, 2, 5]).walks_in_steps(3) and not listing([0, 1, 3]).walks_in_steps(3)


def test_lsh_builds_no_layout_per_call(monkeypatch):
    """lsh's parts read cached layouts of positions (its groups tested in every
    block), so a warm call builds none: round 0's, with its blocks holding i == j
    first (the self penalty), and the later rounds' one; causal routing still builds
    its clusters'."""
    import attn_zoo.kernels.grouped as grouped
    import attn_zoo.kernels.layout as layout_module
    from attn_zoo.kernels.dry_run import recorded

    q = torch.randn(1, 2, 256, 32)
    built = []
    real = layout_module.build_layout
    monkeypatch.setattr(grouped, "build_layout", lambda *a, **k: built.append(1) or real(*a, **k))
    for name, config in (("lsh", {"bucket_size": 16}), ("routing", {})):
        mech = attn_zoo.get(name, **config)
        plan = mech.plan(q, q, q, True)
        with torch.no_grad(), recorded() as calls:
            mech.impl("triton").run(mech, q, q, q, plan)
            built.clear()
            mech.impl("triton").run(mech, q, q, q, plan)
        parts = calls[-1][1]
        if name == "lsh":
            assert built == [] and len({id(p.layout) for p in parts[1:]}) == 1
            assert parts[0].layout.own_count is not None and parts[1].layout.own_count is None
            assert all(int(p.layout.full_count.sum()) == 0 for p in parts)
        else:
            assert len(built) == 1


def test_lsh_round_codes_need_no_read_back_given_the_bucket_count():
    """Given the bucket count, the int32 check of the round codes is decided on the
    host; the codes are the same as with the count read from the buckets, and a count
    whose codes would pass 2^31 is refused in one line."""
    from attn_zoo.kernels.grouped import round_codes

    rounds = torch.randint(0, 6, (1, 1, 2, 40))
    for mode in ("buckets", "chunks", "window"):
        read, given = round_codes(rounds, 1, 1, 4, mode), round_codes(rounds, 1, 1, 4, mode, 6)
        assert torch.equal(read.codes, given.codes) and read.reach == given.reach
    for mode in ("buckets", "window"):
        with pytest.raises(ValueError, match="lsh: 1000000000 buckets at N = 40 overflow"):
            round_codes(rounds, 1, 1, 4, mode, 10**9)
    round_codes(rounds, 1, 1, 4, "chunks", 10**9)  # codes of places only: no overflow


@pytest.mark.parametrize("mode", ["buckets", "chunks", "window"])
def test_one_sort_serves_the_round_codes_and_the_parts(mode):
    """lsh sorts its rounds once per call (SortedRounds): the codes from those places
    are the codes round_codes sorts for itself, with batch and heads apart, and the
    parts take that order."""
    from attn_zoo.kernels.grouped import SortedRounds, round_codes, sorted_parts

    b, h, n = 2, 3, 40
    rounds = torch.randint(0, 6, (b, h, 3, n))
    order = SortedRounds.of(rounds, b, h)
    own = round_codes(rounds, b, h, 4, mode, 6)
    shared = round_codes(rounds, b, h, 4, mode, 6, place=order.places(b, h))
    assert torch.equal(own.codes, shared.codes) and own.reach == shared.reach
    q = torch.randn(b, h, n, 32)
    parts = sorted_parts(q, q, q, rounds, 4, mode, -1e4, shared, order=order)
    for r, part in enumerate(parts):
        rows = order.perm[r * b * h : (r + 1) * b * h]
        assert torch.equal(part.q_index, rows.to(torch.int32))
    assert order.perm.shape == (3 * b * h, n)
    assert torch.equal(order.groups.gather(-1, order.perm).diff(dim=-1) >= 0,
                       torch.ones(3 * b * h, n - 1, dtype=torch.bool))  # fmt: skip


def test_a_round_outside_the_codes_is_refused():
    """A part for round r reads the codes of rounds 0..r-1: r must be one of them."""
    from attn_zoo.kernels.flash import Duplicates

    dup = Duplicates(torch.zeros(1, 3, 5, dtype=torch.int32), reach=1)
    with pytest.raises(ValueError, match="lsh: round 3 of 3; accepted: 0 to 2"):
        dup.for_round(3)


def test_group_runs_are_each_rows_keys_of_its_group():
    """Groups sorted along the kernel order: a query's keys of its own group are one
    run [first, end), what the kernels test instead of comparing groups per pair."""
    from attn_zoo.kernels.flash import Part

    torch.manual_seed(1)
    q_groups = torch.randint(0, 6, (3, 29)).sort(-1).values
    k_groups = torch.randint(0, 6, (3, 41)).sort(-1).values
    k = torch.zeros(1, 3, 41, 8)
    layout = build_layout(29, 41, Band(), block_m=16, block_n=16)
    first, end = Part(k, k, layout, groups=(q_groups, k_groups)).group_runs
    j = torch.arange(41)
    for g in range(3):
        same = q_groups[g][:, None] == k_groups[g][None, :]
        run = (j[None, :] >= first[g][:, None]) & (j[None, :] < end[g][:, None])
        assert torch.equal(run, same)
    # one layout row of groups for q, one per (batch, head) for k: broadcast
    first, end = Part(k, k, layout, groups=(q_groups[:1], k_groups)).group_runs
    assert first.shape == (3, 29) and first.dtype == torch.int32


def test_a_self_bias_needs_q_and_k_in_the_same_order():
    """The self bias marks the pair of equal kernel indices: with q and k read through
    different indices that is not the pair i == j of positions, so it is refused."""
    from attn_zoo.kernels.flash import Part

    k = torch.zeros(1, 1, 16, 8)
    layout = build_layout(16, 16, Band(), self_pairs=True, block_m=16, block_n=16)
    index = torch.arange(16, dtype=torch.int32)[None]
    Part(k, k, layout, q_index=index, k_index=index, self_bias=-1e5)  # one index: fine
    with pytest.raises(ValueError, match="self_bias needs q and k read in the same order"):
        Part(k, k, layout, q_index=index, k_index=index.clone(), self_bias=-1e5)
    # the kernels test the pair i == j only in the blocks the layout lists as holding it
    unlisted = build_layout(16, 16, Band(), block_m=16, block_n=16)
    with pytest.raises(ValueError, match="accepted: one built with self_pairs=True"):
        Part(k, k, unlisted, self_bias=-1e5)


def test_a_symmetric_ramp_needs_the_self_pair_hidden_and_no_offset():
    """Bidirectionally the kernels take |x| as s x with one sign s per row in every
    masked block apart from the pair i == j: that holds with the self pair walked
    apart (a self bias) and x = i - j (no band offset); anything else is refused."""
    from attn_zoo.kernels.flash import Part, Ramp

    k = torch.zeros(1, 1, 16, 8)
    ramp = Ramp(torch.ones(1), 4.0, symmetric=True)
    layout = build_layout(16, 16, Band(), self_pairs=True, block_m=16, block_n=16)
    Part(k, k, layout, Band(), ramp=ramp, self_bias=float("-inf"))  # adaptive span's form
    for band, bias in ((Band(), None), (Band(offset=2), float("-inf"))):
        with pytest.raises(ValueError, match="accepted: a self_bias and a band offset of 0"):
            Part(k, k, layout, band, ramp=ramp, self_bias=bias)


def test_blocks_holding_the_pair_i_j_lead_each_masked_list():
    """With self_pairs, the partial blocks that hold a pair i == j come first in their
    row, counted by own_count; key-major (the dK/dV pass) the same holds per key block."""
    layout = build_layout(256, 256, Band(lo=-100, hi=100), self_pairs=True, block_m=64,
                          block_n=64)  # fmt: skip
    assert layout.partial_count.tolist() == [[3, 4, 4, 3]]
    assert layout.own_count.tolist() == [[1, 1, 1, 1]]
    assert layout.partial[0, :, 0].tolist() == [0, 1, 2, 3]  # the diagonal leads
    assert sorted(layout.partial[0, 1].tolist()) == [0, 1, 2, 3]
    wide = build_layout(256, 256, Band(lo=-100, hi=100), self_pairs=True, block_m=128,
                        block_n=64)  # fmt: skip
    assert wide.own_count.tolist() == [[2, 2]]
    assert [sorted(row[:2].tolist()) for row in wide.partial[0]] == [[0, 1], [2, 3]]
    by_key = wide.by_key
    assert by_key.own_count.tolist() == [[1, 1, 1, 1]]
    assert by_key.partial[0, :, 0].tolist() == [0, 0, 1, 1]
    assert build_layout(256, 256, Band(lo=-100, hi=100)).own_count is None


def test_walk_bodies_are_the_full_then_the_masked_walk():
    """Every kernel of the core walks its full blocks, then its masked ones: the
    report counts both loops, a loop nested in one counting as part of it."""
    from attn_zoo.kernels.compile_check import walk_bodies

    def line(address, text):
        return f"        /*{address:04x}*/                   {text} ;   /* 0x0 */"

    body = [line(0x00, "MOV R1, R2"),
            line(0x10, "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24"), line(0x20, "@P1 BRA 0x10"),
            line(0x30, "ISETP.GE.U32.AND P3, PT, R1, R2, PT"),
            line(0x40, "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24"),
            line(0x50, "IADD3 R1, R1, 0x1, RZ"), line(0x60, "@P2 BRA 0x50"),  # nested
            line(0x70, "@P1 BRA 0x30"), line(0x80, "EXIT")]  # fmt: skip
    full, masked = walk_bodies("\n".join(body))
    assert len(full) == 2 and len(masked) == 5
    # with a self bias, a third walk: the masked blocks holding the pair i == j
    own = [line(0x80, "HGMMA.64x64x16.F32 R24, gdesc[UR4], R24"), line(0x90, "@P1 BRA 0x80"),
           line(0xA0, "EXIT")]  # fmt: skip
    walks = walk_bodies("\n".join(body[:-1] + own))
    assert [len(w) for w in walks] == [2, 5, 2]


def test_the_compile_signature_types_every_pointer():
    """An upper-case argument of a kernel is a pointer: one the report does not type
    would compile as an integer (and fail deep in Triton), so it is refused by name."""
    from types import SimpleNamespace

    from attn_zoo.kernels.compile_check import signature

    def kernel(names):
        params = [SimpleNamespace(is_constexpr=False) for _ in names]
        return SimpleNamespace(arg_names=names, params=params, fn=SimpleNamespace(__name__="k"))

    assert signature(kernel(["Q", "OWN_COUNT", "H", "n_q"]), "fp16") == {
        "Q": "*fp16", "OWN_COUNT": "*i32", "H": "i32", "n_q": "i32"}  # fmt: skip
    with pytest.raises(ValueError, match="no element type for pointer NEW of k"):
        signature(kernel(["Q", "NEW"]), "fp16")
