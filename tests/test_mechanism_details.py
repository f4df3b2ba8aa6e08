"""Mechanism-specific behaviour the generic tests do not reach."""

import pytest
import torch

import attn_zoo
from attn_zoo import oracle
from attn_zoo.compressive import COMPRESSIONS, attention_reconstruction_loss
from attn_zoo.xl import rel_shift, relative_terms
from conftest import qkv, small


def agree(mech, n=61, causal=True):
    q, k, v = qkv(n, heads=2, dim=32)
    plan = mech.plan(q, k, v, causal)
    rows = torch.arange(n)
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    return oracle.rel_error(mech(q, k, v, causal=causal, plan=plan), expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("how", COMPRESSIONS)
def test_compressive_every_compression(how, causal):
    assert agree(small("compressive", compression=how, rate=4, mem_len=4), causal=causal) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "config",
    [{"same_length": True}, {"clamp_len": 3}, {"mem_len": 0}, {"segment_len": 5, "mem_len": 30}],
)
def test_xl_variants(config, causal):
    assert agree(small("xl", **config), causal=causal) < 1e-5


def test_rel_shift_puts_each_distance_in_place():
    qlen, klen = 4, 7
    i, j = torch.arange(qlen)[:, None], torch.arange(klen)[None, :]
    expected = ((klen - qlen) + i - j).float()
    distances = torch.arange(klen, -qlen, -1).float()  # klen .. -(qlen - 1): every entry
    shifted = rel_shift(distances.expand(2, qlen, -1).contiguous(), klen)
    assert torch.equal(shifted, expected.expand(2, -1, -1))
    causal = torch.arange(klen, -1, -1).float()  # klen .. 0: keys up to their query
    shifted = rel_shift(causal.expand(2, qlen, -1).contiguous(), klen)
    seen = expected >= 0
    assert torch.equal(shifted[:, seen], expected.expand(2, -1, -1)[:, seen])
    with pytest.raises(ValueError, match="accepted: klen \\+ 1 or klen \\+ qlen"):
        rel_shift(torch.zeros(qlen, klen), klen)


@pytest.mark.parametrize("clamp", [None, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_xl_feature_products_equal_the_table(clamp, causal):
    """The kernels' form of Sec. 3.3's term, f_i . g_j over each term's distances,
    equals (q_i + v) . W_R R_(i-j) read from the plan's table, for every pair and
    distance of either sign; with clamp_len 5 the pairs beyond +-5 read R_(+-5) (the
    table's clamped rows), through the two extra terms. Each pair is in one term; the
    table holds the distances up to M + L, every visible pair's."""
    mech = attn_zoo.get("xl", segment_len=8, mem_len=12, clamp_len=clamp)
    q = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    plan = mech.plan(q, q, q, causal)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    expected = torch.einsum(
        "bhid,hijd->bhij",
        q + plan.v[:, None, :].double(),
        plan.rel_at((i - j).clamp(-plan.max_dist, plan.max_dist)).double(),
    )
    got, covered = torch.zeros_like(expected), torch.zeros(40, 40, dtype=torch.int64)
    terms = relative_terms(q, plan)
    assert len(terms) == (1 if clamp is None else 3)
    for lo, hi, f, g in terms:
        inside = ((i - j) >= lo) & ((i - j) <= hi)
        got += torch.where(inside, f.double() @ g.double().T, 0.0)
        covered += inside
    assert torch.equal(covered, torch.ones_like(covered))
    table = (i - j).abs() <= plan.max_dist  # the distances the table holds
    torch.testing.assert_close(got[..., table], expected[..., table], rtol=1e-5, atol=1e-5)


def test_reconstruction_loss_trains_only_the_compression():
    q, k, v = qkv(16, heads=2, dim=8, grad=True)
    weights = tuple(torch.randn(2, 8, 8, 2, requires_grad=True) for _ in range(2))
    loss = attention_reconstruction_loss(q, k, v, rate=2, compression="conv", weights=weights)
    loss.backward()
    assert loss > 0
    assert weights[0].grad is not None and weights[0].grad.abs().sum() > 0
    assert q.grad is None and k.grad is None and v.grad is None
    same = attention_reconstruction_loss(q, k, v, rate=1, compression="mean")
    assert same.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_routing_without_centroid_updates(causal):
    assert agree(small("routing", centroid_update="none", n_clusters=5), causal=causal) < 1e-5


def test_lsh_self_attends_only_when_alone():
    """Causal: the first token sees only itself, so it must attend to itself."""
    mech = small("lsh")
    q, k, v = qkv(16, heads=1, dim=32)
    out = mech(q, k, v, causal=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])


def test_adaptive_span_per_head_spans_are_configurable():
    mech = attn_zoo.get("adaptive_span", spans=(0.0, 5.0), ramp=2.0)
    q, k, v = qkv(30, heads=2, dim=32)
    out = mech(q, k, v, causal=True)
    # span 0 with ramp 2: m(1) = 0.5, m(2) = 0; span 5: m > 0 up to distance 6
    plan = mech.plan(q, k, v, True)
    assert plan.reach(0) == 1 and plan.reach(1) == 6
    assert agree(mech, n=30) < 1e-5 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="2 spans for 3 heads"):
        mech(*qkv(8, heads=3, dim=32))


def test_bad_configs_name_the_problem():
    q, k, v = qkv(16, heads=2, dim=32)
    with pytest.raises(ValueError, match="accepted: mean, max, conv"):
        attn_zoo.get("compressive", compression="median")(q, k, v)
    with pytest.raises(ValueError, match="must divide"):
        attn_zoo.get("compressive", rate=3, segment_len=8)(q, k, v)
    with pytest.raises(ValueError, match="n_buckets must be even"):
        attn_zoo.get("lsh", n_buckets=3)(q, k, v)
    with pytest.raises(ValueError, match="accepted: ema, none"):
        attn_zoo.get("routing", centroid_update="sgd")(q, k, v)
