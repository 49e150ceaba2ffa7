"""Attention signals recomputed from one layer's queries and keys (no eager attention).

The tower keeps its fast attention kernel (SDPA / flash); a hook captures the q and k
projections of the one layer a method reads, and the rows or column means of its
softmax attention are recomputed here in float32.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: Queries processed at once when averaging attention columns (bounds the memory).
QUERY_CHUNK = 256


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, N, H*Dh]`` -> ``[B, H, N, Dh]`` in float32."""
    b, n, _ = x.shape
    return x.float().reshape(b, n, num_heads, -1).transpose(1, 2)


def cls_attention(q: Tensor, k: Tensor, num_heads: int, scale: float) -> Tensor:
    """Head-mean softmax attention of query 0 (the CLS token) over all keys.

    Args:
        q, k: ``[B, N, H*Dh]`` query and key projections of one layer.

    Returns:
        ``[B, N]`` float32 (each row sums to 1; index 0 is the CLS token's self-attention).
    """
    qh, kh = _heads(q[:, :1], num_heads), _heads(k, num_heads)
    logits = (qh @ kh.transpose(-1, -2)) * scale  # [B, H, 1, N]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def attention_received(q: Tensor, k: Tensor, num_heads: int, scale: float,
                       chunk: int = QUERY_CHUNK, valid: Tensor | None = None) -> Tensor:
    """Head- and query-mean softmax attention each key receives (key-column means).

    Args:
        q, k: ``[B, N, H*Dh]`` query and key projections of one layer.
        valid: optional ``[B, N]`` bool, False on tokens the layer masks out (padding
            patches): they are neither attended to nor counted as queries.

    Returns:
        ``[B, N]`` float32 (each row sums to 1; 0 on invalid tokens).
    """
    qh, kh = _heads(q, num_heads), _heads(k, num_heads)
    b, h, n, _ = qh.shape
    total = torch.zeros(b, kh.shape[2], dtype=torch.float32, device=q.device)
    bias = None
    if valid is not None:
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=q.device).masked_fill(
            ~valid, float("-inf"))[:, None, None, :]
    for start in range(0, n, chunk):
        logits = (qh[:, :, start:start + chunk] @ kh.transpose(-1, -2)) * scale
        probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        if valid is not None:
            probs = probs * valid[:, None, start:start + chunk, None]
        total += probs.sum(dim=(1, 2))
    count = h * (n if valid is None else valid.sum(dim=1, keepdim=True).clamp(min=1))
    return total / count


def mean_keys(k: Tensor, num_heads: int) -> Tensor:
    """Head-mean keys ``[B, N, Dh]`` (float32) from a key projection ``[B, N, H*Dh]``
    (summed in float32 straight from the projection's dtype: no float32 copy of it)."""
    b, n, _ = k.shape
    return k.reshape(b, n, num_heads, -1).sum(dim=2, dtype=torch.float32) / num_heads


def received_sums(q: Tensor, k: Tensor, num_heads: int, scale: float, bounds: list[int],
                  chunk: int = QUERY_CHUNK) -> Tensor:
    """Attention each key receives, summed over heads and queries, for a packed sequence
    attended in independent segments (images, or windows of window attention).

    Args:
        q, k: ``[S, H*Dh]`` queries and keys of the packed sequence (after any rotary
            embedding the layer applies).
        bounds: segment boundaries ``[0, s_1, ..., S]``; a query attends to the keys of
            its own segment only.

    Returns:
        ``[S]`` float32 column sums (divide by ``H * n`` for the mean over the ``n``
        queries of an image).
    """
    out = torch.zeros(k.shape[0], dtype=torch.float32, device=k.device)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qh = _heads(q[None, a:b], num_heads)
        kh = _heads(k[None, a:b], num_heads)
        for start in range(0, b - a, chunk):
            probs = ((qh[:, :, start:start + chunk] @ kh.transpose(-1, -2)) * scale).softmax(-1)
            out[a:b] += probs.sum(dim=(0, 1, 2))
    return out


def capture_projections(attns: dict[int, torch.nn.Module], names: list[str],
                        ) -> tuple[dict[int, dict[str, Tensor]], list[object]]:
    """Forward hooks keeping the outputs of the projections ``names`` (e.g. "q_proj",
    "k_proj") of the attention modules ``attns`` (layer index -> module).

    Returns ``(captured, handles)``: ``captured[layer][name]`` is filled during the next
    forward; call ``h.remove()`` on every handle afterwards.
    """
    captured: dict[int, dict[str, Tensor]] = {i: {} for i in attns}
    handles = []
    for i, attn in attns.items():
        for name in names:
            def hook(_m: object, _i: object, out: Tensor, i: int = i, name: str = name) -> None:
                captured[i][name] = out.detach()
            handles.append(getattr(attn, name).register_forward_hook(this_thread(hook)))
    return captured, handles


def this_thread(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` run only in the thread that makes it: a per-call hook on a shared module
    then ignores the calls other threads make on that module meanwhile."""
    owner = threading.get_ident()

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == owner:
            return hook(*args, **kwargs)
        return None

    return guarded
