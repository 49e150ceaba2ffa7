"""Independent references for the model-adapter tests (built without tokensieve's surgery)."""

from __future__ import annotations

import inspect

import torch

import tokensieve.models as tm


def _cache_name(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache under: ``cache`` (transformers
    5.24 on, where ``past_key_values`` is deprecated) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def splice_left_padded(ids: torch.Tensor, mask: torch.Tensor, emb: torch.Tensor,
                       image_token: int, pieces: list[torch.Tensor], run_lengths: list[int],
                       columns: list[torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hand-pruned sequence: in each row, the ``i``-th run of ``run_lengths[i]`` image
    placeholders (counted over the batch in order) becomes ``pieces[i]``, padding is
    dropped, and rows are left-padded again.

    Returns ``(inputs_embeds, attention_mask, source)``: ``source[b, j]`` is the column of
    ``ids`` that position ``j`` stands for: a text token's own column; in the ``i``-th run its
    start plus ``columns[i]`` (the kept indices of the run; default ``0, 1, ...``); 0 at
    padding."""
    seqs, sources, img = [], [], 0
    for b in range(ids.shape[0]):
        parts, cols, t = [], [], 0
        while t < ids.shape[1]:
            if mask[b, t] == 0:
                t += 1
            elif ids[b, t] == image_token:
                piece = pieces[img]
                k = torch.arange(piece.shape[0]) if columns is None else columns[img]
                assert len(k) == piece.shape[0]
                parts.append(piece)
                cols += (t + k).tolist()
                t, img = t + run_lengths[img], img + 1
            else:
                parts.append(emb[b, t:t + 1])
                cols.append(t)
                t += 1
        seqs.append(torch.cat(parts))
        sources.append(cols)
    n = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), n, emb.shape[-1])
    new_mask = torch.zeros(len(seqs), n, dtype=torch.long)
    source = torch.zeros(len(seqs), n, dtype=torch.long)
    for b, (s, cols) in enumerate(zip(seqs, sources, strict=True)):
        embeds[b, n - s.shape[0]:] = s
        new_mask[b, n - s.shape[0]:] = 1
        source[b, n - s.shape[0]:] = torch.tensor(cols)
    return embeds, new_mask, source


@torch.no_grad()
def greedy(model, steps: int, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
           **prefill) -> torch.Tensor:
    """Greedy decoding of the untouched model from prompt embeddings (``prefill``: further
    inputs of the first call), with a KV cache and the positions ``generate`` uses
    (attention-mask cumsum). Returns the ``steps`` new tokens ``[B, steps]``."""
    mask = attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos,
                use_cache=True, **prefill)
    tokens = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        cache = getattr(out, "cache", None)
        cache = out.past_key_values if cache is None else cache
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                    **{_cache_name(model): cache}, use_cache=True)
    return torch.cat(tokens, dim=1)


def kept_indices(model) -> list[torch.Tensor]:
    """The kept positions of each image of the last patched call."""
    return [r.indices[0] for r, _ in tm.last_reductions(model)]
