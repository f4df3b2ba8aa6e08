"""Tiles of the flash core: which one a launch runs, and the autotuner that picks it.

A :class:`Tile` is the (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward.
A mechanism asks :func:`tile_for` for its tile, builds its block layouts for that
tile's block shape (layouts are cached per block shape, never assumed), and hands
the tile to its parts. Three sources, first match wins:

* a tile forced with :func:`use_tile` (the autotuner while it times a candidate,
  tests, the compile report);
* under Triton's interpreter, one small fixed tile (at most 64 x 64, one stage:
  fast tests, and ragged lengths still cross several blocks);
* else :func:`default_tile`, the tile the compile report judges
  (``reports/kernels-sm90``).

On a GPU :func:`tuned_call` runs a ``triton`` impl through the autotuner: the
first call for a key (mechanism and its config, head_dim, dtype, causality,
length rounded up to a power of two) times every candidate of :func:`candidates`
that fits (:func:`fits` prunes by shared memory and accumulator registers) with
``triton.testing.do_bench``, and later calls run the fastest. It is Triton's
``triton.autotune`` one level up: ``triton.autotune`` can vary only constexprs
and launch options, while a tile here also changes the block layout, an argument
whose shape depends on the block size.

Chosen tiles last for the process. With ``ATTN_ZOO_TILES=FILE`` they also go to a
JSON-lines file, one line per choice with the GPU's name and Triton's version, and
a later process reads them from there instead of timing the candidates again (a
sweep's first calls, stage after stage on a lent GPU; the file is also the record of
what the autotuner chose).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.metadata
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from attn_zoo.kernels.runtime import interpreting

SHARED_LIMIT = 227 * 1024  # bytes per block on sm_90 (H100/H200)
#: Float32 accumulator values per thread (the [BM, D] output and the [BM, BN] scores)
#: above which a tile spills (255 registers hold at most this many besides addresses).
ACCUMULATOR_LIMIT = 128

#: What a launch computes beyond q . k: nothing but a band ("dense"), element masks,
#: windows, gathers or a causal ramp ("plain"), adaptive span's bidirectional ramp
#: ("ramp": |x| and its self pair hidden, per pair), xl's
#: relative term (a second product, of [BM, D] query and [BN, D] key features), or
#: lsh's duplicate rule (the earlier rounds, per pair).
KINDS = ("dense", "plain", "ramp", "relative", "duplicates")


@dataclass(frozen=True)
class Tile:
    """The forward's blocks (what the layout is built for), warps and stages,
    ``step_n``: keys per inner-loop step of the masked walk, either a divisor of
    block_n (each key block walked in pieces) or a multiple of it (each step walks
    ``step_n // block_n`` consecutive blocks of the list, where the list allows:
    :meth:`~attn_zoo.kernels.layout.BlockLayout.walks_in_steps`; None: one block), and
    ``own_step_n``: keys per step of the own walk, the blocks holding a pair i == j
    under a self bias (None: ``step``, at most one block). The full walk takes at
    most one block a step: its blocks have no element mask, so a step must not pass
    them."""

    block_m: int
    block_n: int
    warps: int
    stages: int = 3
    step_n: int | None = None
    own_step_n: int | None = None

    def __post_init__(self):
        for name, keys, accepted in (
            ("step_n", self.step_n, "16 or more dividing block_n, or a multiple of it"),
            ("own_step_n", self.own_step_n, "16 or more dividing block_n"),
        ):
            if keys is None:
                continue
            spans = name == "step_n" and keys % self.block_n == 0  # whole blocks a step
            if keys < 16 or not (spans or self.block_n % keys == 0):
                raise ValueError(f"tile: {name} {keys} with block_n {self.block_n}; "
                                 f"accepted: None, or {accepted}")  # fmt: skip

    @property
    def blocks(self) -> tuple[int, int]:
        """(BLOCK_M, BLOCK_N): what a block layout is built for."""
        return self.block_m, self.block_n

    @property
    def step(self) -> int:
        """Keys per step of the forward's masked walk."""
        return self.step_n or self.block_n

    @property
    def span(self) -> int:
        """Key blocks per step of the masked walk (1: a block or a piece of one)."""
        return max(1, self.step // self.block_n)

    @property
    def full_step(self) -> int:
        """Keys per step of the full walk (it divides block_n)."""
        return min(self.step, self.block_n)

    @property
    def own_step(self) -> int:
        """Keys per step of the own walk (it divides block_n)."""
        return self.own_step_n or self.full_step

    def in_blocks(self) -> Tile:
        """The same tile walking at most one key block a step."""
        return dataclasses.replace(self, step_n=None) if self.span > 1 else self

    def __str__(self) -> str:
        step = f" step {self.step_n}" if self.step_n else ""
        step += f" own step {self.own_step_n}" if self.own_step_n else ""
        return f"{self.block_m}x{self.block_n}{step} w{self.warps} s{self.stages}"


@dataclass(frozen=True)
class BackwardTile:
    """The backward's programs (FlashAttention-2's two passes), within the forward's
    block layout: a dQ program holds ``program`` query rows and walks ``step`` keys
    at a time; a dK/dV program holds ``program`` keys and walks ``step`` query rows.
    Both divide the layout's blocks, so a full block's pieces are full."""

    program: int
    step: int
    warps: int = 8
    stages: int = 3  # the dK/dV pass's
    stages_dq: int = 3  # the dQ pass's
    dq: tuple[int, int, int] | None = None  # the dQ pass's (program, step, warps), if others

    def of(self, kernel: str) -> tuple[int, int, int, int]:
        """(program, step, warps, stages) of the ``"bwd_dq"`` or ``"bwd_dkdv"`` pass."""
        if kernel == "bwd_dq":
            return (*(self.dq or (self.program, self.step, self.warps)), self.stages_dq)
        return self.program, self.step, self.warps, self.stages


def backward_tile(head_dim: int, dtype: torch.dtype, kind: str, tile: Tile,
                  triton: tuple[int, int] | None = None) -> BackwardTile:  # fmt: skip
    """The backward's programs for a forward that ran ``tile``: float32's
    (:func:`float32_backward_tile`) or fp16/bf16's (:func:`mma_backward_tile`)."""
    _check_kind(kind)
    if dtype == torch.float32:
        return float32_backward_tile(head_dim, triton)
    return mma_backward_tile(head_dim, kind, tile, triton)


def mma_backward_tile(head_dim: int, kind: str, tile: Tile,
                      triton: tuple[int, int] | None = None) -> BackwardTile:  # fmt: skip
    """fp16/bf16's backward programs, per the compile report (sm_90 SASS; dense's
    warp-instructions per 4,096 scores of the full-block walk, fp16, head_dim 64 and 128;
    Triton tutorial 06's backward compiled the same way: dQ 1,088 and dK/dV 1,328 at 64):

    * dQ: the forward's query block up to 128 rows, in steps of 64 keys, 8 warps (4 for
      64 rows), 3 stages: 1,232 and 1,480, against 2,528 and 4,848 on 64 x 64 programs
      with 8 warps before;
    * dK/dV (scored transposed, k q^T, so that P^T and dS^T feed the next MMA from
      registers): the key block up to 128 keys, in steps of 32 rows, 2 stages; 4 warps
      up to head_dim 64 (1,692 against 3,568), 8 above (2,768 against 5,152; for a
      band alone, kind ``"dense"``, steps of 64: 2,116; with any other rule they spill
      68-128 bytes);
    * xl's relative term at 128 (its forward's blocks are 64 x 128 with Triton 3.9,
      128 x 64 before): dQ 64 rows in steps of 64 with 4 warps, 2 stages (1,964);
      dK/dV in steps of 32 with 8 warps for 128 keys (4 for 64), 1 stage with Triton
      3.9 and 2 before it (3,064);
    * lsh (64 x 64 blocks, its rounds' codes per pair): dQ 64 x 64 with 4 warps and 2
      stages (2,596 and 2,940, against 5,584 and 7,824), dK/dV 64 keys in steps of 32
      with 4 warps and 2 stages (at 128, 3 stages spill 48 bytes across buckets).

    Triton 3.6 (the GPU image's; ``triton``, the installed version by default) spills
    where 3.9 does not: up to head_dim 64, dK/dV takes steps of 16 rows there but for a
    band (4 bytes spill with key padding); lsh at 128 dQ steps of 32 keys and dK/dV of
    16 rows.

    Every program divides the forward's blocks, so a full block's pieces are full."""
    wide, newer = head_dim > 64, _newer(triton)
    if kind == "duplicates":
        narrow = wide and not newer  # Triton 3.6 at 128: 4 bytes spill in dQ, 40-108 in dK/dV
        dq = (min(tile.block_m, 64), min(tile.block_n, 32 if narrow else 64), 4)
        return BackwardTile(min(tile.block_n, 64), min(tile.block_m, 16 if narrow else 32), 4,
                            2, 2, dq)  # fmt: skip
    rows, keys = min(tile.block_m, 128), min(tile.block_n, 128)
    if kind == "relative" and wide:
        return BackwardTile(keys, min(tile.block_m, 32), 8 if keys == 128 else 4,
                            stages=1 if newer else 2, stages_dq=2,
                            dq=(min(rows, 64), min(tile.block_n, 64), 4))  # fmt: skip
    dq = (rows, min(tile.block_n, 64), 8 if rows == 128 else 4)
    band = kind == "dense"
    # Triton 3.6 spills 8-136 bytes up to head_dim 64 in steps of 32 with any rule but a band
    step = (64 if band else 32) if wide else (32 if newer or band else 16)
    return BackwardTile(keys, min(tile.block_m, step), 8 if wide else 4, stages=2, stages_dq=3,
                        dq=dq)  # fmt: skip


@functools.cache
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, read without importing it, once per
    process; a tile that differs between compilers keys on it (newest assumed when
    it is missing)."""
    try:
        found = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return (99, 0)
    major, minor = (re.match(r"\d+", part) for part in found.split(".")[:2])
    return int(major.group()), int(minor.group())


def _newer(triton: tuple[int, int] | None = None) -> bool:
    """Whether ``triton`` (the installed version by default) compiles like 3.9, not
    like 3.6: the two versions the compile report measured where tiles differ."""
    return (triton or triton_version()) >= (3, 9)


def kind_of(relative: bool, duplicates: bool, band_only: bool = False, ramp: bool = False) -> str:
    """The kind of a launch: with xl's relative term, lsh's duplicate count, adaptive
    span's bidirectional ramp (``ramp``), or a band and nothing else."""
    if relative or duplicates:
        return "relative" if relative else "duplicates"
    if ramp:
        return "ramp"
    return "dense" if band_only else "plain"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"tuning: unknown kind {kind!r}; accepted: {', '.join(KINDS)}")


