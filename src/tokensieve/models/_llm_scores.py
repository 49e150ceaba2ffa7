"""Attention rows of one LLM decoder layer, from its own q and k (no eager attention).

The in-LLM methods rank image tokens by the attention some query rows (the last prompt
token, the text tokens) give them at a decoder layer. The layer keeps its SDPA / flash
kernel; these rows are recomputed from the layer's q/k projections, after the layer's
own q/k norms (Gemma 3) and rotary embedding (the model's ``apply_rotary_pos_emb``, so
M-RoPE cos/sin work unchanged), with grouped-query heads expanded, the layer's scaling
and logit soft-capping, and the same visibility as the layer (causal, padding, sliding
window). Cost: ``Q x T`` logits per head, for a handful of query rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary embedding as the supported decoders apply it (``rotate_half`` form) on
    ``x`` ``[B, H, S, hd]`` with ``cos`` / ``sin`` ``[B, S, hd]``; once, in place of the
    model's ``apply_rotary_pos_emb`` (which rotates q and k together)."""
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"rotary embedding of width {cos.shape[-1]} on heads of width "
                         f"{x.shape[-1]}: partial rotary embeddings are not supported by the "
                         "in-LLM stage")
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _heads(attn: torch.nn.Module, x: Tensor, norm: str) -> Tensor:
    """``[B, S, H * hd]`` projections -> ``[B, H, S, hd]`` after the layer's q/k norm."""
    b, s, _ = x.shape
    x = x.view(b, s, -1, attn.head_dim)
    if hasattr(attn, norm):
        x = getattr(attn, norm)(x)
    return x.transpose(1, 2)


def visible_keys(query_cols: Tensor, key_valid: Tensor, window: int | None,
                 causal: bool = True) -> Tensor:
    """``[B, Q, T]`` which keys a query column sees: valid keys at or before it, within the
    last ``window`` keys for sliding-window layers (``q - k < window``). ``causal=False``:
    valid keys on both sides (within ``window`` on either side for sliding-window layers)."""
    cols = torch.arange(key_valid.shape[1], device=key_valid.device)
    ahead = query_cols.unsqueeze(-1) - cols                      # [B, Q, T]: q - k
    seen = key_valid.unsqueeze(1).expand(-1, query_cols.shape[1], -1)
    if causal:
        seen = seen & (ahead >= 0)
    if window is not None:
        seen = seen & ((ahead if causal else ahead.abs()) < window)
    return seen


def rotated_keys(attn: torch.nn.Module, k_proj: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The layer's keys as attention sees them: ``[B, Hkv, T, hd]`` after its k norm and
    rotary embedding (grouped-query heads not expanded)."""
    k = _heads(attn, k_proj, "k_norm")
    b = k.shape[0]
    return _rotate(k, cos.expand(b, -1, -1), sin.expand(b, -1, -1))


def attention_rows(attn: torch.nn.Module, q_proj: Tensor, k_proj: Tensor,
                   cos: Tensor, sin: Tensor, query_cols: Tensor, visible: Tensor,
                   rotary: bool = True, heads: str = "mean") -> Tensor:
    """Head-mean (or head-max) attention probabilities of some query rows of one layer.

    Args:
        attn: the decoder layer's attention module (``head_dim``, ``scaling``, optional
            ``q_norm`` / ``k_norm`` / ``attn_logit_softcapping``).
        q_proj: ``[B, Q, Hq * hd]`` the ``q_proj`` outputs of the query rows.
        k_proj: ``[B, T, Hkv * hd]`` the ``k_proj`` outputs of all columns.
        cos, sin: ``[B or 1, T, hd]`` the layer's position embeddings for all columns.
        query_cols: ``[B, Q]`` the column of every query row (for its cos/sin).
        visible: ``[B, Q, T]`` the keys each query row sees (see :func:`visible_keys`).
        rotary: ``False``: q and k without the rotary embedding (``cos`` / ``sin`` unused).
        heads: ``"mean"`` or ``"max"`` over the query heads.

    Returns:
        ``[B, Q, T]`` float32, each row a probability distribution over the visible keys
        (the softmax of the layer's attention logits), combined over heads; rows that see
        no key are 0.
    """
    if heads not in ("mean", "max"):
        raise ValueError(f"heads={heads!r}: expected 'mean' or 'max'")
    b, nq = q_proj.shape[:2]
    q = _heads(attn, q_proj, "q_norm")
    if rotary:
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        idx = query_cols.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        q = _rotate(q, torch.gather(cos, 1, idx), torch.gather(sin, 1, idx))
        k = rotated_keys(attn, k_proj, cos, sin)
    else:
        k = _heads(attn, k_proj, "k_norm")
    # Grouped-query heads: query head h reads key head h // g; fold the g query heads of a
    # key head into its rows instead of expanding the keys.
    hq, hkv = q.shape[1], k.shape[1]
    q = q.reshape(b, hkv, (hq // hkv) * nq, q.shape[-1])
    logits = (q.float() @ k.float().transpose(-1, -2)).view(b, hq, nq, -1) * attn.scaling
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    logits = logits.masked_fill(~visible.unsqueeze(1), -torch.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.mean(dim=1) if heads == "mean" else probs.amax(dim=1)


def cached_attention_row(attn: torch.nn.Module, q_proj: Tensor, cos: Tensor, sin: Tensor,
                         keys: Tensor, visible: Tensor) -> Tensor:
    """Head-mean attention probabilities of one new token over a layer's KV cache.

    Args:
        attn: the decoder layer's attention module.
        q_proj: ``[B, 1, Hq * hd]`` the new token's ``q_proj`` output.
        cos, sin: ``[B or 1, 1, hd]`` its position embeddings.
        keys: ``[B, Hkv, S, hd]`` the cached keys (the layer's k norm and rotary already
            applied, the new token's included).
        visible: ``[B, S]`` the keys it sees.

    Returns:
        ``[B, S]`` float32 (rows that see no key are 0).
    """
    b = q_proj.shape[0]
    q = _heads(attn, q_proj, "q_norm")
    q = _rotate(q, cos.expand(b, -1, -1), sin.expand(b, -1, -1))
    hq, hkv = q.shape[1], keys.shape[1]
    q = q.reshape(b, hkv, hq // hkv, q.shape[-1])
    logits = (q.float() @ keys.float().transpose(-1, -2)).reshape(b, hq, -1) * attn.scaling
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    logits = logits.masked_fill(~visible.unsqueeze(1), -torch.inf)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)
