"""Every mechanism's FlexAttention peer against its reference and its oracle
(compiled on CUDA; on the CPU eager, as conftest asks, except the compiled cases
here)."""

import pytest
import torch

import attn_zoo
import attn_zoo.flex
from attn_zoo.bench.cases import Case
from attn_zoo.bench.runner import skip_reason
from conftest import check_impl, qkv, small

pytest.importorskip("torch.nn.attention.flex_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MECHANISMS = [m for m in attn_zoo.names() if "flex" in attn_zoo.get(m).impls]


def test_every_mechanism_has_a_flex_peer():
    assert attn_zoo.names() == MECHANISMS


@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_flex_matches_reference_and_oracle(name, causal, dim):
    check_impl(small(name), "flex", 100, dim, torch.float32, causal, device=DEVICE)


@pytest.mark.skipif(attn_zoo.flex.cpu_compiler() is None, reason="no C++ compiler for inductor")
def test_flex_compiled_on_the_cpu_matches_the_oracle(monkeypatch):
    """xl (a mask_mod and a score_mod reading a table) through inductor's fused CPU
    kernel: the compiled function is the one called."""
    monkeypatch.setenv("ATTN_ZOO_FLEX_COMPILE", "1")
    cpu = torch.device("cpu")
    assert attn_zoo.flex.compiles_on(cpu, need_lse=False)
    assert not attn_zoo.flex.compiles_on(cpu, need_lse=True)  # torch's CPU path has no lse
    real, calls = attn_zoo.flex._compiled(), []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_zoo.flex, "_compiled", lambda: counted)
    check_impl(attn_zoo.get("xl", segment_len=32, mem_len=32), "flex", 128, 32, torch.float32, True)
    assert len(calls) == 1
    monkeypatch.setenv("ATTN_ZOO_FLEX_COMPILE", "0")
    assert not attn_zoo.flex.compiles_on(cpu, need_lse=False)


def test_xl_asks_flex_for_two_stages_on_cuda_only(monkeypatch):
    """xl's table tiles made FlexAttention's H100 kernel ask for more shared memory than
    there is (240 KiB with 3 stages): xl hands flex two stages, which flex passes as
    kernel_options on CUDA only (the CPU kernel takes its own)."""
    import attn_zoo.xl

    handed = []
    real_flex = attn_zoo.xl.flex
    monkeypatch.setattr(attn_zoo.xl, "flex", lambda *a, **k: handed.append(k) or real_flex(*a, **k))
    called = []
    real = torch.nn.attention.flex_attention.flex_attention
    monkeypatch.setattr(torch.nn.attention.flex_attention, "flex_attention",
                        lambda *a, **k: called.append(k) or real(*a, **k))  # fmt: skip
    check_impl(attn_zoo.get("xl", segment_len=32, mem_len=32), "flex", 64, 32, torch.float32, True)
    assert handed[0]["gpu_options"] == {"num_stages": 2}
    assert called and all("kernel_options" not in k for k in called)


def test_flex_has_no_backward_on_the_cpu_and_says_so():
    impl = attn_zoo.get("dense").impl("flex")
    assert not impl.differentiable(torch.device("cpu"))
    assert impl.differentiable(torch.device("cuda"))
    assert not attn_zoo.get("xl").impl("flex").differentiable(torch.device("cuda"))
    case = Case("dense", "flex", "cpu", "float32", 1, 2, 32, 64, True, "fwd_bwd")
    assert skip_reason(case) == "dense/flex has no backward pass on cpu"


def test_flex_is_left_out_of_the_cpu_default_sweep():
    impl = attn_zoo.get("dense").impl("flex")
    assert not impl.default_on(torch.device("cpu"))
    assert impl.default_on(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["dense", "sparse_fixed", "adaptive_span", "lsh", "routing"])
def test_flex_gradients_match_the_reference_on_gpu(name):
    mech = small(name)
    grads = {}
    for impl in ("flex", "reference"):
        q, k, v = (x.cuda().requires_grad_() for x in qkv(100, heads=2, dim=32))
        mech(q, k, v, causal=True, impl=impl).pow(2).sum().backward()
        grads[impl] = [x.grad for x in (q, k, v)]
    for got, want in zip(grads["flex"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_flex_on_gpu(name, dtype):
    for causal in (True, False):
        check_impl(attn_zoo.get(name), "flex", 2048 + 17, 64, dtype, causal, device="cuda")
