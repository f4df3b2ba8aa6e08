"""The sweep: one :class:`Case` per mechanism x implementation x shape x dtype x mode."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

#: The columns that identify a case; ``--resume`` skips cases already in results.csv.
KEY_COLUMNS = (
    "mechanism", "impl", "device", "dtype", "batch", "heads", "head_dim",
    "seq_len", "causal", "mode",
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    mechanism: str
    impl: str
    device: str
    dtype: str
    batch: int
    heads: int
    head_dim: int
    seq_len: int
    causal: bool
    mode: str

    def key(self) -> tuple[str, ...]:
        return tuple(str(v) for v in asdict(self).values())

    def label(self) -> str:
        return (
            f"{self.mechanism}/{self.impl} N={self.seq_len} {self.dtype} "
            f"{'causal' if self.causal else 'bidir'} {self.mode}"
        )


def expand(
    mechanisms_impls: list[tuple[str, list[str]]],
    *,
    device: str,
    dtypes: list[str],
    batches: list[int],
    heads: list[int],
    head_dims: list[int],
    seq_lens: list[int],
    causal: bool,
    modes: list[str],
) -> list[Case]:
    """Cases ordered so that each sequence length finishes for every
    mechanism before the next, longer one starts (a cut-short sweep still
    compares mechanisms)."""
    cases = []
    for n, dtype, mode, b, h, d in itertools.product(
        seq_lens, dtypes, modes, batches, heads, head_dims
    ):
        for mechanism, impls in mechanisms_impls:
            for impl in impls:
                cases.append(Case(mechanism, impl, device, dtype, b, h, d, n, causal, mode))
    return cases