def default_tile(head_dim: int, dtype: torch.dtype, kind: str = "plain") -> Tile:
    """The untuned tile, per the compile report (sm_90 SASS, no GPU; warp-instructions
    per 4,096 scores of the full-block walk, fp16):

    * fp16/bf16, dense, plain (windows, gathers, groups, key padding): 128 x 128 with
      8 warps (two warpgroups of HGMMA, the tutorial's tile at head_dim 128) and 3
      stages: dense 954 and 1,132 at head_dim 64 and 128, against 1,264 and 1,632
      with 64 x 64 and 4 warps. Windows and gathers took 64 x 64 at 128 while their
      masked walk tested each pair's band, window and group (8-40 bytes of spill at
      128 x 128); with one compare against the row's key run nothing spills;
    * ramp (adaptive span, bidirectional): the same up to head_dim 64, but at 64 the
      stages follow the compiler: 2 with Triton 3.9 (3 spill 4 bytes), else 3 (Triton
      3.6 spills 4 bytes with 3, stored before the loops and loaded after them, and
      20 with 2); at 128, 128 x 128 with the own walk (the blocks holding i == j) in
      steps of 64 keys: full 1,108, masked 1,928, own 2,668, no spill on Triton 3.6 or
      3.9; whole 128-key steps there too spill 32 bytes (reloaded in the masked and
      own walks); 128 x 64 (1,472 and 2,320) was the tile before (causally the ramp is
      plain, 1,108; at 128 Triton 3.6 spills 4 bytes there, 3.9 none);
    * xl: 128 x 128 with 8 warps up to head_dim 64 (1,050, against 1,408 with 64 x 64);
      at 128 (128 x 128 needs 256 KiB of shared memory with 2 stages) 64 x 128 with one
      warpgroup and 2 stages (224 KiB), 1,450 and 1,990 in the masked walk: its output
      is rescaled once per 128 keys, not per 64; with 128 x 64, 8 warps and 2 stages,
      1,780 and 2,260. Triton 3.6 spills 40 bytes on 64 x 128, none on 128 x 64: before
      3.9, 128 x 64;
    * lsh: 64 x 64 with 4 warps at every head_dim (with 8 warps, or 128 x 64, more
      per score or more pairs scored than its 64-place chunks need); its masked walk
      takes a chunk's two blocks, c - 1 and c, in one step of 128 keys (``step_n``),
      which halves the per-step work of the online softmax: its last round's masked
      walk 2,338 and 2,530 at head_dim 32 and 64, against 2,536 and 2,764 a block a
      step (Triton 3.6: 3,136 and 3,304 against 3,736 and 4,004); at 128 the rounds
      with 1 and 2 earlier rounds 2,270 and 2,530 against 2,680 and 2,900 (3.6, with
      2 stages: 2,978 and 3,270 against 3,628 and 3,944 on 3 stages, where the wide
      step spills 4-8 bytes). Rounds testing more earlier rounds than
      :func:`wide_step_rounds` walk a block a step (:func:`masked_walk_tile`);
    * float32: :func:`float32_tile`.
    """
    _check_kind(kind)
    if dtype == torch.float32:
        return float32_tile(head_dim, kind)
    if kind == "relative" and head_dim <= 64:
        return Tile(128, 128, 8)
    if kind == "relative":
        return Tile(64, 128, 4, 2) if _newer() else Tile(128, 64, 8, 2)
    if kind == "duplicates":
        return Tile(64, 64, 4, 3 if head_dim <= 64 or _newer() else 2, step_n=128)
    if kind == "ramp" and head_dim > 64:
        return Tile(128, 128, 8, own_step_n=64)
    if kind == "ramp" and head_dim == 64:
        return Tile(128, 128, 8, 2 if _newer() else 3)
    return Tile(128, 128, 8)


