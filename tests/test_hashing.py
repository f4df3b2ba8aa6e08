"""Reformer's hashing in one kernel (attn_zoo.kernels.hashing): the buckets of the
per-round PyTorch form, its tie rule, where plans use it, and its sm_90 build."""

import os
import subprocess
import sys

import pytest
import torch

import attn_zoo
from attn_zoo.kernels.dry_run import recorded
from attn_zoo.lsh import hash_round, shared_keys

pytest.importorskip("triton")
hashing = pytest.importorskip("attn_zoo.kernels.hashing")


def spy_on_the_kernel(monkeypatch) -> list:
    """A list that gains an item at each call of the kernel's entry."""
    entered = []
    entry = hashing.hash_rounds
    monkeypatch.setattr(hashing, "hash_rounds",
                        lambda *a, **k: entered.append(1) or entry(*a, **k))  # fmt: skip
    return entered


def per_round(x, rotations):
    keys = x.float()
    return torch.stack([hash_round(keys, rotations[:, r]) for r in range(rotations.shape[1])], 2)


@pytest.mark.parametrize(
    "dim,half,rounds,n,dtype",
    [(32, 8, 2, 100, torch.float32), (64, 128, 4, 257, torch.float16),
     (128, 3, 3, 70, torch.float32), (64, 1, 1, 64, torch.float32),
     (32, 100, 2, 33, torch.float32)],
)  # fmt: skip
def test_kernel_buckets_are_the_per_round_argmax(dim, half, rounds, n, dtype):
    """Every round at once against argmax([xR; -xR]) per round, with rotations
    wider than one step of columns (128 > 32 at head_dim 64) and narrower than
    tl.dot's 16. Summation orders differ, so a token may differ only where its two
    best candidates are within rounding of each other."""
    g = torch.Generator().manual_seed(dim + half)
    x = torch.nn.functional.normalize(torch.randn(2, 3, n, dim, generator=g), dim=-1).to(dtype)
    rotations = torch.randn(3, rounds, dim, half, generator=g)
    got, want = hashing.hash_rounds(x, rotations), per_round(x, rotations)
    assert got.shape == want.shape == (2, 3, rounds, n) and got.dtype == want.dtype
    xr = torch.einsum("bhnd,hrdc->bhrnc", x.float(), rotations)
    scores = torch.cat([xr, -xr], -1)
    picked = scores.gather(-1, got[..., None])[..., 0]
    best = scores.gather(-1, want[..., None])[..., 0]
    assert torch.all((got == want) | ((picked - best).abs() < 1e-5))
    assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernel_normalizes_the_shared_keys_as_the_per_round_form(dtype):
    """normalize=True: rows of every scale, a zero row among them, hashed as their
    shared keys (F.normalize in float32, cast back to q's dtype) are."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 90, 64, generator=g) * torch.logspace(-3, 3, 90)[:, None]
    q[0, 0, 7] = 0.0
    q = q.to(dtype)
    rotations = torch.randn(2, 3, 64, 40, generator=g)
    got = hashing.hash_rounds(q, rotations, normalize=True)
    want = per_round(shared_keys(q), rotations)
    assert got[0, 0, :, 7].tolist() == want[0, 0, :, 7].tolist() == [0, 0, 0]
    assert (got == want).float().mean() > 0.99


def test_ties_go_to_the_first_index_of_the_concatenation():
    """Equal maxima in two steps of columns (indices 5 and 40 at head_dim 64, 32 columns
    a step): the first; a max of xR equal to -min: the max's (first half)."""
    x = torch.zeros(1, 1, 16, 64)
    x[..., 0] = 1.0
    rotations = torch.zeros(1, 2, 64, 64)
    rotations[0, 0, 0, [5, 40]] = 2.0  # two equal maxima
    rotations[0, 1, 0, [7, 50]] = torch.tensor([-3.0, 3.0])  # max 3 at 50, -min 3 at 7
    got = hashing.hash_rounds(x, rotations)
    assert got[0, 0, 0].tolist() == [5] * 16
    assert got[0, 0, 1].tolist() == [50] * 16
    assert torch.equal(got, per_round(x, rotations))


@pytest.mark.parametrize(
    "rotations,dim,message",
    [((2, 1, 64, 8), 64, r"rotations \(2, 1, 64, 8\) for x \(1, 1, 16, 64\); accepted"),
     ((1, 1, 48, 8), 48, "head_dim 48; accepted: 32, 64, 128")],
)  # fmt: skip
def test_bad_shapes_are_refused_in_one_line(rotations, dim, message):
    with pytest.raises(ValueError, match=message):
        hashing.hash_rounds(torch.randn(1, 1, 16, dim), torch.randn(rotations))


