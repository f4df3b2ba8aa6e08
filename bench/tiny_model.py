"""A small causal transformer on :class:`attn_zoo.Attention`, trained per
mechanism on the generated tasks of :mod:`attn_zoo.bench.tasks`.

Pre-norm blocks (attention, then a 4x MLP), learned absolute positions and a
tied output layer; the attention of every block is the mechanism under test,
with its own learnable tensors (xl's u, v, W_R, adaptive span's z_h, ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

import attn_zoo
from attn_zoo.bench.tasks import IGNORE, TASKS


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 300
    batch: int = 32
    width: int = 64
    heads: int = 2
    layers: int = 2
    lr: float = 3e-3


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mechanism: str, config: dict) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.attn = attn_zoo.Attention(mechanism, num_heads=heads, head_dim=width // heads,
                                       impl="reference", **config)  # fmt: skip
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = self.attn(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, w)
        x = x + self.out(a)
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(self, vocab: int, n: int, mechanism: str, config: dict, s: TrainSettings):
        super().__init__()
        self.embed = nn.Embedding(vocab, s.width)
        self.position = nn.Parameter(torch.randn(n, s.width) * 0.02)
        self.blocks = nn.ModuleList(Block(s.width, s.heads, mechanism, config)
                                    for _ in range(s.layers))  # fmt: skip
        self.norm = nn.LayerNorm(s.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    answer = targets != IGNORE
    return float((logits.argmax(-1)[answer] == targets[answer]).float().mean())


def train(task: str, n: int, mechanism: str, config: dict, seed: int,
          s: TrainSettings = TrainSettings(), held_out: int = 4) -> dict:  # fmt: skip
    """Train a fresh model for ``s.steps`` steps on fresh batches; returns the
    held-out accuracy (``held_out`` batches of 256 sequences from another seed),
    the last training loss and the training time."""
    spec = TASKS[task]
    torch.manual_seed(seed)
    model = TinyModel(spec.vocab, n, mechanism, config, s)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s.lr, total_steps=s.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    start = time.perf_counter()
    model.train()
    for _ in range(s.steps):
        x, y = spec.make(s.batch, n, g)
        loss = loss_fn(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    other = torch.Generator().manual_seed(10_000 + seed)
    correct = []
    with torch.no_grad():
        for _ in range(held_out):
            x, y = spec.make(256, n, other)
            correct.append(accuracy(model(x), y))
    score = sum(correct) / len(correct) if correct else float("nan")
    return {"accuracy": score, "final_loss": float(loss.detach()),
            "train_seconds": seconds, "chance": spec.chance}  # fmt: skip