def wide_step_rounds(head_dim: int) -> int:
    """The most earlier rounds an lsh round can test (Eq. 7: a code per key and round
    beside the scores) while its masked walk takes several blocks a step without
    spilling, fp16/bf16 on sm_90 with Triton 3.6 and 3.9 on :func:`default_tile`'s
    stages, measured up to 7 (8 hashes): 7 up to head_dim 32, 6 at 64 (7 spill 20
    bytes with 3.9), 2 at 128 (3 spill 56-60 bytes with 3.9, 8 with 3.6)."""
    return 7 if head_dim <= 32 else 6 if head_dim <= 64 else 2


def masked_walk_tile(tile: Tile, head_dim: int, self_test: bool, earlier: int = 0) -> Tile:
    """``tile`` as a part's forward walks it: one block a step (:meth:`Tile.in_blocks`)
    under a self test (the blocks holding i == j are walked apart, so the masked list
    skips them) or where lsh's round tests more ``earlier`` rounds than
    :func:`wide_step_rounds` allows. The same pairs either way."""
    if self_test or earlier > wide_step_rounds(head_dim):
        return tile.in_blocks()
    return tile


def float32_tile(head_dim: int, kind: str = "plain") -> Tile:
    """The untuned float32 tile: IEEE dots run on the FMA units (no MMA) with their
    operands in registers, so the tile is the fastest by the compile report that
    spills nothing in any variant with Triton 3.9 or 3.6 (warp-instructions per
    4,096 scores of the full-block walk, dense):

    * up to head_dim 32, 64 x 64 with 8 warps and 2 stages (11,392);
    * at 64, 32 x 32 with 4 warps and 2 stages (22,272); 64 x 32 with 8 warps for
      dense and xl (21,840); 32 x 64 with 8 warps for lsh, whose earlier rounds'
      codes spill the others;
    * at 128, 32 x 64 with 8 warps and 2 stages (42,256), 3 for lsh (2 spills 1,880
      bytes with Triton 3.6, 3 none).

    The tiles before (64 x 64, 32 x 32 at 128, 4 warps but for dense, xl and lsh)
    spilled in most variants: up to 40 bytes at head_dim 32, 5,192 at 64 and 1,784
    at 128."""
    if head_dim <= 32:
        return Tile(64, 64, 8, 2)
    if head_dim > 64:
        return Tile(32, 64, 8, 3 if kind == "duplicates" else 2)
    if kind == "duplicates":
        return Tile(32, 64, 8, 2)
    return Tile(64, 32, 8, 2) if kind in ("dense", "relative") else Tile(32, 32, 4, 2)


