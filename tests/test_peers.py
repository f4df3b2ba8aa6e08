"""The peers (attn_zoo/peers): each wrapped package against dense attention when
configured to see every key, the ones that compute the mechanism's own variant
against its oracle, and what a peer cannot do (missing package, configs it cannot
express, key padding) as clear errors and skipped rows, never a silent result."""

import csv
import math

import pytest
import torch

import attn_zoo
from attn_zoo import oracle
from attn_zoo.bench.cli import main
from attn_zoo.lsh import shared_keys
from attn_zoo.peers import common
from attn_zoo.validation import Unsupported
from conftest import qkv

PEERS = {"lsh": "reformer_pytorch", "routing": "routing_transformer", "xl": "local_attention",
         "compressive": "compressive_transformer_pytorch"}  # fmt: skip
SELF = -5e4  # the packages' score for a token's own key (shared QK)


def needs(name):
    pytest.importorskip(PEERS[name])


def dense(q, k, v, causal, self_score=None):
    """Plain softmax attention in float64, optionally with a fixed self score."""
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    n = q.shape[2]
    eye = torch.eye(n, dtype=torch.bool)
    if self_score is not None:
        scores = scores.masked_fill(eye, self_score)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), -torch.inf)
    return torch.softmax(scores, -1) @ v.double()


def close(out, expected, tol=1e-5):
    err = oracle.rel_error(out.double(), expected)
    assert err < tol, err


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_lsh_peer_sees_every_key_with_two_chunks_and_one_round(causal):
    """Two buckets of N/2 across buckets: each chunk sees itself and the other one."""
    needs("lsh")
    n = 64
    q, k, v = qkv(n, heads=2, dim=16)
    mech = attn_zoo.get("lsh", bucket_size=n // 2, n_hashes=1, attend_across_buckets=True)
    out = mech(q, k, v, causal=causal, impl="peer")
    close(out, dense(q, shared_keys(q), v, causal, SELF))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_routing_peer_sees_every_key_with_one_cluster_and_a_wide_window(causal):
    """One cluster of all N tokens (the package masks self there) averaged with a
    window covering the sequence: (dense + dense without self) / 2."""
    needs("routing")
    n = 48
    q, k, v = qkv(n, heads=2, dim=16)
    mech = attn_zoo.get("routing", n_clusters=1, window=2 * n)
    keys = shared_keys(q)
    expected = (dense(q, keys, v, causal) + dense(q, keys, v, causal, SELF)) / 2
    close(mech(q, k, v, causal=causal, impl="peer"), expected)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_xl_peer_sees_every_key_with_one_segment(causal):
    needs("xl")
    q, k, v = qkv(40, heads=2, dim=16)
    out = attn_zoo.get("xl", segment_len=64, mem_len=0)(q, k, v, causal=causal, impl="peer")
    close(out, dense(q, k, v, causal))


@pytest.mark.parametrize("n", [64, 61])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_xl_peer_is_xl_without_the_relative_terms(n, causal):
    """Windows looking mem_len / segment_len back are Transformer-XL's visible set:
    the peer equals the xl oracle with u = v = W_R = 0, ragged N included."""
    needs("xl")
    mech = attn_zoo.get("xl", segment_len=8, mem_len=16)
    q, k, v = qkv(n, heads=2, dim=16)
    zero = {name: torch.zeros_like(t) for name, t in mech.learnable(2, 16).items()}
    plan = mech.plan(q, k, v, causal, params=zero)
    rows = torch.arange(n)
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    close(mech(q, k, v, causal=causal, impl="peer"), expected)


@pytest.mark.parametrize("compression", ["mean", "max", "conv"])
@pytest.mark.parametrize("n", [64, 60])
def test_compressive_peer_is_the_mechanism(compression, n):
    """The package's Algorithm 1 (FIFO memory, compressed queue, causal mask) on the
    mechanism's q, k, v and f_c: the same variant, checked against the oracle."""
    needs("compressive")
    mech = attn_zoo.get("compressive", segment_len=8, mem_len=8, cmem_len=4, rate=2,
                        compression=compression)  # fmt: skip
    assert mech.impl("peer").variant(mech, True) is None
    q, k, v = qkv(n, heads=2, dim=16)
    plan = mech.plan(q, k, v, True)
    rows = torch.arange(n)
    expected = oracle.evaluate(q, k, v, mech.oracle(q, k, v, plan, rows), rows)
    close(mech(q, k, v, causal=True, impl="peer", plan=plan), expected)


def test_compressive_peer_sees_every_key_with_one_segment():
    needs("compressive")
    q, k, v = qkv(40, heads=2, dim=16)
    out = attn_zoo.get("compressive", segment_len=64)(q, k, v, causal=True, impl="peer")
    close(out, dense(q, k, v, True))


def test_what_a_peer_cannot_express_is_refused():
    needs("xl")
    needs("compressive")
    q, k, v = qkv(32, heads=2, dim=16)
    with pytest.raises(Unsupported, match="mem_len a multiple of segment_len"):
        attn_zoo.get("xl", segment_len=8, mem_len=12)(q, k, v, causal=True, impl="peer")
    with pytest.raises(Unsupported, match="causal only"):
        attn_zoo.get("compressive", segment_len=8)(q, k, v, causal=False, impl="peer")
    keep = torch.ones(1, 32, dtype=torch.bool)
    with pytest.raises(Unsupported, match="key padding"):
        attn_zoo.get("xl", segment_len=8, mem_len=8)(q, k, v, impl="peer", key_padding=keep)


@pytest.mark.parametrize("name", list(PEERS))
def test_a_peer_trains(name):
    """Peers are plain torch: gradients reach q and v."""
    needs(name)
    q, k, v = qkv(64, heads=2, dim=16, grad=True)
    mech = attn_zoo.get(name, **attn_zoo.get(name).small)
    if name == "xl":
        mech = attn_zoo.get("xl", segment_len=16, mem_len=16)
    mech(q, k, v, causal=True, impl="peer").sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, v))


