"""Each mechanism's rules against small examples worked out by hand from the
papers (explicit index sets and weights), not from the oracle, so a wrong
oracle cannot pass them. Every example runs through reference, triton (the
interpreter on a CPU) and flex.

Weights are read with one-hot values (v = I, so out[i, j] is the weight of
key j) and q = 0, which makes every score 0: the weights are then fixed by the
rule alone (uniform over the visible keys, or the soft mask's ratios).
"""

import pytest
import torch

import attn_zoo
from attn_zoo import oracle
from attn_zoo.lsh import LSHPlan, default_buckets

IMPLS = ["reference", "triton", "flex"]


def weights(mech, impl, n, *, causal=True, dim=64, plan=None, q=None):
    """[n, n] attention weights of head 0 (one-hot values, q = k = 0 unless given)."""
    v = torch.eye(n, dim)[None, None].contiguous()
    q = torch.zeros(1, 1, n, dim) if q is None else q
    out = mech(q, torch.zeros_like(q), v, causal=causal, impl=impl, plan=plan)
    return out[0, 0, :, :n].double()


def row(n, *parts):
    """A weight row from dicts {position: weight}."""
    r = torch.zeros(n, dtype=torch.float64)
    for part in parts:
        for j, w in part.items():
            r[j] = w
    return r


def spread(positions, total):
    """Equal weights 1/total at each position."""
    return {int(j): 1 / total for j in positions}


def ratios_to(weights_of, total):
    return {j: r / total for j, r in weights_of.items()}


def close(got, expected):
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


# -- adaptive span (Sukhbaatar et al. 2019, Eq. 4-5) ------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_span_attends_the_previous_positions_not_itself(impl):
    """z = 3, R = 4, t = 30: Eq. 5 sums over r = t - S .. t - 1 with m_z(t - r) =
    clamp((7 - x) / 4, 0, 1): x = 1, 2, 3 -> 1, x = 4 -> 0.75, 5 -> 0.5, 6 -> 0.25,
    so keys 29, 28, 27, 26, 25, 24 in ratio 1 : 1 : 1 : .75 : .5 : .25 (sum 4.5)."""
    mech = attn_zoo.get("adaptive_span", spans=(3.0,), ramp=4.0)
    w = weights(mech, impl, 32)
    ratios = {24: 0.25, 25: 0.5, 26: 0.75, 27: 1, 28: 1, 29: 1}
    close(w[30], row(32, ratios_to(ratios, 4.5)))
    close(w[0], row(32))  # the first token has no previous position: no key, output 0


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_span_authors_code_shifts_the_ramp(impl):
    """The authors' code evaluates m_z(x - 1) on distances 1 .. S: (8 - x) / 4, so
    x = 1..4 -> 1, then .75, .5, .25 at x = 5, 6, 7: keys 23 .. 29 (sum 5.5)."""
    mech = attn_zoo.get("adaptive_span", spans=(3.0,), ramp=4.0, ramp_shift=1)
    ratios = {23: 0.25, 24: 0.5, 25: 0.75, 26: 1, 27: 1, 28: 1, 29: 1}
    close(weights(mech, impl, 32)[30], row(32, ratios_to(ratios, 5.5)))


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_span_bidirectional_mirrors_the_window(impl):
    """|i - j| in 1 .. 6 with the same ramp on both sides of i = 10 (sum 9)."""
    mech = attn_zoo.get("adaptive_span", spans=(3.0,), ramp=4.0)
    ratio = {1: 1, 2: 1, 3: 1, 4: 0.75, 5: 0.5, 6: 0.25}
    expected = {10 + s * x: r / 9 for x, r in ratio.items() for s in (-1, 1)}
    close(weights(mech, impl, 32, causal=False)[10], row(32, expected))


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_span_cap_bounds_the_window(impl):
    """S = 10, z = 10, R = 4: m = (14 - x) / 4 >= 1 up to x = 10 and the cap stops
    there: keys 10 .. 19 of t = 20, 1/10 each (without the cap 7 .. 19, ramped)."""
    capped = attn_zoo.get("adaptive_span", spans=(10.0,), ramp=4.0, max_span=10)
    close(weights(capped, impl, 32)[20], row(32, spread(range(10, 20), 10)))
    free = attn_zoo.get("adaptive_span", spans=(10.0,), ramp=4.0, max_span=100)
    ratios = {7: 0.25, 8: 0.5, 9: 0.75} | dict.fromkeys(range(10, 20), 1)
    close(weights(free, impl, 32)[20], row(32, ratios_to(ratios, 11.5)))


# -- Transformer-XL (Dai et al. 2019; the authors' same_length and clamp_len) ----------


def visible_set(w):
    return set(torch.nonzero(w > 0).flatten().tolist())


@pytest.mark.parametrize("impl", IMPLS)
def test_xl_same_length_sees_exactly_m_keys(impl):
    """L = M = 8: the authors' mask tril(ones, -mask_shift_len) keeps i - j < M, so
    i = 8 sees 1 .. 8 (not 0) and i = 15 sees 8 .. 15; without it, i = 8 sees 0 .. 8."""
    same = attn_zoo.get("xl", segment_len=8, mem_len=8, same_length=True)
    w = weights(same, impl, 32)
    assert visible_set(w[8]) == set(range(1, 9))
    assert visible_set(w[15]) == set(range(8, 16))
    plain = attn_zoo.get("xl", segment_len=8, mem_len=8)
    assert visible_set(weights(plain, impl, 32)[8]) == set(range(0, 9))


