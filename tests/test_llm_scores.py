"""The attention rows of the in-LLM stage against plain re-statements: which keys a query
row sees (causal or not, sliding windows, padding) and the head reduction / rotary switch
of :func:`attention_rows` against an eager softmax over the same q / k."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokensieve.models._llm_scores import attention_rows, visible_keys


@pytest.mark.parametrize("causal,window", itertools.product([True, False], [None, 1, 3]))
def test_visible_keys_match_a_loop(causal, window):
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(2, 9, generator=g) > 0.2
    cols = torch.tensor([[0, 4, 8], [2, 3, 7]])
    got = visible_keys(cols, valid, window, causal=causal)
    for b, i, k in itertools.product(range(2), range(3), range(9)):
        q = int(cols[b, i])
        want = bool(valid[b, k]) and (k <= q or not causal) and (
            window is None or (q - k if causal else abs(q - k)) < window)
        assert bool(got[b, i, k]) == want


class _Attn(torch.nn.Module):
    head_dim = 4
    scaling = 0.5


def _rotate_half(x):
    return torch.cat((-x[..., 2:], x[..., :2]), dim=-1)


@pytest.mark.parametrize("rotary,heads", itertools.product([True, False], ["mean", "max"]))
def test_attention_rows_match_an_eager_softmax(rotary, heads):
    """Grouped-query heads (4 query heads on 2 key heads), every key visible."""
    g = torch.Generator().manual_seed(1)
    b, t, hq, hkv, hd = 2, 6, 4, 2, 4
    q_all = torch.randn(b, t, hq * hd, generator=g)
    k = torch.randn(b, t, hkv * hd, generator=g)
    cos, sin = torch.rand(1, t, hd, generator=g), torch.rand(1, t, hd, generator=g)
    cols = torch.tensor([[1, 5], [0, 3]])
    q = torch.gather(q_all, 1, cols.unsqueeze(-1).expand(-1, -1, hq * hd))
    visible = visible_keys(cols, torch.ones(b, t, dtype=torch.bool), None, causal=False)
    got = attention_rows(_Attn(), q, k, cos, sin, cols, visible, rotary=rotary, heads=heads)
    qh = q_all.view(b, t, hq, hd).transpose(1, 2)
    kh = k.view(b, t, hkv, hd).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    if rotary:
        qh = qh * cos.unsqueeze(1) + _rotate_half(qh) * sin.unsqueeze(1)
        kh = kh * cos.unsqueeze(1) + _rotate_half(kh) * sin.unsqueeze(1)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) * 0.5, dim=-1)          # [B, H, T, T]
    probs = torch.stack([probs[i, :, cols[i]] for i in range(b)])         # [B, H, Q, T]
    want = probs.mean(dim=1) if heads == "mean" else probs.amax(dim=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        attention_rows(_Attn(), q, k, cos, sin, cols, visible, heads="sum")
