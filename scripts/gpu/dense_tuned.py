"""Dense forward on a CUDA machine: triton autotuned, triton on its default tile, and
sdpa, fp16 [4, 16, 8192, D], in ms and TFLOP/s (causal counts half the scores).

``python scripts/gpu/dense_tuned.py``
"""

import torch
import triton.testing

import attn_zoo
from attn_zoo.kernels import tuning


def bench(call) -> float:
    return triton.testing.do_bench(call, warmup=25, rep=200)


def main() -> None:
    dense = attn_zoo.get("dense")
    n, b, h = 8192, 4, 16
    for dim in (64, 128):
        for causal in (True, False):
            q, k, v = (torch.randn(b, h, n, dim, device="cuda", dtype=torch.float16)
                       for _ in range(3))  # fmt: skip
            flops = 4 * b * h * n * n * dim * (0.5 if causal else 1)
            default = tuning.default_tile(dim, q.dtype, "dense")
            run = lambda: dense(q, k, v, causal=causal, impl="triton")  # noqa: B023
            run()
            results = {"triton(tuned)": bench(run)}
            tile = tuning.last_tile()
            with tuning.use_tile(default):
                results["triton(default)"] = bench(run)
            results["sdpa"] = bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: B023
            )
            print(f"d={dim} causal={causal} tuned tile={tile} default={default}")
            for name, ms in results.items():
                print(f"   {name:16s} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s")


if __name__ == "__main__":
    with torch.no_grad():
        main()