@pytest.mark.parametrize("impl", IMPLS)
def test_xl_clamp_len_zero_or_negative_means_no_clamp(impl):
    """The authors clamp only when clamp_len > 0."""
    q = torch.randn(1, 1, 32, 64, generator=torch.Generator().manual_seed(0))
    out = {
        c: weights(attn_zoo.get("xl", segment_len=8, mem_len=8, clamp_len=c), impl, 32, q=q)
        for c in (None, 0, -1, 1)
    }
    assert torch.equal(out[0], out[None]) and torch.equal(out[-1], out[None])
    assert not torch.allclose(out[1], out[None])


# -- Compressive Transformer (Rae et al. 2019, Algorithm 1) ------------------------------


def compressive(**overrides):
    config = dict(segment_len=16, mem_len=8, cmem_len=8, rate=2) | overrides
    return attn_zoo.get("compressive", **config)


@pytest.mark.parametrize("impl", IMPLS)
def test_compressive_algorithm_1_loses_what_never_enters_memory(impl):
    """L = 16 > M = 8, Mc = 8, c = 2: after segments 0, 1, 2 the memories
    m_t[:16] = [-8, 0) (zeros), [8, 16), [24, 32) were compressed into 4 slots each,
    so i = 48 sees slots of 8..15 and 24..31, memory 40..47 and itself: 17 keys of
    score 0, a slot's weight 1/17 split over its two positions."""
    w = weights(compressive(), impl, 64)
    slots = spread([*range(8, 16), *range(24, 32)], 34)
    close(
        w[48],
        row(64, slots, spread(range(40, 49), 17)),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_compressive_all_older_switch(impl):
    """compress_all_older: every position before the memory: slots of 24..39."""
    w = weights(compressive(compress_all_older=True), impl, 64)
    expected = spread(range(24, 40), 34) | spread(range(40, 49), 17)
    close(w[48], row(64, expected))


@pytest.mark.parametrize("impl", IMPLS)
def test_compressive_initial_zero_memories(impl):
    """Alg. 1 starts from m_0 = 0 (8 positions) and cm_0 = 0 (8 slots). Attended,
    each is a key of score 0 and value 0: i = 0 gives itself 1/17; i = 32 sees 4
    zero slots, 4 slots of 8..15, memory 24..31 and itself (17 keys). Masked (the
    default), i = 0 sees only itself and i = 32 13 keys."""
    attended = weights(compressive(attend_initial_memory=True), impl, 64)
    close(attended[0], row(64, {0: 1 / 17}))
    expected = spread(range(8, 16), 34) | spread(range(24, 33), 17)
    close(attended[32], row(64, expected))
    masked = weights(compressive(), impl, 64)
    close(masked[0], row(64, {0: 1.0}))
    expected = spread(range(8, 16), 26) | spread(range(24, 33), 13)
    close(masked[32], row(64, expected))


# -- Reformer LSH (Kitaev et al. 2020, Eq. 3-4 and 7) -------------------------------------


def lsh_plan(buckets, *, bucket_size=4, across=False, duplicates=False, causal=False):
    b = torch.tensor(buckets)[None, None]  # [1, 1, rounds, N]
    n = b.shape[-1]
    return LSHPlan(1, 1, n, n, causal, b, bucket_size, -1e5, across, duplicates)


@pytest.mark.parametrize("impl", IMPLS)
def test_lsh_attends_only_its_own_bucket_inside_the_chunks(impl):
    """Buckets 0,1,0,1,0,1,0,1, chunks of 4 sorted places: chunk 0 holds 0,2,4,6
    (bucket 0), chunk 1 holds 1,3,5,7. Position 1 looks at both chunks but only
    at bucket 1 (Eq. 3-4), not itself: 3, 5, 7. Across buckets it sees all 7
    others; position 0 sees 2, 4, 6 either way."""
    mech = attn_zoo.get("lsh", bucket_size=4, n_hashes=1)
    w = weights(mech, impl, 8, dim=32, plan=lsh_plan([[0, 1, 0, 1, 0, 1, 0, 1]]))
    close(w[1], row(8, spread("357", 3)))
    close(w[0], row(8, spread("246", 3)))
    across = lsh_plan([[0, 1, 0, 1, 0, 1, 0, 1]], across=True)
    w = weights(mech, impl, 8, dim=32, plan=across)
    close(w[1], row(8, spread("0234567", 7)))
    close(w[0], row(8, spread("246", 3)))


@pytest.mark.parametrize("impl", IMPLS)
def test_lsh_counts_a_key_seen_in_two_rounds_once(impl):
    """Round A buckets 0,0,0,0,1,1,1,1 and round B 0,0,1,1,0,0,1,1 (chunks of 4):
    position 0 sees 1, 2, 3 in A and 1, 4, 5 in B. Eq. 7 subtracts log N_ij, so
    the union 1..5 gets 1/5 each; without the correction key 1 counts twice
    (2/6, the others 1/6)."""
    mech = attn_zoo.get("lsh", bucket_size=4, n_hashes=2)
    rounds = [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]]
    w = weights(mech, impl, 8, dim=32, plan=lsh_plan(rounds))
    close(w[0], row(8, spread("12345", 5)))
    w = weights(mech, impl, 8, dim=32, plan=lsh_plan(rounds, duplicates=True))
    close(w[0], row(8, {1: 2 / 6}, spread("2345", 6)))


