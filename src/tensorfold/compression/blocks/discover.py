"""Recognising transformer blocks in a module tree: which projections pair up.

A block is a module whose children form a feed-forward pair (``up`` and optionally ``gate`` into an
elementwise function, then ``down``) and/or a multi-head attention (query/key/value projections and
the output projection). Recognition goes by the children's names and shapes, not by class, so every
model built the Hugging Face way is found: BERT/RoBERTa/MiniLM/MPNet (``intermediate.dense`` /
``output.dense``), DistilBERT (``ffn.lin1`` / ``ffn.lin2``), GPT-2 (``mlp.c_fc`` / ``mlp.c_proj``,
``Conv1D`` layers holding their weight as ``(in, out)``), Llama-style decoders (``mlp.gate_proj``,
``mlp.up_proj``, ``mlp.down_proj``; ``self_attn.{q,k,v,o}_proj`` with grouped-query attention).
A model with nothing recognised has no blocks: the planner then uses its per-matrix methods alone.

>>> import torch
>>> from torch import nn
>>> class MLP(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.intermediate, self.output = nn.Module(), nn.Module()
...         self.intermediate.dense, self.output.dense = nn.Linear(8, 32), nn.Linear(32, 8)
>>> [(b.name, b.ffn.ups, b.ffn.down) for b in find_blocks(nn.Sequential(MLP(), MLP()))]
[('0', ('0.intermediate.dense',), '0.output.dense'), ('1', ('1.intermediate.dense',), '1.output.dense')]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (up projections, in the order (gate, up) where there is a gate; down projection) relative to the block
FFN_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, MiniLM, MPNet, ELECTRA
    (("ffn.lin1",), "ffn.lin2"),  # DistilBERT
    (("mlp.c_fc",), "mlp.c_proj"),  # GPT-2 (Conv1D)
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama, Mistral, Qwen2 (gated)
    (("mlp.fc1",), "mlp.fc2"),  # Phi, CLIP text, OPT-style
    (("fc1",), "fc2"),
)

# (attention module, query, key, value, output projection) relative to the block, and the style of
# attention the module computes ("bert": plain softmax(q k^T * scale) v, which tensorfold can rebuild
# with other head sizes; others keep their own code and get per-matrix methods on q/k/v/o).
ATTENTION_PATTERNS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("attention.self", "attention.self.query", "attention.self.key", "attention.self.value",
     "attention.output.dense", "bert"),
    ("attention", "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "distilbert"),
    ("attention.attn", "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "mpnet"),
    ("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "llama"),
)


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): a Linear whose weight is stored as ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), torch.Tensor) and module.weight.ndim == 2


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias or None)`` of a Linear or a GPT-2 Conv1D, detached."""
    w = module.weight.detach()
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return (w.T if is_conv1d(module) else w), b


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D."""
    w, _ = linear_weight(module)
    return int(w.shape[1]), int(w.shape[0])


@dataclass(frozen=True)
class FFNPair:
    """The feed-forward pair of a block: ``ups`` (gate first when gated) feed ``down`` through an
    elementwise function; ``hidden`` intermediate neurons."""

    ups: tuple[str, ...]
    down: str
    hidden: int

    @property
    def layers(self) -> tuple[str, ...]:
        return (*self.ups, self.down)


@dataclass(frozen=True)
class AttentionGroup:
    """A multi-head attention: ``heads`` query heads, ``kv_heads`` key/value heads (grouped-query
    attention when fewer), ``head_dim`` each; ``style`` says whether tensorfold can rebuild it with
    smaller query/key and value heads ("bert")."""

    module: str
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    style: str
    scaling: float

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o)

    @property
    def rebuildable(self) -> bool:
        return self.style == "bert"


@dataclass(frozen=True)
class Block:
    """One transformer block (``name`` the module path) with its recognised parts."""

    name: str
    index: int
    ffn: FFNPair | None
    attention: AttentionGroup | None

    @property
    def layers(self) -> tuple[str, ...]:
        return (*(self.attention.layers if self.attention else ()), *(self.ffn.layers if self.ffn else ()))


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _ffn(name: str, module: nn.Module) -> FFNPair | None:
    for ups, down in FFN_PATTERNS:
        parts = [_get(module, p) for p in (*ups, down)]
        if not all(p is not None and is_projection(p) for p in parts):
            continue
        shapes = [projection_shape(p) for p in parts]
        d_in, hidden = shapes[0]
        if any(s != (d_in, hidden) for s in shapes[:-1]) or shapes[-1][0] != hidden or hidden <= 1:
            continue
        return FFNPair(tuple(_join(name, u) for u in ups), _join(name, down), hidden)
    return None


def _head_counts(attn: nn.Module, q_out: int, kv_out: int) -> tuple[int, int, int] | None:
    """(heads, kv_heads, head_dim) read from the attention module's attributes or its config."""
    cfg = getattr(attn, "config", None)
    heads = (getattr(attn, "num_attention_heads", None) or getattr(attn, "n_heads", None)
             or getattr(attn, "num_heads", None) or getattr(cfg, "num_attention_heads", None))
    if not isinstance(heads, int) or heads <= 0 or q_out % heads:
        return None
    head_dim = getattr(attn, "attention_head_size", None) or getattr(attn, "head_dim", None) or q_out // heads
    if not isinstance(head_dim, int) or head_dim * heads != q_out or kv_out % head_dim:
        return None
    kv_heads = kv_out // head_dim
    if heads % kv_heads:
        return None
    return heads, kv_heads, head_dim


def _attention(name: str, module: nn.Module) -> AttentionGroup | None:
    for mod_path, q, k, v, o, style in ATTENTION_PATTERNS:
        attn = _get(module, mod_path)
        parts = [_get(module, p) for p in (q, k, v, o)]
        if attn is None or not all(p is not None and is_projection(p) for p in parts):
            continue
        (d, q_out), (dk, k_out), (dv, v_out), (o_in, o_out) = (projection_shape(p) for p in parts)
        if not (d == dk == dv == o_out and k_out == v_out and o_in == q_out):
            continue
        counts = _head_counts(attn, q_out, k_out)
        if counts is None:
            continue
        heads, kv_heads, head_dim = counts
        scaling = getattr(attn, "scaling", None)
        scaling = float(scaling) if isinstance(scaling, (int, float)) else head_dim**-0.5
        if style == "bert" and (type(attn).__name__ not in ("BertSelfAttention", "RobertaSelfAttention")
                                or getattr(attn, "position_embedding_type", "absolute") != "absolute"
                                or getattr(getattr(attn, "config", None), "is_decoder", False)):
            style = "bert-like"  # relative positions, decoders, caches: keep the module's own code
        return AttentionGroup(_join(name, mod_path), _join(name, q), _join(name, k), _join(name, v),
                              _join(name, o), heads, kv_heads, head_dim, style, scaling)
    return None


def find_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of ``model`` in module order (empty when none is recognised).

    A block is the innermost module whose children hold a feed-forward pair or an attention; a
    module inside a recognised block is never a block itself.
    """
    blocks: list[Block] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        ffn, attention = _ffn(name, module), _attention(name, module)
        if ffn is None and attention is None:
            continue
        # a parent that reaches an FFN through a child block (e.g. ``mlp.c_fc`` seen from the whole
        # model) is not the block: only a module whose pattern starts at its own children counts
        blocks.append(Block(name, len(blocks), ffn, attention))
        taken.append(name)
    return blocks


__all__ = ["AttentionGroup", "Block", "FFNPair", "find_blocks", "is_conv1d", "is_projection", "linear_weight",
           "projection_shape"]
