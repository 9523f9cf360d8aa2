"""Layers for structured transformer compression: attention with smaller heads, and a dropped block.

:class:`HeadAttention` is multi-head self-attention ``softmax(q k^T * scaling + mask) v`` whose query/key
heads (``qk_dim``) and value heads (``v_dim``) may be smaller than the model's head size, with
grouped-query attention (``kv_heads`` key/value heads shared by ``heads // kv_heads`` query heads
each). It stands in for a BERT-style self-attention module (same call signature as Hugging Face's
``BertSelfAttention``: ``(hidden_states, attention_mask=None, ...) -> (output, None)``) and runs on
``torch.nn.functional.scaled_dot_product_attention``. Its projections are ordinary modules (dense
``nn.Linear`` or any factorized layer).

:class:`SkipBlock` replaces a whole residual block by the identity on its first input (the residual
stream passes through unchanged).

>>> import torch
>>> att = HeadAttention.empty(hidden=16, heads=4, kv_heads=2, qk_dim=2, v_dim=3, scaling=0.5)
>>> out, _ = att(torch.randn(2, 5, 16))
>>> tuple(out.shape)
(2, 5, 12)
>>> SkipBlock()(torch.ones(2, 3), "ignored").sum().item()
6.0
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from tensorfold.errors import InvalidArgumentError


class HeadAttention(nn.Module):
    """Multi-head self-attention with per-head sizes of its own (see the module docs)."""

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module, *, heads: int, kv_heads: int,
                 qk_dim: int, v_dim: int, scaling: float):
        super().__init__()
        for name, v in (("heads", heads), ("kv_heads", kv_heads), ("qk_dim", qk_dim), ("v_dim", v_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
        if heads % kv_heads:
            raise InvalidArgumentError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.query, self.key, self.value = query, key, value
        self.heads, self.kv_heads, self.qk_dim, self.v_dim = heads, kv_heads, qk_dim, v_dim
        self.scaling = float(scaling)

    @classmethod
    def empty(cls, hidden: int, heads: int, kv_heads: int, qk_dim: int, v_dim: int, scaling: float, *,
              bias: bool = True, dtype=None, device=None) -> HeadAttention:
        """Dense, uninitialised projections of the right shapes (for loading and latency probes)."""
        kw = dict(bias=bias, dtype=dtype, device=device)
        return cls(nn.Linear(hidden, heads * qk_dim, **kw), nn.Linear(hidden, kv_heads * qk_dim, **kw),
                   nn.Linear(hidden, kv_heads * v_dim, **kw), heads=heads, kv_heads=kv_heads, qk_dim=qk_dim,
                   v_dim=v_dim, scaling=scaling)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        b, t = hidden_states.shape[:2]
        q = self.query(hidden_states).view(b, t, self.heads, self.qk_dim).transpose(1, 2)
        k = self.key(hidden_states).view(b, t, self.kv_heads, self.qk_dim).transpose(1, 2)
        v = self.value(hidden_states).view(b, t, self.kv_heads, self.v_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return out.transpose(1, 2).reshape(b, t, self.heads * self.v_dim), None

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
                f"scaling={self.scaling:.4g}")


class SkipBlock(nn.Module):
    """A removed residual block: returns its first argument unchanged.

    ``tuple_output`` mimics blocks that return ``(hidden_states, ...)`` (MPNet and older transformers
    layers), whose caller reads ``outputs[0]``: a bare tensor there would be indexed by batch row.
    """

    def __init__(self, tuple_output: bool = False):
        super().__init__()
        self.tuple_output = tuple_output

    @classmethod
    def like(cls, block: nn.Module) -> SkipBlock:
        """The skip for ``block``: layers that take ``output_attentions`` return tuples (transformers' convention)."""
        try:
            params = inspect.signature(block.forward).parameters
        except (TypeError, ValueError):
            params = {}
        return cls(tuple_output="output_attentions" in params)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_output else hidden_states

    def extra_repr(self) -> str:
        return "tuple_output=True" if self.tuple_output else ""


__all__ = ["HeadAttention", "SkipBlock"]
