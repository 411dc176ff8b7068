"""nn.MultiheadAttention split into q/k/v/out projections, so each can carry atoms.

open_clip (and other models built on torch's fused attention) keeps q, k and v in one packed
``in_proj_weight``; a rank-1 atom needs a projection of its own. ``SplitMultiheadAttention``
is a drop-in replacement with the same call signature and the same outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitMultiheadAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("SplitMultiheadAttention: bias_k/bias_v and add_zero_attn are not supported")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        kdim, vdim = mha.kdim, mha.vdim
        has_bias = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=has_bias)
        self.k_proj = nn.Linear(kdim, self.embed_dim, bias=has_bias)
        self.v_proj = nn.Linear(vdim, self.embed_dim, bias=has_bias)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.chunk(3) if has_bias else (None, None, None)
            for proj, weight, bias in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases):
                proj.to(device=weight.device, dtype=weight.dtype)
                proj.weight.copy_(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
        self.out_proj = mha.out_proj  # already an nn.Linear

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:  # torch's default layout is [seq, batch, dim]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, _ = query.shape
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, q_len, k.shape[2], q.dtype)
        if is_causal and mask is None:
            mask = torch.full((q_len, k.shape[2]), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / self.head_dim ** 0.5
            if mask is not None:
                scores = scores + mask
            attn = F.dropout(scores.softmax(-1), dropout, self.training)
            out = attn @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, q_len, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if attn is not None and average_attn_weights:
            attn = attn.mean(1)
        return out, attn

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _additive_mask(self, attn_mask, key_padding_mask, batch, q_len, k_len, dtype):
        """Merge torch MHA's masks (bool True = blocked, or additive float) into one float mask."""
        mask = None
        if attn_mask is not None:
            mask = _as_additive(attn_mask, dtype)
            if mask.dim() == 3:  # [batch * heads, L, S]
                mask = mask.view(batch, self.num_heads, q_len, k_len)
        if key_padding_mask is not None:
            pad = _as_additive(key_padding_mask, dtype).view(batch, 1, 1, k_len)
            mask = pad if mask is None else mask + pad
        return mask


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def split_multihead_attention(model: nn.Module) -> int:
    """Replace every nn.MultiheadAttention in ``model`` by its split equivalent; returns the count."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        split = SplitMultiheadAttention(mha)
        split.train(mha.training)
        setattr(parent, child, split)
    return len(targets)
