"""The entry points for model code: ``attn_zoo.attention`` (SDPA's signature),
``attn_zoo.Attention`` (an nn.Module with the mechanism's parameters), and the
rule that no implementation detaches silently."""

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import attn_zoo
from attn_zoo import oracle
from attn_zoo.validation import Unsupported
from conftest import qkv, small

IMPLS = ["reference", "triton", "flex"]


def rel(a, b):
    return oracle.rel_error(a, b)


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# -- attn_zoo.attention(mechanism="dense") is SDPA -----------------------------------------


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_dense_equals_sdpa(causal, scale, gqa):
    q = randn(2, 4, 37, 32, seed=1)
    k, v = randn(2, 2 if gqa else 4, 37, 32, seed=2), randn(2, 2 if gqa else 4, 37, 32, seed=3)
    got = attn_zoo.attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize(
    "mask",
    ["padding", "upper_left", "lower_right", "is_causal"],
)
def test_dense_masks_and_kv_cache_equal_sdpa(mask):
    """q_len < k_len: is_causal aligns upper left (SDPA's documented rule); the decode
    step of a KV cache is causal_lower_right; padding is a bool [B, 1, 1, Nk] mask."""
    q, k, v = randn(2, 4, 5, 32, seed=1), randn(2, 4, 29, 32, seed=2), randn(2, 4, 29, 32, seed=3)
    kwargs = {
        "padding": {"attn_mask": randn(2, 1, 1, 29, seed=4) > -0.5},
        "upper_left": {"attn_mask": causal_upper_left(5, 29)},
        "lower_right": {"attn_mask": causal_lower_right(5, 29)},
        "is_causal": {"is_causal": True},
    }[mask]
    got = attn_zoo.attention(q, k, v, **kwargs)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert rel(got, want) < 1e-6


@pytest.mark.parametrize("impl", ["reference", "triton", "flex", "sdpa"])
def test_dense_impls_agree_under_the_sdpa_arguments(impl):
    q, k, v = randn(1, 4, 9, 32, seed=1), randn(1, 2, 40, 32, seed=2), randn(1, 2, 40, 32, seed=3)
    mask = causal_lower_right(9, 40)
    got = attn_zoo.attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True, impl=impl)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"attn_mask": torch.ones(2, 4, 16, 16, dtype=torch.bool)}, "unsupported attn_mask"),
        ({"attn_mask": torch.zeros(2, 1, 1, 16)}, "unsupported attn_mask \\(float32"),
        ({"attn_mask": "causal"}, "unsupported attn_mask str"),
        ({"dropout_p": 0.1}, "accepted: dropout_p=0.0"),
        ({"attn_mask": causal_lower_right(16, 16), "is_causal": True}, "not both"),
        ({"mechanism": "nope"}, "unknown mechanism 'nope'"),
        ({"mechanism": "lsh", "bucket": 3}, "unknown config field"),
    ],
)
def test_bad_arguments_are_one_clear_error(kwargs, message):
    q = randn(2, 4, 16, 32)
    with pytest.raises(ValueError, match=message):
        attn_zoo.attention(q, q, q, **kwargs)


def test_shapes_the_mechanism_cannot_honor_are_errors():
    q, kv = randn(1, 4, 4, 32), randn(1, 4, 20, 32)
    decoders = "defined for dense, sparse_strided, sparse_fixed, adaptive_span"
    with pytest.raises(ValueError, match=decoders):
        attn_zoo.attention(q, kv, kv, attn_mask=causal_lower_right(4, 20), mechanism="xl")
    with pytest.raises(ValueError, match="bidirectional attention with q_len 4 < k_len 20"):
        attn_zoo.attention(q, kv, kv, mechanism="sparse_strided")
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        attn_zoo.attention(q, kv[:, :2], kv[:, :2])
    with pytest.raises(ValueError, match="dividing the 4 query heads"):
        attn_zoo.attention(q, kv[:, :3], kv[:, :3], enable_gqa=True)
    with pytest.raises(ValueError, match="must be 4-D"):
        attn_zoo.attention(q[0], q[0], q[0])


@pytest.mark.parametrize("name", ["sparse_fixed", "sparse_strided", "adaptive_span"])
def test_decode_step_equals_the_last_rows_of_the_full_sequence(name):
    """A KV-cache step (causal_lower_right) gives what the whole causal sequence
    gives at its last positions."""
    config = attn_zoo.get(name).small
    q, k, v = randn(1, 2, 45, 32, seed=1), randn(1, 2, 45, 32, seed=2), randn(1, 2, 45, 32, seed=3)
    full = attn_zoo.attention(q, k, v, is_causal=True, mechanism=name, **config)
    for impl in IMPLS:
        step = attn_zoo.attention(q[:, :, -3:], k, v, attn_mask=causal_lower_right(3, 45),
                                  mechanism=name, impl=impl, **config)  # fmt: skip
        assert rel(step, full[:, :, -3:]) < 1e-5, impl


