"""Every mechanism's ``triton`` implementation against its reference and its
float64 oracle. Without a GPU the kernels run in Triton's interpreter (conftest
sets TRITON_INTERPRET=1), at small N; every kernel output starts as NaN, so a
row the kernel forgets to write fails."""

import pytest
import torch

import attn_zoo
from conftest import check_impl, small

pytest.importorskip("triton")
import attn_zoo.kernels.flash

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MECHANISMS = [m for m in attn_zoo.names() if "triton" in attn_zoo.get(m).impls]

# Larger structures at N = 200, head_dim 128 (32-wide tiles), so that layouts
# hold full blocks (no element mask) beside partial ones.
WIDE = {
    "dense": {},
    "sparse_strided": {"stride": 64},
    "sparse_fixed": {"stride": 64, "summary": 8},
    "adaptive_span": {"ramp": 8.0, "span_range": (40.0, 120.0)},
    "xl": {"segment_len": 64, "mem_len": 64, "same_length": True},
    "compressive": {"segment_len": 64, "mem_len": 64, "cmem_len": 16, "rate": 4},
    "lsh": {"bucket_size": 32, "n_hashes": 3},
    "routing": {"window": 64},
}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernel launcher allocates starts as NaN."""

    def nan_filled(q, shape, dtype):
        return torch.full(shape, float("nan"), device=q.device, dtype=dtype)

    monkeypatch.setattr(attn_zoo.kernels.flash, "new_output", nan_filled)


def check(mech, n, dim, dtype, causal, batch=1):
    check_impl(mech, "triton", n, dim, dtype, causal, batch=batch, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_triton_matches_reference_and_oracle(name, causal, dim, dtype):
    """Ragged N (100 is no multiple of any tile), the small configs: several
    segments with memories, buckets, clusters, strides."""
    check(small(name), 100, dim, dtype, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_triton_with_full_blocks(name, causal):
    check(attn_zoo.get(name, **WIDE[name]), 200, 128, torch.float32, causal, batch=2)


@pytest.mark.parametrize("n", [16, 64, 129])
@pytest.mark.parametrize("name", MECHANISMS)
def test_triton_at_other_lengths(name, n):
    check(small(name), n, 64, torch.float32, True)


@pytest.mark.parametrize(
    "name,config",
    [
        ("xl", {"segment_len": 16, "mem_len": 0}),
        ("xl", {"segment_len": 16, "mem_len": 40, "clamp_len": 8}),
        ("compressive", {"segment_len": 8, "mem_len": 8, "cmem_len": 4, "compression": "max"}),
        ("compressive", {"segment_len": 8, "mem_len": 8, "cmem_len": 4, "compression": "conv"}),
        ("compressive", {"segment_len": 12, "mem_len": 0, "cmem_len": 3, "rate": 3}),
        ("sparse_fixed", {"stride": 8, "summary": 0}),
        ("sparse_strided", {"stride": 1}),
        ("lsh", {"bucket_size": 8, "n_hashes": 1, "n_buckets": 2}),
        ("routing", {"window": 8, "n_clusters": 3}),
    ],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_triton_config_corners(name, config, causal):
    check(attn_zoo.get(name, **config), 90, 32, torch.float32, causal)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])  # fmt: skip
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_triton_on_gpu(name, causal, dtype):
    """Default configs at a length with several of their structures, all head dims
    (float32 on its own tiles, :func:`attn_zoo.kernels.tuning.float32_tile`)."""
    for dim in (32, 64, 128):
        check(attn_zoo.get(name), 2048 + 17, dim, dtype, causal)