def test_lsh_bucket_count_follows_the_chunk_size():
    """Sec. 2.3 sets the chunk size m = 2l / n_buckets: n_buckets = 2N / m."""
    assert default_buckets(256, 32) == 16 and default_buckets(4096, 64) == 128
    q = torch.randn(1, 2, 256, 32, generator=torch.Generator().manual_seed(0))
    plan = attn_zoo.get("lsh", bucket_size=32, n_hashes=2).plan(q, q, q, causal=False)
    assert plan.buckets.max() < 16 and plan.buckets.unique().numel() > 8


# -- numerics any paper assumes -------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_half_precision_stays_finite_where_the_oracle_is(impl):
    """fp16 inputs x 60: q . k reaches about 2e5, past fp16's 65504."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g).half() * 60 for _ in range(3))
    mech = attn_zoo.get("dense")
    out = mech(q, k, v, causal=True, impl=impl)
    rows = torch.arange(64)
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, mech.plan(q, k, v, True), rows), rows)
    assert torch.isfinite(expected).all() and torch.isfinite(out).all()
    assert oracle.rel_error(out, expected) < 1e-2


@pytest.mark.parametrize("name", attn_zoo.names())
def test_plans_do_not_depend_on_the_default_dtype(name):
    q = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(0))
    mech = attn_zoo.get(name, **attn_zoo.get(name).small)
    if name == "compressive":
        mech = attn_zoo.get(name, **mech.small, compression="conv")
    expected = mech(q, q, q, causal=False)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = mech(q, q, q, causal=False)
    finally:
        torch.set_default_dtype(before)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


# -- every switch, every implementation, against the oracle ---------------------------------

SWITCHES = [
    ("adaptive_span", {"ramp": 4.0, "span_range": (2.0, 40.0), "ramp_shift": 1}),
    ("adaptive_span", {"ramp": 4.0, "span_range": (2.0, 40.0), "max_span": 12}),
    ("xl", {"segment_len": 16, "mem_len": 12, "same_length": True, "clamp_len": 0}),
    ("compressive", {"segment_len": 16, "mem_len": 8, "cmem_len": 4, "rate": 2}),
    ("compressive", {"segment_len": 16, "mem_len": 8, "cmem_len": 4,
                     "compress_all_older": True}),
    ("compressive", {"segment_len": 8, "mem_len": 16, "cmem_len": 6,
                     "attend_initial_memory": True}),
    ("compressive", {"segment_len": 16, "mem_len": 8, "cmem_len": 6, "rate": 4,
                     "compression": "conv", "attend_initial_memory": True}),
    ("compressive", {"segment_len": 16, "mem_len": 0, "cmem_len": 4,
                     "attend_initial_memory": True}),
    ("lsh", {"bucket_size": 8, "n_hashes": 4}),  # Eq. 7 over 3 earlier rounds, own buckets
    ("lsh", {"bucket_size": 8, "n_hashes": 3, "attend_across_buckets": True}),
    ("lsh", {"bucket_size": 8, "n_hashes": 3, "allow_duplicate_attention": True}),
    ("lsh", {"bucket_size": 8, "n_hashes": 2, "attend_across_buckets": True,
             "allow_duplicate_attention": True}),
]  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name,config", SWITCHES, ids=lambda x: x if isinstance(x, str) else "")
def test_switches_match_the_oracle_in_every_impl(name, config, causal, impl):
    from conftest import check_impl

    check_impl(attn_zoo.get(name, **config), impl, 100, 32, torch.float32, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("config", [c for name, c in SWITCHES if name == "lsh"] + [{}])
def test_lsh_pairs_follow_the_switches(config, causal):
    """lsh's ``pairs`` (its work: a key scored once per round that sees it), counted
    in closed form, equals the visible pairs of every round counted one by one."""
    q = torch.randn(1, 2, 100, 32, generator=torch.Generator().manual_seed(1))
    mech = attn_zoo.get("lsh", **{"bucket_size": 8, "n_hashes": 3} | config)
    plan = mech.plan(q, q, q, causal=causal)
    counted = mech.pairs(q, q, q, plan)
    from attn_zoo.grouped import visible_sorted
    from attn_zoo.kernels.sorting import sort_by_group

    _, rank = sort_by_group(plan.buckets)
    b = plan.buckets
    seen = visible_sorted(rank[..., :, None], rank[..., None, :], b[..., :, None],
                          b[..., None, :], plan.bucket_size, plan.mode)  # fmt: skip
    assert counted == int(seen.sum())