# -- every mechanism honors scale and padding ----------------------------------------------


@pytest.mark.filterwarnings("ignore:attn_zoo.*shared QK")
@pytest.mark.parametrize("name", attn_zoo.names())
def test_scale_multiplies_every_score(name):
    """scale s equals the default 1/sqrt(d) on inputs whose scores are s sqrt(d)
    times larger: q for every mechanism but xl, whose u.k and W_R R terms need k
    and W_R scaled instead."""
    config = attn_zoo.get(name).small
    q = randn(1, 2, 40, 32, seed=1, dtype=torch.float64)
    k, v = randn(1, 2, 40, 32, seed=2, dtype=torch.float64), randn(1, 2, 40, 32, seed=3)
    v = v.double()
    s = 0.5
    alpha = s * math.sqrt(32)
    got = attn_zoo.attention(q, k, v, is_causal=True, scale=s, mechanism=name, **config)
    if name == "xl":
        module = attn_zoo.Attention("xl", num_heads=2, head_dim=32, **config).double()
        with torch.no_grad():
            module.w_r.mul_(alpha)
        want = module(q, k * alpha, v, is_causal=True)
    else:
        want = attn_zoo.attention(q * alpha, k, v, is_causal=True, mechanism=name, **config)
    assert rel(got, want) < (1e-6 if name == "xl" else 1e-12)  # xl's table is float32
    for impl in IMPLS:
        other = attn_zoo.attention(q.float(), k.float(), v.float(), is_causal=True, scale=s,
                                   mechanism=name, impl=impl, **config)  # fmt: skip
        assert rel(other, got) < 1e-5, impl


def padded(seed=5, batch=2, n=100):
    keep = randn(batch, n, seed=seed) > -0.6
    keep[-1, 60:] = False  # one row tail-padded
    return keep


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", attn_zoo.names())
def test_padded_keys_get_zero_weight(name, causal, impl):
    """Against the float64 oracle with the same mask (padded keys -inf)."""
    mech = small(name)
    q, k, v = qkv(100, batch=2, heads=2, dim=32)
    keep = padded()
    out = mech(q, k, v, causal=causal, impl=impl, key_padding=keep)
    plan = dataclasses.replace(mech.plan(q, k, v, causal), keep=keep)
    rows = torch.arange(100)
    want = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    assert torch.isfinite(out).all() and rel(out, want) < 1e-5


POSITIONAL = ["dense", "sparse_strided", "sparse_fixed", "adaptive_span", "xl", "compressive"]


@pytest.mark.parametrize("name", POSITIONAL)
def test_right_padding_leaves_the_real_rows_as_they_were(name):
    """Bidirectional, so that padded keys would be seen: rows 0..59 of a sequence
    padded to 100 equal the 60-token sequence (the plan does not depend on what
    is past the padding for position-based mechanisms)."""
    mech = small(name)
    q, k, v = qkv(100, batch=1, heads=2, dim=32)
    keep = torch.ones(1, 100, dtype=torch.bool)
    keep[:, 60:] = False
    for impl in IMPLS:
        out = mech(q, k, v, causal=False, impl=impl, key_padding=keep)[:, :, :60]
        alone = mech(q[:, :, :60], k[:, :, :60], v[:, :, :60], causal=False, impl=impl)
        assert rel(out, alone) < 1e-5, impl


@pytest.mark.parametrize("name", attn_zoo.names())
def test_a_fully_padded_row_gives_zeros(name):
    mech = small(name)
    q, k, v = qkv(64, batch=2, heads=2, dim=32)
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[1] = False
    for impl in IMPLS:
        out = attn_zoo.attention(q, k, v, attn_mask=keep[:, None, None, :], mechanism=name,
                                 impl=impl, **mech.small)  # fmt: skip
        assert torch.isfinite(out).all() and out[1].abs().max() == 0, impl


@pytest.mark.parametrize("name", ["lsh", "routing"])
def test_shared_qk_warns_once_that_k_is_not_read(name, monkeypatch):
    from attn_zoo import functional

    monkeypatch.setattr(functional, "_warned_shared_qk", set())
    q, k, v = qkv(32, heads=2, dim=32)
    config = attn_zoo.get(name).small
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn_zoo.attention(q, q, v, mechanism=name, **config)  # k is q: nothing to say
        attn_zoo.attention(q, k, v, mechanism=name, **config)
        attn_zoo.attention(q, k, v, mechanism=name, **config)
    said = [str(w.message) for w in caught if "shared QK" in str(w.message)]
    assert len(said) == 1 and "k given is not read" in said[0]
    assert "k is not read" in attn_zoo.get(name).summary