def float32_backward_tile(head_dim: int, triton: tuple[int, int] | None = None) -> BackwardTile:
    """The float32 backward's programs (FMA dots, operands in registers), by the
    compile report (warp-instructions per 4,096 scores, dense, dQ and dK/dV):

    * up to head_dim 32, 32 rows or keys in steps of 16 with 4 warps (16,896 and
      22,624); the dK/dV pass, which scores its tiles transposed, in 1 stage with Triton
      3.9 (2 spill 32 bytes in lsh's) and 2 before it (1 spills 8 there);
    * above, dK/dV 16 keys in steps of 16 with 8 warps (56,320 at 64); dQ 32 rows in
      steps of 32 with 4 warps at 64 (30,352; 40,192 on dK/dV's programs), 16 in
      steps of 16 with 4 warps at 128 (68,416, 10% below 8 warps'). At 128 the dK/dV
      pass's stages follow the compiler (``triton``, the installed version by
      default): with Triton 3.9, 1 (96,640; 2 spilled 164-472 bytes), before it 2
      (none spill there, 1 spills 4-8 bytes).

    Nothing else spills, but Triton 3.6's dQ of lsh at 128 (16 bytes; 8 warps none)
    and, since the dK/dV pass puts its rows at lsh's positions, lsh's dK/dV at 32 with
    Triton 3.9 (8 and 24 bytes: 6 local loads and stores a program, none in its walks;
    16 keys a program spill none at 10-12% more instructions per score).
    Scoring dK/dV's tiles transposed took 7-9% off its instructions per score (dense:
    25,824, 60,800 and 105,344 before at 32, 64 and 128).

    The 64 x 64 programs before (32 x 32 at 128) spilled in dK/dV in every variant:
    1,316 bytes at head_dim 32 (11,048 for gathered keys), 2,980 at 64 (xl's dQ
    32,588), 5,040 at 128 (lsh's 20,872). Both divide every float32 forward tile
    (:func:`float32_tile`)."""
    if head_dim > 64:
        return BackwardTile(16, 16, 8, stages=1 if _newer(triton) else 2, stages_dq=2,
                            dq=(16, 16, 4))  # fmt: skip
    if head_dim > 32:
        return BackwardTile(16, 16, 8, stages=2, stages_dq=2, dq=(32, 32, 4))
    return BackwardTile(32, 16, 4, stages=1 if _newer(triton) else 2, stages_dq=2)