def test_float64_is_refused_and_plans_hash_it_per_round():
    """The kernel reads float32 at most: float64 would be hashed coarser than the
    per-round form, so it is refused, and a plan never sends it there."""
    x = torch.randn(1, 1, 16, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch\.float64; accepted: float32, float16"):
        hashing.hash_rounds(x, torch.randn(1, 1, 64, 8))
    with recorded():
        assert not hashing.runs_on(x)


def test_plans_hash_with_the_kernel_on_a_gpu_and_in_a_dry_run(monkeypatch):
    """On the CPU a plan hashes per round in PyTorch; in a dry run (what a GPU's plan
    does, counted by bench.host_ops) through the kernel's entry, which there computes
    the same buckets out of the counters' sight; at a head_dim the kernel does not
    take, per round everywhere."""
    x = torch.randn(1, 2, 16, 64)
    assert not hashing.runs_on(x)
    with recorded():
        assert hashing.runs_on(x)
        assert not hashing.runs_on(torch.randn(1, 2, 16, 48))
    entered = spy_on_the_kernel(monkeypatch)
    mech = attn_zoo.get("lsh", bucket_size=4, n_hashes=2)
    q = torch.randn(1, 2, 64, 64)
    plain = mech.plan(q, q, q, True)
    assert not entered
    with recorded():
        dry = mech.plan(q, q, q, True)
    assert entered == [1]
    assert torch.equal(plain.buckets, dry.buckets)


def test_kernel_compiles_for_h100_without_spills():
    """Each head_dim's tile through Triton's whole pipeline for sm_90 (no GPU): IEEE
    float32 dots keep their operands in registers, so a wider tile spills. And a
    launch whose integer arguments are 1 (one head, 2 buckets), which the JIT turns
    into constants."""
    script = (
        "import json, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from attn_zoo.kernels import compile_check, hashing\n"
        "k = hashing._hash_rounds\n"
        "sig = dict(X='*fp16', R='*fp32', OUT='*i64', sxb='i32', sxh='i32', sxn='i32',\n"
        "           n='i32', H='i32', half='i32')\n"
        "for dim, (block, chunk, warps) in hashing.TILES.items():\n"
        "    consts = dict(ROUNDS=4, HEAD_DIM=dim, BLOCK=block, CHUNK=chunk, NORMALIZE=True)\n"
        "    s = sig | dict.fromkeys(consts, 'constexpr')\n"
        "    source = ASTSource(k, s, consts, {})\n"
        "    c = triton.compile(source, target=GPUTarget('cuda', 90, 32),\n"
        "                       options={'num_warps': warps})\n"
        "    print(json.dumps(compile_check.analyze(c, 90)))\n"
        "# integer arguments of 1 arrive as constants (the JIT's specialization)\n"
        "ones = dict(n=1, H=1, half=1, ROUNDS=1, HEAD_DIM=32, BLOCK=64, CHUNK=16,\n"
        "            NORMALIZE=False)\n"
        "s = sig | dict.fromkeys(ones, 'constexpr')\n"
        "triton.compile(ASTSource(k, s, ones, {}), target=GPUTarget('cuda', 90, 32))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == len(hashing.TILES)
    for row in rows:
        assert row["registers"] > 0 and row["spill_store_bytes"] == 0, row
        assert row["loop_instructions"] > 0, row  # the column loop, FFMA dots


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", sorted(hashing.TILES))
def test_kernel_on_gpu_and_a_plan_there(dim, monkeypatch):
    """On CUDA: the kernel against the per-round form (near-ties aside), and lsh's plan
    hashing through it, with the CPU plan's buckets but where rounding decides."""
    g = torch.Generator().manual_seed(dim)
    x = torch.nn.functional.normalize(torch.randn(2, 4, 4113, dim, generator=g), dim=-1)
    rotations = torch.randn(4, 4, dim, 64, generator=g)
    got = hashing.hash_rounds(x.cuda().half(), rotations.cuda()).cpu()
    want = per_round(x.half(), rotations)
    assert (got == want).float().mean() > 0.999
    entered = spy_on_the_kernel(monkeypatch)
    mech = attn_zoo.get("lsh")
    q = torch.randn(1, 4, 4113, dim, generator=g)
    on_gpu = mech.plan(q.cuda(), None, None, True).buckets.cpu()
    assert entered == [1]
    assert (on_gpu == mech.plan(q, None, None, True).buckets).float().mean() > 0.999
