"""Dense attention: reference vs sdpa vs oracle, and the input checks."""

import pytest
import torch

import attn_zoo
from attn_zoo import oracle
from conftest import qkv


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,n_k", [(64, 64), (33, 33), (16, 40)])
def test_reference_sdpa_oracle_agree(n, n_k, causal):
    """Causal with fewer queries than keys: the queries are the last positions
    (SDPA's causal_lower_right, a KV cache's decode step)."""
    dense = attn_zoo.get("dense")
    q, k, v = qkv(n, n_k=n_k, heads=3)
    plan = dense.plan(q, k, v, causal)
    rows = torch.arange(n)
    expected = oracle.evaluate(q, k, v, dense.oracle(q, k, v, plan, rows), rows)
    ref = dense(q, k, v, causal=causal, impl="reference")
    sdpa = dense(q, k, v, causal=causal, impl="sdpa")
    assert oracle.rel_error(ref, expected) < 1e-6
    assert oracle.rel_error(sdpa, expected) < 1e-6
    assert oracle.rel_error(expected, oracle.dense(q, k, v, causal, rows)) < 1e-12


BAD_INPUTS = [
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q, k.double(), v), "dtypes differ"),
    (
        lambda q, k, v: (q.int(), k.int(), v.int()),
        "unsupported dtype int32 for q; accepted: float32",
    ),
    (lambda q, k, v: (q, k[..., :16], v), "same head_dim"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "share batch and heads"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "k and v need the same sequence length"),
    (lambda q, k, v: (q, "k", v), "k must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,message", BAD_INPUTS)
def test_bad_inputs_raise_one_clear_error(make, message):
    q, k, v = qkv(8, heads=2)
    with pytest.raises(ValueError, match=message):
        attn_zoo.get("dense")(*make(q, k, v), causal=False)


def test_self_attention_mechanisms_refuse_mismatched_lengths():
    q, k, v = qkv(8, n_k=12)
    with pytest.raises(ValueError, match="lsh is self-attention: q and k need the same"):
        attn_zoo.get("lsh")(q, k, v)


def test_causal_with_more_queries_than_keys_is_refused():
    q, k, v = qkv(12, n_k=8)
    with pytest.raises(ValueError, match="causal attention needs len\\(q\\) <= len\\(k\\)"):
        attn_zoo.get("dense")(q, k, v, causal=True)
