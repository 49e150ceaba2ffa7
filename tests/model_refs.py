"""Independent references for the model-adapter tests (built without tokensieve's surgery)."""

from __future__ import annotations

import torch

import tokensieve.models as tm


def splice_left_padded(ids: torch.Tensor, mask: torch.Tensor, emb: torch.Tensor,
                       image_token: int, pieces: list[torch.Tensor],
                       run_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The hand-pruned sequence: in each row, the ``i``-th run of ``run_lengths[i]`` image
    placeholders (counted over the batch in order) becomes ``pieces[i]``, padding is
    dropped, and rows are left-padded again. Returns ``(inputs_embeds, attention_mask)``."""
    seqs, img = [], 0
    for b in range(ids.shape[0]):
        parts, t = [], 0
        while t < ids.shape[1]:
            if mask[b, t] == 0:
                t += 1
            elif ids[b, t] == image_token:
                parts.append(pieces[img])
                t, img = t + run_lengths[img], img + 1
            else:
                parts.append(emb[b, t:t + 1])
                t += 1
        seqs.append(torch.cat(parts))
    n = max(s.shape[0] for s in seqs)
    embeds = torch.zeros(len(seqs), n, emb.shape[-1])
    new_mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for b, s in enumerate(seqs):
        embeds[b, n - s.shape[0]:] = s
        new_mask[b, n - s.shape[0]:] = 1
    return embeds, new_mask


def kept_indices(model) -> list[torch.Tensor]:
    """The kept positions of each image of the last patched call."""
    return [r.indices[0] for r, _ in tm.last_reductions(model)]
