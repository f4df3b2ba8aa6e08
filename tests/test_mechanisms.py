"""Every mechanism's reference against its float64 oracle: forward, gradients,
causality, determinism. Iterates over the registry."""

import pytest
import torch

from attn_zoo import oracle
from conftest import MECHANISMS, qkv, small

SHAPES = [(64, 32), (67, 64), (37, 32)]  # (N, head_dim); 67 and 37 are ragged


def check(mech, q, k, v, causal, impl="reference"):
    plan = mech.plan(q, k, v, causal)
    out = mech(q, k, v, causal=causal, impl=impl, plan=plan)
    rows = torch.arange(q.shape[2])
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    return out, expected


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n,dim", SHAPES)
@pytest.mark.parametrize("name", MECHANISMS)
def test_reference_matches_oracle(name, n, dim, causal):
    mech = small(name)
    q, k, v = qkv(n, heads=3, dim=dim, batch=2)
    out, expected = check(mech, q, k, v, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert oracle.rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("name", MECHANISMS)
def test_default_config_matches_oracle(name):
    """Paper defaults at a length where their structure is exercised."""
    mech = small(name) if name in ("xl", "compressive") else small(name, **{})
    from attn_zoo import get

    mech = get(name)
    q, k, v = qkv(600, heads=2, dim=32)
    rows = oracle.sample_rows(600, 64)
    plan = mech.plan(q, k, v, True)
    out = mech(q, k, v, causal=True, plan=plan)
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    assert oracle.rel_error(out[:, :, rows], expected) < 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_gradients_match_oracle(name, causal):
    mech = small(name)
    q, k, v = qkv(41, heads=2, dim=32, dtype=torch.float64, grad=True)
    out, expected = check(mech, q, k, v, causal)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), upstream, allow_unused=True)
    want = torch.autograd.grad(expected, (q, k, v), upstream, allow_unused=True)
    for name_, g, w in zip("qkv", got, want, strict=True):
        if w is None:  # shared-QK mechanisms never read k
            assert g is None or g.abs().max() == 0, name_
            continue
        assert g is not None, f"no gradient for {name_}"
        assert oracle.rel_error(g, w) < 1e-8, name_


@pytest.mark.parametrize("name", MECHANISMS)
def test_causal_outputs_ignore_the_future(name):
    mech = small(name)
    n, t = 70, 33
    q, k, v = qkv(n, heads=2, dim=32)
    before = mech(q, k, v, causal=True)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    g = torch.Generator().manual_seed(7)
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn(x[:, :, t + 1 :].shape, generator=g) * 3
    after = mech(q2, k2, v2, causal=True)
    torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MECHANISMS)
def test_same_seed_same_output(name):
    mech = small(name)
    q, k, v = qkv(64, heads=2, dim=32)
    assert torch.equal(mech(q, k, v, causal=False), mech(q, k, v, causal=False))


@pytest.mark.parametrize("name", MECHANISMS)
def test_half_precision_within_1e2(name):
    mech = small(name)
    q, k, v = qkv(48, heads=2, dim=32, dtype=torch.float16)
    out, expected = check(mech, q, k, v, True)
    assert out.dtype == torch.float16
    assert oracle.rel_error(out, expected) < 1e-2


@pytest.mark.parametrize("name", MECHANISMS)
def test_single_token(name):
    mech = small(name)
    q, k, v = qkv(1, heads=1, dim=32)
    out, expected = check(mech, q, k, v, True)
    assert torch.isfinite(out).all()
    assert oracle.rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("name", MECHANISMS)
def test_pairs_and_density(name):
    mech = small(name)
    q, k, v = qkv(64, heads=2, dim=32)
    for causal in (True, False):
        plan = mech.plan(q, k, v, causal)
        pairs = mech.pairs(q, k, v, plan)
        assert pairs > 0
        assert pairs <= plan.full_pairs * 2  # lsh rounds may score a pair twice