def interpreter_tile(head_dim: int, dtype: torch.dtype, kind: str = "plain") -> Tile:
    """The fixed tile under the interpreter: the fp16 default's shape capped at 64, for
    every dtype (the interpreter's cost is per program and step, so the GPU's smaller
    float32 tiles would only slow the tests; ``GPU_TILES`` in the tests runs those)."""
    tile = default_tile(head_dim, torch.float16, kind)
    block_n = min(tile.block_n, 64)
    wide = tile.span * block_n if tile.span > 1 else None  # steps of several blocks stay
    return Tile(min(tile.block_m, 64), block_n, tile.warps, 1, step_n=wide)


def fits(tile: Tile, head_dim: int, itemsize: int, kind: str = "plain") -> bool:
    """Whether ``tile`` can run well: K and V tiles per stage and the query tile in
    shared memory (plus xl's key and query features) under sm_90's 227 KiB, and the
    float32 accumulators within :data:`ACCUMULATOR_LIMIT` values per thread."""
    per_stage = 2 * tile.step * head_dim * itemsize
    queries = tile.block_m * head_dim * itemsize
    if kind == "relative":  # g beside K and V, f beside q
        per_stage += tile.step * head_dim * itemsize
        queries *= 2
    shared = tile.stages * per_stage + queries
    values = tile.block_m * (head_dim + tile.step) / (32 * tile.warps)
    return shared <= SHARED_LIMIT and values <= ACCUMULATOR_LIMIT


