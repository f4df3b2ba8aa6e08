"""The backward pass of every mechanism's ``triton`` implementation: gradients of
q, k, v (and of the mechanisms' parameters) against the float64 oracle's and
the reference's. Without a GPU the kernels run in Triton's interpreter; every
gradient buffer the launchers allocate starts as NaN, so a row a kernel
forgets to write fails."""

import pytest
import torch

import attn_zoo
from attn_zoo import oracle
from conftest import qkv, small

pytest.importorskip("triton")
from test_triton_mechanisms import MECHANISMS, WIDE

import attn_zoo.kernels.flash

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def nan_filled(q, shape, dtype):
        return torch.full(shape, float("nan"), device=q.device, dtype=dtype)

    monkeypatch.setattr(attn_zoo.kernels.flash, "new_output", nan_filled)


def gradients(mech, impl, q, k, v, causal, plan, upstream):
    """d(out . upstream)/d(q, k, v) through ``impl``; None where no gradient flows."""
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = mech(*inputs, causal=causal, impl=impl, plan=plan)
    return torch.autograd.grad(out.float(), inputs, upstream.float(), allow_unused=True)


def check_gradients(mech, n, dim, dtype, causal, batch=1):
    q, k, v = (x.to(DEVICE) for x in qkv(n, batch=batch, heads=2, dim=dim, dtype=dtype))
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64).to(DEVICE)  # fmt: skip
    plan = mech.plan(q, k, v, causal)
    got = gradients(mech, "triton", q, k, v, causal, plan, upstream)
    reference = gradients(mech, "reference", q, k, v, causal, plan, upstream)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    rows = torch.arange(n)
    expected = oracle.evaluate(*exact, mech.oracle(*exact, plan, rows), rows)
    want = torch.autograd.grad(expected, exact, upstream, allow_unused=True)
    tol = TOLERANCE[dtype]
    for name, g, r, w in zip("qkv", got, reference, want, strict=True):
        if w is None or not w.any():  # shared QK: k is never read
            assert g is None or not g.any(), f"d{name}: a gradient where the oracle has none"
            continue
        assert g is not None and g.dtype == dtype, f"d{name}: missing or in the wrong dtype"
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert oracle.rel_error(g, w) < tol, f"d{name} vs oracle: {oracle.rel_error(g, w):.2e}"
        assert oracle.rel_error(g, r) < tol, f"d{name} vs reference: {oracle.rel_error(g, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_triton_gradients_match_oracle_and_reference(name, causal, dim, dtype):
    """Ragged N = 100, the small configs (memories, buckets, clusters, strides)."""
    check_gradients(small(name), 100, dim, dtype, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_triton_gradients_with_full_blocks(name, causal):
    """Layouts with full blocks beside masked ones, two batches."""
    check_gradients(attn_zoo.get(name, **WIDE[name]), 200, 128, torch.float32, causal, batch=2)


@pytest.mark.parametrize(
    "name,config",
    [
        ("compressive", {"segment_len": 8, "mem_len": 8, "cmem_len": 4,
                         "attend_initial_memory": True}),  # the gradient reaching the lse
        ("compressive", {"segment_len": 12, "mem_len": 0, "cmem_len": 3, "rate": 3}),
        ("xl", {"segment_len": 16, "mem_len": 40, "clamp_len": 8}),
        ("xl", {"segment_len": 16, "mem_len": 24, "same_length": True}),
        ("lsh", {"bucket_size": 8, "n_hashes": 3, "attend_across_buckets": True}),
        ("lsh", {"bucket_size": 8, "n_hashes": 2, "allow_duplicate_attention": True}),
        ("routing", {"window": 8, "n_clusters": 3}),
        ("adaptive_span", {"spans": (5.3, 17.7), "ramp": 6.0, "ramp_shift": 1}),
        # R + z an integer: m_z(x) = 0 exactly at x = R + z, the hard edge's last key
        ("adaptive_span", {"spans": (10.0, 2.0), "ramp": 6.0}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_triton_gradients_config_corners(name, config, causal):
    check_gradients(attn_zoo.get(name, **config), 90, 32, torch.float32, causal)


MODULES = [
    ("xl", {"segment_len": 16, "mem_len": 12}),
    ("compressive", {"segment_len": 16, "mem_len": 16, "cmem_len": 4, "compression": "conv"}),
    ("adaptive_span", {"spans": (5.3, 21.7), "ramp": 8.0}),
]


@pytest.mark.parametrize("name,config", MODULES, ids=[m[0] for m in MODULES])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_triton_gradients_reach_module_parameters(name, config, causal):
    """xl's u, v, W_R (through the kernel's relative term), the compressive conv
    (through the compressed slots' keys and values) and adaptive span's z_h
    (through the ramp): as through the reference."""
    q, k, v = (x.to(DEVICE) for x in qkv(70, heads=2, dim=32, seed=3))
    grads = {}
    for impl in ("triton", "reference"):
        module = attn_zoo.Attention(name, num_heads=2, head_dim=32, impl=impl, **config)
        module.to(DEVICE)
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        module(*inputs, is_causal=causal).pow(2).sum().backward()
        grads[impl] = {n: p.grad for n, p in module.named_parameters()}
        grads[impl] |= {n: x.grad for n, x in zip("qkv", inputs, strict=True)}
    for key, want in grads["reference"].items():
        got = grads["triton"][key]
        assert got is not None and torch.isfinite(got).all(), key
        assert oracle.rel_error(got, want) < 1e-4, f"{key}: {oracle.rel_error(got, want):.2e}"
    assert all(g.abs().sum() > 0 for g in grads["triton"].values())


def test_memories_are_stop_gradient_in_the_kernel():
    """xl: the last segment's keys get gradient only from their own segment, so a
    loss on the first segment's rows gives no gradient to later keys and none to
    memory pairs."""
    mech = attn_zoo.get("xl", segment_len=32, mem_len=32)
    q, k, v = (x.requires_grad_() for x in qkv(96, heads=1, dim=32, seed=5))
    out = mech(q, k, v, causal=True, impl="triton")
    out[:, :, 32:64].sum().backward()  # segment 1: memory = segment 0
    assert k.grad[:, :, :32].abs().sum() == 0 and v.grad[:, :, :32].abs().sum() == 0
    assert k.grad[:, :, 32:64].abs().sum() > 0 and q.grad[:, :, 32:64].abs().sum() > 0


def test_no_gradient_pass_without_inputs_needing_one():
    """Inference runs the forward alone (no autograd graph)."""
    q, k, v = qkv(64, heads=1, dim=32)
    out = attn_zoo.get("dense")(q, k, v, causal=True, impl="triton")
    assert out.grad_fn is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_triton_gradients_on_gpu(name, causal, dtype):
    for dim in (64, 128):
        check_gradients(attn_zoo.get(name), 1024 + 17, dim, dtype, causal)


@pytest.mark.parametrize("name", ["dense", "sparse_fixed"])
def test_dq_written_in_the_inputs_dtype_matches_float32_rows_cast(name, monkeypatch):
    """One part with its queries read in place (dense) writes each row of dQ once, in
    fp16, straight from the kernel: the same values as float32 rows cast afterwards,
    the path every mechanism of several parts (sparse_fixed) takes."""
    from attn_zoo.kernels import flash_backward

    mech = small(name)
    q, k, v = qkv(100, heads=2, dim=32, dtype=torch.float16)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    plan = mech.plan(q, k, v, True)
    taken = []
    in_place = flash_backward._dq_in_place
    monkeypatch.setattr(flash_backward, "_dq_in_place",
                        lambda *args: taken.append(in_place(*args)) or taken[-1])  # fmt: skip
    direct = gradients(mech, "triton", q, k, v, True, plan, upstream)
    assert taken == [name == "dense"]
    monkeypatch.setattr(flash_backward, "_dq_in_place", lambda *args: False)
    cast = gradients(mech, "triton", q, k, v, True, plan, upstream)
    for got, want in zip(direct, cast, strict=True):
        assert got.dtype == torch.float16 and torch.equal(got, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", ["sparse_strided", "sparse_fixed", "lsh", "routing"])
def test_one_tensor_as_queries_keys_and_values(name, causal):
    """One tensor in every role: each launch that reaches it adds into its one gradient
    (k is v in a dK/dV launch: both onto zeros; q is k: the dK/dV launch adds to the
    rows the dQ launch put), as autograd sums the reference's."""
    mech = small(name)
    x = qkv(100, heads=2, dim=32)[0]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    plan = mech.plan(x, x, x, causal)
    got = {}
    for impl in ("triton", "reference"):
        leaf = x.clone().requires_grad_()
        out = mech(leaf, leaf, leaf, causal=causal, impl=impl, plan=plan)
        got[impl] = torch.autograd.grad(out, leaf, upstream)[0]
    error = oracle.rel_error(got["triton"], got["reference"])
    assert torch.isfinite(got["triton"]).all() and error < 1e-4, error


def test_where_each_launch_puts_its_rows():
    """Placed at positions and added in L2 where positions are distinct (lsh's rounds,
    strided columns, the parts after the first); a summary's or a cluster member's rows
    in kernel order for the host to add (a subset of keys, repeated tokens)."""
    from attn_zoo.kernels.dry_run import recorded
    from attn_zoo.kernels.flash_backward import Puts, puts

    def plan_of(name, causal, tensors=None):
        mech = small(name)
        q, k, v = tensors or qkv(256, heads=2, dim=32)
        with torch.no_grad(), recorded() as calls:
            mech.impl("triton").run(mech, q, k, v, mech.plan(q, k, v, causal))
        return [puts(query, parts) for query, parts in calls]

    first, after = Puts(True, True, False, False), Puts(True, True, True, True, True)
    assert plan_of("dense", True) == [[first]]
    rounds = small("lsh").config.n_hashes
    assert plan_of("lsh", True) == [[Puts(True, True, False, False, True)] + [after] * (rounds - 1)]
    assert plan_of("sparse_strided", False) == [[first, after]]
    assert plan_of("sparse_fixed", True) == [[first, Puts(True, False, True, False)]]
    routing = plan_of("routing", False)
    assert routing[-1] == [Puts(False, False, False, False)]  # clusters' member lists
    x = qkv(256, heads=2, dim=32)[0]
    # q is k is v: every launch adds (the first dK/dV: k is v, both onto zeros)
    assert plan_of("sparse_strided", True, (x, x, x)) == [[Puts(True, True, False, True), after]]
