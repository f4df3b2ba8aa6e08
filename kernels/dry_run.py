"""What a mechanism launches on a GPU, found without one: inside :func:`dry_run`
every tile is the GPU's default (:func:`~attn_zoo.kernels.tuning.default_tile`, not
the interpreter's) and :func:`~attn_zoo.kernels.autograd.attend` records its parts
instead of launching them, returning zeros (outputs computed inside are
meaningless). Each recorded part becomes a :class:`Planned`: the compile-time flags
its launch takes, its tile, and how many of its (query block, key block) pairs are
full, how many need the element mask, and of those how many hold a pair i == j its
self bias marks: the walks of the core, which cost very differently per score
(``reports/kernels-sm90``); the same for the pairs whose keys get a gradient, which the
backward's dK/dV pass walks (all of them but stop-gradient memories).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attn_zoo.kernels import autograd, compile_check, tuning
from attn_zoo.kernels.flash import forward_tile, launch, output_rows
from attn_zoo.kernels.flash_backward import key_gradient_part, puts
from attn_zoo.kernels.tuning import Tile

#: The compile-time flags that tell the core's variants apart, and whether full blocks
#: run in contiguous runs.
FLAGS = (*compile_check.FLAGS, "RUNS")


@dataclass(frozen=True)
class Planned:
    """One launch of the forward: ``flags`` (of :data:`FLAGS`, DUP the count of earlier
    lsh rounds), ``tile``, and its scores in full and in masked (query block, key
    block) pairs, over every (batch, head)."""

    flags: tuple[tuple[str, bool | int], ...]
    tile: Tile
    full_scores: int
    masked_scores: int  # in masked blocks holding no pair i == j a self bias marks
    own_scores: int = 0  # in those that do (the third walk, with SELF)
    #: (full, masked, own) scores of the dK/dV pass; None: the same as the forward's
    key_scores: tuple[int, int, int] | None = None
    #: scores the forward's masked walk visits when it walks several blocks a step
    #: (the last step of a row may pass its list: :attr:`Tile.span`); None: masked_scores
    stepped_scores: int | None = None

    @property
    def walks(self) -> tuple[int, int, int]:
        """Scores in the (full, masked, own) walks of the dQ pass (and of the forward,
        but for :attr:`stepped_scores`)."""
        return self.full_scores, self.masked_scores, self.own_scores

    @property
    def forward_walks(self) -> tuple[int, int, int]:
        """Scores the forward visits in its (full, masked, own) walks."""
        stepped = self.masked_scores if self.stepped_scores is None else self.stepped_scores
        return self.full_scores, stepped, self.own_scores

    @property
    def key_walks(self) -> tuple[int, int, int]:
        """Scores in the (full, masked, own) walks of the dK/dV pass."""
        return self.key_scores if self.key_scores is not None else self.walks


def planned(q: torch.Tensor, parts) -> list[Planned]:
    """The :class:`Planned` launches of one :func:`attend` call on ``q``."""
    found = []
    for i, (part, put) in enumerate(zip(parts, puts(q, parts), strict=True)):
        out = torch.empty(*q.shape[:2], output_rows(q, part), q.shape[3], dtype=q.dtype)
        run = launch(q, part, out)
        flags = {f: run.flags[f] for f in FLAGS if f in run.flags}
        flags["ACCUMULATE"] = i > 0  # merged into the parts before it
        flags |= put.dq_flags | put.dkdv_flags  # where the backward puts its rows
        walks = _walks(q, part.layout, flags["SELF"])
        keyed = key_gradient_part(part, q)
        key_walks = walks if keyed is part else _walks(q, keyed.layout, flags["SELF"])
        tile = forward_tile(q, part)
        found.append(Planned(tuple(sorted(flags.items())), tile, *walks, key_scores=key_walks,
                             stepped_scores=_stepped(q, part.layout, tile)))  # fmt: skip
    return found


def _stepped(q: torch.Tensor, layout, tile: Tile) -> int | None:
    """Scores of the forward's masked walk taking ``tile.span`` blocks a step (None for
    one block a step): each row's list in steps of span blocks, the last one whole."""
    if tile.span == 1:
        return None
    per_row = q.shape[0] * q.shape[1] // layout.full.shape[0]
    steps = int(((layout.partial_count + tile.span - 1) // tile.span).sum())
    return steps * layout.block_m * tile.step * per_row


def _walks(q: torch.Tensor, layout, self_bias: bool) -> tuple[int, int, int]:
    """Scores of ``layout``'s (full, masked, own) blocks over every (batch, head)."""
    per_row = q.shape[0] * q.shape[1] // layout.full.shape[0]  # (b, h) pairs per row
    block = layout.block_m * layout.block_n * per_row
    own = int(layout.own_count.sum()) if self_bias else 0
    full, partial = int(layout.full_count.sum()), int(layout.partial_count.sum())
    return full * block, (partial - own) * block, own * block


@contextlib.contextmanager
def recorded() -> Iterator[list]:
    """Inside, no kernel launches and every tile the GPU's: the list fills with the
    (q, parts) of every :func:`~attn_zoo.kernels.autograd.attend` call, in order."""
    calls: list = []
    tiles, recording = tuning.GPU_TILES.set(True), autograd.RECORDING.set(calls)
    try:
        yield calls
    finally:
        autograd.RECORDING.reset(recording)
        tuning.GPU_TILES.reset(tiles)


@contextlib.contextmanager
def dry_run() -> Iterator[list[Planned]]:
    """Inside, no kernel launches: the list fills with the :class:`Planned` launches
    of every :func:`~attn_zoo.kernels.autograd.attend` call, in order, as they would
    run on a GPU."""
    found: list[Planned] = []
    calls: list = []
    try:
        with recorded() as calls:
            yield found
    finally:
        for q, parts in calls:
            found.extend(planned(q, parts))