def candidates(head_dim: int, dtype: torch.dtype, kind: str = "plain") -> list[Tile]:
    """The autotuner's configs that :func:`fits`, the default first; for float32
    (FMA dots) only tiles of at most 64 x 64, the larger spill; for lsh also its
    chunks' two blocks a step at every stage count."""
    _check_kind(kind)
    configs = [default_tile(head_dim, dtype, kind)]
    if dtype == torch.float32:
        shapes = [(64, 64, 8), (64, 32, 8), (32, 64, 8), (64, 32, 4), (32, 32, 4)]
    else:
        shapes = [(128, 128, 8), (128, 64, 4), (128, 64, 8), (64, 128, 4), (64, 64, 4),
                  (64, 64, 8), (32, 32, 4)]  # fmt: skip
    configs += [Tile(m, n, w, s) for m, n, w in shapes for s in (2, 3, 4)]
    if dtype != torch.float32:
        configs += [Tile(64, 64, 8, s, step_n=32) for s in (2, 3)]
    if kind == "duplicates" and dtype != torch.float32:  # a chunk's two blocks a step
        configs += [Tile(64, 64, 4, s, step_n=128) for s in (2, 3, 4)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    found: list[Tile] = []
    for tile in configs:
        if tile not in found and fits(tile, head_dim, itemsize, kind):
            found.append(tile)
    return found


_FORCED: contextvars.ContextVar[Tile | None] = contextvars.ContextVar("tile", default=None)


@contextlib.contextmanager
def use_tile(tile: Tile) -> Iterator[Tile]:
    """Every launch inside runs ``tile`` (layouts are built for its block shape)."""
    token = _FORCED.set(tile)
    try:
        yield tile
    finally:
        _FORCED.reset(token)


#: Set inside :func:`attn_zoo.kernels.dry_run.dry_run`: every launch takes the GPU's tile.
GPU_TILES: contextvars.ContextVar[bool] = contextvars.ContextVar("gpu_tiles", default=False)


def _off_the_gpu(q: torch.Tensor) -> bool:
    """Whether a launch on ``q`` runs in the interpreter's fixed tiles."""
    return (interpreting() or q.device.type != "cuda") and not GPU_TILES.get()


def tile_for(q: torch.Tensor, kind: str = "plain") -> Tile:
    """The tile of a launch on ``q``: forced, interpreter's, or the default."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    if _off_the_gpu(q):
        return interpreter_tile(q.shape[-1], q.dtype, kind)
    return default_tile(q.shape[-1], q.dtype, kind)


def backward_tile_for(q: torch.Tensor, kind: str, tile: Tile) -> BackwardTile:
    """The backward's programs for a launch on ``q`` whose forward ran ``tile``: in
    the interpreter the fp16 rule for every dtype (:func:`interpreter_tile`), else
    :func:`backward_tile` (float32's programs, 32 and 16, divide every candidate)."""
    if _off_the_gpu(q):
        return mma_backward_tile(q.shape[-1], kind, tile)
    return backward_tile(q.shape[-1], q.dtype, kind, tile)


#: Chosen tiles by key (see :func:`tune_key`), for this process.
CHOSEN: dict[tuple, Tile] = {}
#: The tile the latest autotuned call ran (``bench run`` writes it in the row's note).
LAST: list[Tile] = []


def tune_key(mechanism: str, config: dict, q: torch.Tensor, causal: bool) -> tuple:
    """What a tile choice depends on: the mechanism and its config (its layout's
    kind), head_dim, dtype, causality, and the length rounded up to a power of two."""
    length = 1 << max(0, q.shape[2] - 1).bit_length()
    settings = tuple(sorted((name, repr(value)) for name, value in config.items()))
    return (mechanism, settings, q.shape[-1], str(q.dtype), causal, length)


def _time(call: Callable[[], object]) -> float:
    import triton.testing

    with torch.no_grad():
        return triton.testing.do_bench(call, warmup=5, rep=25)


def autotune(key: tuple, call: Callable[[], torch.Tensor], configs: list[Tile],
             timer: Callable[[Callable[[], object]], float] | None = None) -> Tile:  # fmt: skip
    """The fastest of ``configs`` for ``call`` (cached under ``key``): each timed with
    ``timer`` inside :func:`use_tile`; a config that fails to compile or launch
    (out of resources) is skipped. When none runs, the first config's own error is
    raised (a call that fails whatever the tile keeps its type and message), with a
    note listing every config's."""
    if key in CHOSEN:
        return CHOSEN[key]
    timer = timer or _time
    best, best_ms, errors, first = None, float("inf"), [], None
    for tile in configs:
        try:
            with use_tile(tile):
                took = timer(call)
        except Exception as error:  # a config that cannot run is pruned
            errors.append(f"{tile}: {type(error).__name__}: {str(error)[:80]}")
            first = first or error
            continue
        if took < best_ms:
            best, best_ms = tile, took
    if best is None:  # the call itself fails (bad input, Unsupported): its own error
        first.add_note(f"tuning: no tile ran for {key[0]}: {'; '.join(errors)}")
        raise first
    CHOSEN[key] = best
    return best


def autotuning() -> bool:
    """Autotune on CUDA unless ATTN_ZOO_AUTOTUNE=0 (then the default tile runs)."""
    return os.environ.get("ATTN_ZOO_AUTOTUNE", "1") != "0"


def device_name(device) -> str:
    """The GPU's name and Triton's version: what a stored tile was chosen on."""
    major, minor = triton_version()
    return f"{torch.cuda.get_device_name(device)} | triton {major}.{minor}"


def tiles_file() -> Path | None:
    """The file of stored tiles (``ATTN_ZOO_TILES``), None when unset."""
    path = os.environ.get("ATTN_ZOO_TILES")
    return Path(path) if path else None


#: Stored tiles read so far, by file: {(device name, repr(key)): tile}.
_STORED: dict[Path, dict[tuple[str, str], Tile]] = {}


def _stored(path: Path) -> dict[tuple[str, str], Tile]:
    """The tiles of ``path``, read once per process (a later line wins; a line that
    does not parse, such as one cut short by a killed writer, is skipped)."""
    if path not in _STORED:
        found = {}
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            try:
                entry = json.loads(line)
                found[(entry["device"], entry["key"])] = Tile(**entry["tile"])
            except (ValueError, KeyError, TypeError):
                continue
        _STORED[path] = found
    return _STORED[path]


def stored_tile(path: Path, device: str, key: tuple) -> Tile | None:
    """The tile stored in ``path`` for ``key`` on ``device`` (:func:`device_name`)."""
    return _stored(path).get((device, repr(key)))


def store_tile(path: Path, device: str, key: tuple, tile: Tile) -> None:
    """Appends the choice to ``path``: one line, written by one ``write`` in append
    mode, so that processes storing at once do not mix their lines."""
    entry = {"device": device, "key": repr(key), "tile": dataclasses.asdict(tile)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    _stored(path)[(device, repr(key))] = tile


def _stored_or_tuned(kind: str, key: tuple, q: torch.Tensor, call: Callable) -> Tile:
    """The tile of ``key``: read from the tiles file, else autotuned (and stored there
    when there is one); kept in :data:`CHOSEN` either way."""
    path = tiles_file()
    if path is None:
        return autotune(key, call, candidates(q.shape[-1], q.dtype, kind))
    device = device_name(q.device)
    tile = stored_tile(path, device, key)
    if tile is None:
        tile = autotune(key, call, candidates(q.shape[-1], q.dtype, kind))
        store_tile(path, device, key, tile)
    CHOSEN[key] = tile
    return tile


def tuned_call(kind: str, mechanism: str, config: dict, causal: bool, q: torch.Tensor,
               call: Callable[[], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``call()`` with the autotuned tile on CUDA (a forced tile wins), else as is."""
    if q.device.type != "cuda" or _FORCED.get() is not None or not autotuning():
        return call()
    key = tune_key(mechanism, config, q, causal)
    tile = CHOSEN.get(key)  # a tuned key lists no candidates (50 us of host time a call)
    if tile is None:
        tile = _stored_or_tuned(kind, key, q, call)
    LAST[:] = [tile]
    with use_tile(tile):
        return call()


def last_tile() -> Tile | None:
    """The tile the latest autotuned call ran, None when none was autotuned."""
    return LAST[0] if LAST else None
