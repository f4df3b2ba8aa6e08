"""Reformer's angular LSH (Kitaev et al. 2020, Sec. 2.1) in one kernel for every
round: h(x) = argmax([xR; -xR]) per token, head and round, of the shared keys x
(the queries L2-normalized, Sec. 2.2: normalized here, in registers).

The PyTorch form (:func:`attn_zoo.lsh.hash_round`) writes xR, [B, H, N, b/2] in
float32, for each round, and reads it twice (its max and its min): at [4, 8,
8,192, 64] with 256 buckets and 4 rounds, 1,994 of the plan's 2,266 MB of memory
traffic outside kernels (``python -m attn_zoo.bench.host_ops``). Here each
program holds a block of tokens' x in registers and walks the round's rotation
CHUNK columns at a time, keeping each row's running max and min of xR with their
first indices, so xR never leaves the chip: the traffic is x read once per round
and the buckets written. Ties go to the first index, as
argmax over the concatenation [xR; -xR] gives them (a max of xR that equals -min
wins over it). The products are IEEE float32 (no TF32), as torch.matmul's; their
summation order differs, so a row whose two best candidates differ by a rounding
error may pick the other (as two BLAS libraries may).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn_zoo.kernels import autograd

#: (tokens per program, rotation columns per step, warps) by head_dim: IEEE float32
#: dots run on the FMA units with their operands in registers. Compiled for sm_90, none
#: spills with Triton 3.9 or 3.6, at 59, 123 and 169 thread-instructions per product
#: of a row and a column (64 x 64 at head_dim 64 spills 764 bytes; with 3.6, 64 x 32
#: and 4 warps there spills 3,828).
TILES = {32: (64, 32, 4), 64: (64, 32, 8), 128: (128, 32, 8)}


@triton.jit
def _hash_rounds(
    X, R, OUT, sxb, sxh, sxn, n, H, half,
    ROUNDS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    """Buckets [B, H, ROUNDS, N] (int64) of x [B, H, N, HEAD_DIM] under rotations R
    [H, ROUNDS, HEAD_DIM, half] (contiguous float32): one block of BLOCK tokens of
    one head and round per program (``half``, b/2, is not compile-time: one build
    serves every sequence length's bucket count). ``NORMALIZE``: hash x's rows
    L2-normalized (Reformer's shared keys), as ``F.normalize`` in float32 then cast
    back to x's dtype gives them."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    x_ptrs = X + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxn + dims[None, :]
    x = tl.load(x_ptrs, mask=rows[:, None] < n, other=0.0)
    if NORMALIZE:  # the shared keys: x / max(|x|, 1e-12) in float32, rounded to x's dtype
        wide = x.to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(wide * wide, 1)), 1e-12)
        x = (wide / norm[:, None]).to(X.dtype.element_ty)
    x = x.to(tl.float32)
    rotation = R + (h * ROUNDS + r) * HEAD_DIM * half
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    top_at = tl.zeros([BLOCK], tl.int32)
    low_at = tl.zeros([BLOCK], tl.int32)
    for start in range(0, half, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        inside = cols < half
        part = tl.load(rotation + dims[:, None] * half + cols[None, :], mask=inside[None, :],
                       other=0.0)  # fmt: skip
        xr = tl.dot(x, part, input_precision="ieee")  # [BLOCK, CHUNK]
        above = tl.where(inside[None, :], xr, float("-inf"))
        below = tl.where(inside[None, :], xr, float("inf"))
        step_top, step_top_at = tl.max(above, 1, return_indices=True)  # first on a tie
        step_low, step_low_at = tl.min(below, 1, return_indices=True)
        # strictly better only: on a tie the earlier step's (lower) index stays
        top_at = tl.where(step_top > top, start + step_top_at, top_at)
        top = tl.maximum(top, step_top)
        low_at = tl.where(step_low < low, start + step_low_at, low_at)
        low = tl.minimum(low, step_low)
    bucket = tl.where(top >= -low, top_at, half + low_at).to(tl.int64)
    out = OUT + (pid_bh * ROUNDS + r) * n + rows
    tl.store(out, bucket, mask=rows < n)


#: The dtypes the kernel reads (float64 would be hashed in float32: it is not taken).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def runs_on(x: torch.Tensor) -> bool:
    """Whether a plan hashes ``x`` with :func:`hash_rounds`: on CUDA, or in a dry run
    (:func:`attn_zoo.kernels.dry_run.recorded`, which counts what a GPU's plan does),
    at a head_dim and dtype the kernel takes."""
    on_gpu = x.device.type == "cuda" or autograd.RECORDING.get() is not None
    return on_gpu and x.shape[-1] in TILES and x.dtype in DTYPES


def hash_rounds(x: torch.Tensor, rotations: torch.Tensor, reference=None,
                normalize: bool = False) -> torch.Tensor:  # fmt: skip
    """h(x) = argmax([xR; -xR]) of x [B, H, N, D] (float32, float16 or bfloat16; read
    as float32) under rotations [H, rounds, D, b/2]: buckets [B, H, rounds, N]
    (int64), what ``torch.stack([hash_round(x.float(), rotations[:, r]) ...], 2)``
    gives; with ``normalize``, of x's rows L2-normalized first (in the kernel, as
    :func:`attn_zoo.lsh.shared_keys` normalizes them). In a dry run off the GPU,
    ``reference()`` computes them instead, marked as a kernel's work
    (``autograd.STAND_IN``) for the counters of the host's work: on a GPU it is this
    one launch."""
    batch, heads, n, dim = x.shape
    if rotations.shape[0] != heads or rotations.shape[2] != dim:
        raise ValueError(f"lsh hashing: rotations {tuple(rotations.shape)} for x "
                         f"{tuple(x.shape)}; accepted: [H, rounds, D, b/2]")  # fmt: skip
    if dim not in TILES:
        raise ValueError(f"lsh hashing: head_dim {dim}; accepted: {', '.join(map(str, TILES))}")
    if x.dtype not in DTYPES:
        raise ValueError(f"lsh hashing: dtype {x.dtype}; accepted: float32, float16, bfloat16")
    if autograd.RECORDING.get() is not None and x.device.type != "cuda":
        if reference is None:
            raise ValueError("lsh hashing: a dry run off the GPU needs the reference that "
                             "computes the buckets; accepted: a callable")  # fmt: skip
        token = autograd.STAND_IN.set(True)
        try:
            return reference()
        finally:
            autograd.STAND_IN.reset(token)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rotations = rotations.float().contiguous()
    rounds, half = rotations.shape[1], rotations.shape[3]
    out = torch.empty(batch, heads, rounds, n, dtype=torch.int64, device=x.device)
    block, chunk, warps = TILES[dim]
    chunk = max(16, min(chunk, triton.next_power_of_2(half)))  # tl.dot's least width
    grid = (triton.cdiv(n, block), batch * heads, rounds)
    _hash_rounds[grid](x, rotations, out, x.stride(0), x.stride(1), x.stride(2), n, heads, half,
                       ROUNDS=rounds, HEAD_DIM=dim, BLOCK=block, CHUNK=chunk,
                       NORMALIZE=normalize, num_warps=warps)  # fmt: skip
    return out
