"""Each mechanism's triton forward on its default tile against dense triton and sdpa.

Run on a CUDA machine with ``ATTN_ZOO_AUTOTUNE=0`` (the default tiles, those the
compile report judges): ``python scripts/gpu/kernel_times.py warm NAME`` compiles
NAME's kernels (both causalities, head_dim 64 and 128; run one per mechanism in
parallel to fill Triton's cache), then ``python scripts/gpu/kernel_times.py time``
prints, for fp16 q, k, v of [4, 8, 8192, D], each mechanism's time with its plan
made beforehand and with planning inside the call, its ratio to dense triton, and
sdpa's time; last, the host cost of one small call (N = 512).
"""

import sys
import time

import torch
import triton.testing

import attn_zoo

B, H, N = 4, 8, 8192


def inputs(n: int, dim: int) -> list[torch.Tensor]:
    return [torch.randn(B, H, n, dim, device="cuda", dtype=torch.float16) for _ in range(3)]


def bench(call) -> float:
    return triton.testing.do_bench(call, warmup=10, rep=60)


def sdpa(q, k, v, causal):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def warm(name: str) -> None:
    mech = attn_zoo.get(name)
    for dim in (64, 128):
        q, k, v = inputs(1024, dim)
        for causal in (True, False):
            mech(q, k, v, causal=causal, impl="triton")


def times() -> None:
    for dim in (64, 128):
        q, k, v = inputs(N, dim)
        for causal in (True, False):
            dense_ms = None
            for name in attn_zoo.names():
                mech = attn_zoo.get(name)
                plan = mech.plan(q, k, v, causal)
                start = time.perf_counter()
                mech(q, k, v, causal=causal, impl="triton", plan=plan)
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                ms = bench(lambda: mech(q, k, v, causal=causal, impl="triton", plan=plan))  # noqa: B023
                planned = bench(lambda: mech(q, k, v, causal=causal, impl="triton"))  # noqa: B023
                dense_ms = dense_ms or ms
                print(f"d={dim} causal={causal} {name:15s} triton {ms:8.3f} ms "
                      f"(with planning {planned:8.3f}) {ms / dense_ms:5.2f}x dense  "
                      f"first call {first:5.1f} s")  # fmt: skip
            s = bench(lambda: sdpa(q, k, v, causal))  # noqa: B023
            ratio = dense_ms / s
            print(f"d={dim} causal={causal} sdpa {s:8.3f} ms; dense triton/sdpa {ratio:5.2f}")
    q, k, v = inputs(512, 64)
    dense = attn_zoo.get("dense")
    small = bench(lambda: dense(q, k, v, causal=True, impl="triton"))
    print(f"host: dense triton N=512 B={B} H={H}: {small:.4f} ms; "
          f"sdpa {bench(lambda: sdpa(q, k, v, True)):.4f} ms")  # fmt: skip


if __name__ == "__main__":
    with torch.no_grad():
        warm(sys.argv[2]) if sys.argv[1] == "warm" else times()