def test_auto_picks_the_reference_without_cuda(no_gpu):
    from attn_zoo.functional import _choose_impl

    q = randn(1, 2, 8, 32)
    assert _choose_impl(attn_zoo.get("dense"), "auto", q, q, q) == "reference"


# -- no silent detach ---------------------------------------------------------------------


@pytest.mark.parametrize("name", attn_zoo.names())
def test_every_impl_propagates_gradients_or_raises(name):
    """On this machine's device: a differentiable impl gives gradients to q, k, v
    (or refuses a config it cannot express, naming itself); any other raises a
    ValueError naming mechanism, impl and device."""
    mech = small(name)
    for impl_name, impl in mech.impls.items():
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if impl.unavailable(device) is not None:
            continue
        q, k, v = (x.to(device).requires_grad_() for x in qkv(40, heads=2, dim=32))
        if impl.differentiable(device):
            try:
                out = mech(q, k, v, causal=True, impl=impl_name)
            except Unsupported as refused:  # a config the impl cannot express: said
                assert f"{name}/{impl_name}" in str(refused)
                continue
            out.sum().backward()
            grads = [x.grad for x in (q, v)]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), impl_name
        else:
            with pytest.raises(ValueError, match=f"{name}/{impl_name} has no backward pass on"):
                mech(q, k, v, causal=True, impl=impl_name)
            with torch.no_grad():  # inference stays available
                mech(q, k, v, causal=True, impl=impl_name)


# -- attn_zoo.Attention ----------------------------------------------------------------------

MODULES = [
    ("xl", {"segment_len": 8, "mem_len": 6}, ("u", "v", "w_r")),
    ("compressive", {"segment_len": 8, "mem_len": 8, "cmem_len": 4, "compression": "conv"},
     ("conv_k", "conv_v")),
    ("adaptive_span", {"spans": (3.3, 6.6), "ramp": 4.0}, ("spans",)),
]  # fmt: skip


@pytest.mark.parametrize("name,config,expected", MODULES, ids=[m[0] for m in MODULES])
def test_module_parameters_get_gradients_matching_finite_differences(name, config, expected):
    module = attn_zoo.Attention(name, num_heads=2, head_dim=8, **config).double()
    assert tuple(n for n, _ in module.named_parameters()) == expected
    q, k, v = (randn(1, 2, 30, 8, seed=s, dtype=torch.float64) for s in (1, 2, 3))
    params = dict(module.named_parameters())

    def run(*values):
        given = dict(zip(params, values, strict=True))
        return torch.func.functional_call(module, given, (q, k, v), {"is_causal": True})

    assert torch.autograd.gradcheck(run, tuple(params.values()), eps=1e-6, atol=1e-5)
    module(q, k, v, is_causal=True).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_module_span_loss_and_parameter_errors():
    module = attn_zoo.Attention("adaptive_span", num_heads=2, head_dim=8, spans=(10.0, 30.0))
    assert module.span_loss().item() == pytest.approx(20.0)
    with pytest.raises(ValueError, match="pass num_heads= and head_dim="):
        attn_zoo.Attention("xl")
    with pytest.raises(ValueError, match="span_loss is adaptive_span's"):
        attn_zoo.Attention("dense").span_loss()
    with pytest.raises(ValueError, match="built for 2 heads"):
        module(*(randn(1, 3, 8, 8) for _ in range(3)))


def test_routing_centroids_move_in_training_only():
    module = attn_zoo.Attention("routing", num_heads=2, head_dim=8, n_clusters=3, window=4)
    assert not list(module.parameters()) and module.centroids.shape == (2, 3, 8)
    q = randn(1, 2, 24, 8)
    before = module.centroids.clone()
    module.eval()
    module(q, q, q)
    assert torch.equal(module.centroids, before)
    module.train()
    module(q, q, q)
    moved = module.centroids
    assert not torch.equal(moved, before)
    assert torch.allclose(moved.norm(dim=-1), torch.ones(2, 3))


def test_module_reconstruction_loss_trains_the_convolution():
    module = attn_zoo.Attention("compressive", num_heads=2, head_dim=8, compression="conv",
                                segment_len=8, mem_len=8, rate=2)  # fmt: skip
    q, old = randn(1, 2, 8, 8, seed=1), randn(1, 2, 8, 8, seed=2)
    module.reconstruction_loss(q, old, old).backward()
    assert module.conv_k.grad.abs().sum() > 0