def _sweep(tmp_path, *args, run_id="p", code=0):
    """``bench run --impls peer`` at N = 64 on the paper configs; its rows by mechanism."""
    assert main(["run", "--out", str(tmp_path), "--run-id", run_id, "--repeats", "1",
                 "--rounds", "1", "--min-time", "0", "--seq-lens", "64", "--impls", "peer",
                 "--heads", "2", "--head-dim", "16", *args]) == code  # fmt: skip
    with open(tmp_path / run_id / "results.csv") as f:
        return {row["mechanism"]: row for row in csv.DictReader(f)}


def test_a_sweep_checks_each_peer_as_its_variant_allows(tmp_path):
    """Another variant: err_dense and the reason, no err_oracle; the mechanism's own
    variant (compressive): err_oracle within tolerance; bidirectional compressive:
    a skipped row saying why; mechanisms without a peer: no row."""
    for name in PEERS:
        needs(name)
    rows = _sweep(tmp_path, "--mechanisms", "lsh,compressive,dense")
    assert set(rows) == {"lsh", "compressive"}
    lsh = rows["lsh"]
    assert lsh["status"] == "ok" and lsh["err_oracle"] == "" and float(lsh["err_dense"]) > 0
    assert lsh["note"].startswith("no err_oracle: reformer-pytorch LSHAttention")
    assert rows["compressive"]["status"] == "ok"
    assert float(rows["compressive"]["err_oracle"]) < 1e-5
    bidirectional = _sweep(
        tmp_path, "--mechanisms", "compressive", "--no-causal", run_id="b", code=1
    )  # nothing measured: the sweep says so
    assert bidirectional["compressive"]["status"] == "skipped"
    assert "causal only" in bidirectional["compressive"]["note"]


def test_a_missing_package_is_a_skipped_row_and_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_import_error", lambda module: "ModuleNotFoundError: gone")
    row = _sweep(tmp_path, "--mechanisms", "lsh", code=1)["lsh"]
    assert row["status"] == "skipped"
    assert "reformer-pytorch does not import" in row["note"]
    assert "pip install 'attn-zoo[peers]'" in row["note"]
    q, k, v = qkv(16, heads=2, dim=16)
    with pytest.raises(ValueError, match="lsh/peer cannot run on cpu: peer package"):
        attn_zoo.get("lsh")(q, k, v, impl="peer")
