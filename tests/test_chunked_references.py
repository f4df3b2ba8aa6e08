"""The efficient references run their tiles a chunk at a time within a score
budget (attn_zoo.tiles.score_budget): the chunking changes no number."""

import pytest
import torch

import attn_zoo
from attn_zoo import oracle
from attn_zoo.tiles import budget, chunks, score_budget
from conftest import qkv, small

EFFICIENT = [name for name in attn_zoo.names() if name != "dense"]


def run(mech, causal, nbytes):
    q, k, v = (x.requires_grad_() for x in qkv(150, batch=2, heads=2, dim=32, seed=4))
    plan = mech.plan(q, k, v, causal)
    with score_budget(nbytes):
        out = mech(q, k, v, causal=causal, impl="reference", plan=plan)
        out.pow(2).sum().backward()
    return out.detach(), q.grad, v.grad


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", EFFICIENT)
def test_one_tile_per_chunk_equals_all_tiles_at_once(name, causal):
    """Forward and gradients (through the checkpointed chunks) to 1e-6."""
    mech = small(name)
    whole = run(mech, causal, 1 << 40)
    tiny = run(mech, causal, 1)
    for got, want in zip(tiny, whole, strict=True):
        assert oracle.rel_error(got, want) < 1e-6


def test_chunks_fit_the_budget():
    like = torch.empty(2, 4, 1, 1)
    per_tile = 2 * 4 * 64 * 128 * 4 * 4  # B H rows keys, 4 bytes, 4 live copies
    with score_budget(3 * per_tile):
        parts = list(chunks(10, 64, 128, like))
    assert [p.stop - p.start for p in parts] == [3, 3, 3, 1]
    with score_budget(1):  # at least one tile
        assert len(list(chunks(10, 64, 128, like))) == 10
    with pytest.raises(ValueError, match="score budget must be a positive number of bytes"):
        score_budget(0).__enter__()


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTN_ZOO_REFERENCE_BUDGET_MB", "8")
    assert budget() == 8 << 20
    with score_budget(123):
        assert budget() == 123
