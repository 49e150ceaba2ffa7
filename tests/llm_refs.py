"""A by-hand reference for in-LLM reduction, built without tokensieve's stage.

One sample (batch 1, no padding). The untouched model is run once with hooks that record
what each decoder layer receives (input hidden state of layer 0, position embeddings,
mask); then the decoder layers are run by hand: full sequence before the first cut, the
hand-cut sequence after it, with masks written out by hand (causal, Gemma 3's image
blocks, sliding windows counted in the tokens a layer sees) and position embeddings
gathered at the kept columns ("keep") or recomputed on contiguous positions
("renumber"). Scores come from an eager-attention copy of the model (its attention
weights), at the layer before the cut ("previous") or the cut layer on its input ("own").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from tokensieve.models._llm import find_text_model


@dataclass
class Recorded:
    hidden: torch.Tensor  # [1, T, D] input of layer 0
    pos_emb: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, full length
    logits: torch.Tensor


@torch.no_grad()
def record(model, kw: dict) -> Recorded:
    lm = find_text_model(model)
    seen: dict[int, dict] = {}
    hidden = {}

    def hook(i):
        def pre(module, args, kwargs):
            if i == 0:
                hidden[0] = (args[0] if args else kwargs["hidden_states"]).clone()
            seen[i] = kwargs

        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(lm.layers)]
    try:
        logits = model(**kw).logits
    finally:
        for h in handles:
            h.remove()
    return Recorded(hidden[0], [seen[i]["position_embeddings"] for i in range(len(lm.layers))],
                    logits)


def eager_copy(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def allowed(n: int, blocks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """``[n, n]`` bool: causal, or inside one image block; within ``window`` if given."""
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    ok = j <= i
    if blocks is not None:
        ok = ok | ((blocks.unsqueeze(1) == blocks.unsqueeze(0)) & (blocks.unsqueeze(1) >= 0))
    if window is not None:
        ok = ok & (i - j < window)
    return ok


@torch.no_grad()
def by_hand(model, eager, rec: Recorded, image_cols: list[torch.Tensor], cuts: list[int],
            counts: list[list[int]], scores: str, positions: str, prompt_len: int | None = None,
            blocks: torch.Tensor | None = None, fixed: list[list[torch.Tensor]] | None = None,
            query: str = "last"):
    """Logits ``[1, T, V]`` of the by-hand cut model and the kept indices per cut per image.

    Args:
        image_cols: per image, its columns in the sequence.
        cuts: cut layers; ``counts[c][i]``: tokens image ``i`` keeps from cut ``c`` on.
        scores: "previous" or "own"; positions: "keep" or "renumber".
        prompt_len: columns of the prefill (later columns are decoded tokens: never cut,
            renumbering leaves their positions alone); default all.
        blocks: ``[T]`` Gemma 3 image blocks (-1 on text) or None.
        fixed: the kept indices per cut per image to use instead of scoring (decoding).
        query: "last" (the last token's row ranks) or "image" (the mean of the image's own
            rows over its columns ranks: attention received from the image itself).
    """
    lm, elm = find_text_model(model), find_text_model(eager)
    cfg = lm.config
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * len(lm.layers))
    h = rec.hidden
    t = h.shape[1]
    prompt_len = t if prompt_len is None else prompt_len
    takes_type = any(hasattr(lm.rotary_emb, f"{k}_inv_freq") for k in types)

    def pe(layer, cols, h):
        cos, sin = rec.pos_emb[layer]
        if positions == "keep" or len(cols) == t:
            return cos[:, cols], sin[:, cols]
        n_prompt = int((cols < prompt_len).sum())
        extra = (types[layer],) if takes_type else ()
        new = lm.rotary_emb(h, torch.arange(n_prompt).unsqueeze(0), *extra)
        return (torch.cat([new[0], cos[:, cols[n_prompt:]]], dim=1),
                torch.cat([new[1], sin[:, cols[n_prompt:]]], dim=1))

    def mask_of(layer, cols):
        window = cfg.sliding_window if types[layer] == "sliding_attention" else None
        return allowed(len(cols), None if blocks is None else blocks[cols], window)

    cols = torch.arange(t)
    full = h.clone()
    kept_all, previous = [], None
    for layer in range(len(lm.layers)):
        if layer in cuts:
            c = cuts.index(layer)
            if fixed is None:
                w = previous if scores == "previous" else attention(
                    elm, layer, h, pe(layer, cols, h), mask_of(layer, cols))
                score = w[0, :, -1].mean(0)
            full[:, cols] = h
            keep = torch.ones(len(cols), dtype=torch.bool)
            kept_now = []
            for i, icol in enumerate(image_cols):
                here = torch.nonzero(torch.isin(cols, icol)).squeeze(1)
                keep[here] = False
                if fixed is None:
                    own = score[here] if query == "last" else \
                        w[0].mean(0)[here][:, here].mean(0)
                    top = torch.topk(own, counts[c][i]).indices.sort().values
                else:
                    current = torch.searchsorted(icol, cols[here])
                    top = torch.nonzero(torch.isin(current, fixed[c][i])).squeeze(1)
                keep[here[top]] = True
                kept_now.append(torch.searchsorted(icol, cols[here[top]]))
            kept_all.append(kept_now)
            h, cols = h[:, keep], cols[keep]
        ok = mask_of(layer, cols)
        emb = pe(layer, cols, h)
        previous = attention(elm, layer, h, emb, ok)
        h = lm.layers[layer](h, attention_mask=ok[None, None], position_embeddings=emb)
    full[:, cols] = h
    logits = model.lm_head(lm.norm(full))
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits, kept_all


def attention(elm, layer: int, h: torch.Tensor, pos_emb, ok: torch.Tensor) -> torch.Tensor:
    """Eager attention weights ``[1, H, T, T]`` of layer ``layer`` on input ``h``."""
    dec = elm.layers[layer]
    mask = torch.where(ok, 0.0, torch.finfo(h.dtype).min)[None, None]
    _, w = dec.self_attn(hidden_states=dec.input_layernorm(h), position_embeddings=pos_emb,
                         attention_mask=mask)
    return w
