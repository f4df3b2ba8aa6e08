"""Small long-range tasks, generated in code and seeded, that a model trained
on a mechanism must solve: the quality half of ``bench quality``.

Each generator returns ``(inputs, targets)``: int64 [batch, N], with targets
-100 (ignored) except at the answer positions, so accuracy is measured on
answers only. Every task places its answers so that the dependency spans most
of the sequence: the longest one exceeds any local window shorter than N / 2.

* ``recall``: multi-query associative recall (Arora et al. 2023, "Zoology"):
  key-value pairs, then queries of earlier keys whose values must be recalled.
* ``passkey``: a key planted at a random depth in filler, asked for at the end.
* ``copy``: selective copying (Gu and Dao 2023, "Mamba"): data tokens scattered
  among noise, to be written out in order after a separator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Task:
    name: str
    vocab: int
    make: Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    #: what one random guess scores (the chance level of the accuracy)
    chance: float


# token layout shared by the tasks: 0 pad/noise, 1 separator/query marker, then content
NOISE, MARK, FIRST = 0, 1, 2
RECALL_KEYS, RECALL_VALUES = 16, 16
DIGITS = 10


def recall(batch: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (k, v) fill the first half; the second half asks keys at random: the
    answer (v) is due right after each asked key. Keys are distinct per sequence."""
    pairs = min(RECALL_KEYS, n // 16)
    x = torch.zeros(batch, n, dtype=torch.long)
    y = torch.full((batch, n), IGNORE, dtype=torch.long)
    keys = torch.argsort(torch.rand(batch, RECALL_KEYS, generator=g), dim=1)[:, :pairs] + FIRST
    values = torch.randint(0, RECALL_VALUES, (batch, pairs), generator=g) + FIRST + RECALL_KEYS
    x[:, 0 : 2 * pairs : 2], x[:, 1 : 2 * pairs : 2] = keys, values
    queries = pairs
    asked = torch.randint(0, pairs, (batch, queries), generator=g)
    slots = n - 2 * queries + torch.arange(queries) * 2  # the last 2 * queries positions
    rows = torch.arange(batch)[:, None]
    x[rows, slots] = keys.gather(1, asked)
    y[rows, slots] = values.gather(1, asked)  # predicted at the key: the next token
    return x, y


def passkey(batch: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Filler digits-free noise, MARK + key at a random depth in the first half, and
    MARK at the end: the key is the next token."""
    x = torch.randint(FIRST + DIGITS, FIRST + DIGITS + 16, (batch, n), generator=g)
    y = torch.full((batch, n), IGNORE, dtype=torch.long)
    depth = torch.randint(0, n // 2, (batch,), generator=g)
    key = torch.randint(0, DIGITS, (batch,), generator=g) + FIRST
    rows = torch.arange(batch)
    x[rows, depth], x[rows, depth + 1] = MARK, key
    x[:, -1] = MARK
    y[:, -1] = key
    return x, y


def copy(batch: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """M data tokens at random places among noise in the first part, then MARK and M
    blanks: position MARK + t predicts the (t + 1)-th data token."""
    m = max(2, min(8, n // 16))
    body = n - m - 1
    x = torch.zeros(batch, n, dtype=torch.long)
    y = torch.full((batch, n), IGNORE, dtype=torch.long)
    places = torch.argsort(torch.rand(batch, body, generator=g), dim=1)[:, :m].sort(dim=1).values
    data = torch.randint(0, DIGITS, (batch, m), generator=g) + FIRST
    rows = torch.arange(batch)[:, None]
    x[rows, places] = data
    x[:, body] = MARK
    y[:, body : body + m] = data
    return x, y


TASKS = {
    "recall": Task("recall", FIRST + RECALL_KEYS + RECALL_VALUES, recall, 1 / RECALL_VALUES),
    "passkey": Task("passkey", FIRST + DIGITS + 16, passkey, 1 / DIGITS),
    "copy": Task("copy", FIRST + DIGITS, copy, 1 / DIGITS),
}


def solve(task: str, x: torch.Tensor) -> torch.Tensor:
    """The exact answers of ``x``, worked out from the inputs alone (the check that
    every target is recoverable by attention over earlier tokens)."""
    batch, n = x.shape
    y = torch.full_like(x, IGNORE)
    for b in range(batch):
        row = x[b].tolist()
        if task == "recall":
            table, answering = {}, False
            for i in range(0, n - 1):
                if i % 2 == 0 and not answering and row[i] != NOISE and row[i] not in table:
                    table[row[i]] = row[i + 1]
                if row[i] == NOISE:
                    answering = True
                if answering and row[i] in table:
                    y[b, i] = table[row[i]]
        elif task == "passkey":
            y[b, n - 1] = row[row.index(MARK) + 1]
        else:
            body = row.index(MARK)
            data = [t for t in row[:body] if t != NOISE]
            y[b, body : body + len(data)] = torch.tensor(data)
    return y
