"""attn-zoo inside a Hugging Face model: a tiny Llama built from a config in code
(no download), its attention replaced through transformers' AttentionInterface."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra is not installed")

from attn_zoo.integrations.transformers import register  # noqa: E402

MECHANISMS = {
    "dense": {},
    "sparse_strided": {"stride": 8},
    "adaptive_span": {"ramp": 4.0, "span_range": (2.0, 20.0)},
}


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0  # the second sequence is left-padded
    return model, ids, mask


@pytest.mark.parametrize("padding", [False, True], ids=["full", "padded"])
def test_dense_matches_transformers_sdpa(llama, padding):
    model, ids, mask = llama
    mask = mask if padding else torch.ones_like(mask)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(register("dense"))
        got = model(ids, attention_mask=mask).logits
    model.set_attn_implementation("sdpa")
    real = mask.bool()  # padded positions' logits are not defined by either
    assert (got - want)[real].abs().max() < 1e-5


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_forward_backward_generate(llama, name):
    model, ids, mask = llama
    model.set_attn_implementation(register(name, **MECHANISMS[name]))
    try:
        model.train()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0
        model.zero_grad()
        model.eval()
        with torch.no_grad():
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            fresh = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   use_cache=False)  # fmt: skip
        assert cached.shape == (2, 48)
        assert torch.equal(cached, fresh)  # each decode step is the full sequence's last row
    finally:
        model.set_attn_implementation("sdpa")


def test_register_rejects_a_bad_config_at_once():
    with pytest.raises(ValueError, match="unknown config field"):
        register("sparse_strided", strid=8)
