#!/usr/bin/env python
"""Evaluate the embedded tiny LLaVA on the scene-QA test split.

Reports per-family accuracy for
  (a) all 576 visual tokens (through ``model.generate``: the stock LLaVA path),
  (b) the 64 tokens with the highest CLS attention at the feature layer,
  (c) 64 random tokens (seeded),
and, for reference, all tokens through the by-hand path used for (b) and (c).

CLS attention is the head-mean softmax row of the CLS query at encoder layer
L-2 (the layer whose output feeds the LM), computed from that layer's q and k
captured with a forward pre-hook, so the model keeps its SDPA attention. Pruning
is done by hand: ``inputs_embeds`` hold only the kept image-token embeddings
(raster order) between the prompt's text embeddings, with contiguous positions
and a shortened attention mask.

    python scripts/eval_tiny_vlm.py --n 2000
"""

from __future__ import annotations

import argparse
import time

import torch

from tokensieve.zoo import FAMILIES, accuracy_by_family, answer, build_prompt, load_tiny_vlm
from tokensieve.zoo.scenes import scene_qa


class ClsAttention:
    """Forward pre-hook on one CLIP attention module: head-mean CLS attention row."""

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.value: torch.Tensor | None = None
        self.handle = attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        h = kwargs.get("hidden_states", args[0] if args else None)
        b, n, d = h.shape
        heads = getattr(module, "num_heads", None) or module.config.num_attention_heads
        hd = d // heads
        q = module.q_proj(h[:, :1]).view(b, 1, heads, hd).transpose(1, 2)
        k = module.k_proj(h).view(b, n, heads, hd).transpose(1, 2)
        scores = (q.float() @ k.float().transpose(-1, -2)) * hd**-0.5  # [B, H, 1, N]
        self.value = scores.softmax(-1).mean(1)[:, 0, 1:]  # drop the CLS column -> [B, 576]

    def remove(self) -> None:
        self.handle.remove()


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected visual tokens [B, 576, D] via the model's own get_image_features."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    feats = out if torch.is_tensor(out) else out.pooler_output
    return torch.stack(list(feats)) if not torch.is_tensor(feats) else feats


@torch.no_grad()
def pruned_predictions(model, processor, samples, keep: dict[str, int | None], seed: int = 0,
                       batch_size: int = 50) -> dict[str, list[str]]:
    """Greedy first answer token for each pruning rule: name -> (selection, count)."""
    tok = processor.tokenizer
    image_id = model.config.image_token_index
    encoder = model.model.vision_tower
    encoder = getattr(encoder, "vision_model", encoder).encoder
    layer = encoder.layers[len(encoder.layers) + model.config.vision_feature_layer]
    hook = ClsAttention(layer.self_attn)
    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    preds: dict[str, list[str]] = {name: [] for name in keep}
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            enc = processor(text=[build_prompt(processor, s.question) for s in chunk],
                            images=[s.image for s in chunk], return_tensors="pt",
                            padding=True)
            pix = enc["pixel_values"].to(model.dtype)
            feats = image_features(model, pix)
            cls = hook.value
            n = feats.shape[1]
            for name, rule in keep.items():
                seqs = []
                for b, ids in enumerate(enc["input_ids"]):
                    ids = ids[enc["attention_mask"][b].bool()]  # drop padding
                    if rule is None:
                        idx = torch.arange(n)
                    elif rule[0] == "cls":
                        idx = cls[b].topk(rule[1]).indices.sort().values
                    else:
                        idx = torch.randperm(n, generator=gen)[: rule[1]].sort().values
                    pos = (ids == image_id).nonzero().flatten()
                    before, after = ids[: pos[0]], ids[pos[-1] + 1:]
                    seqs.append(torch.cat([embed(before), feats[b, idx], embed(after)]))
                width = max(s.shape[0] for s in seqs)
                x = torch.zeros(len(seqs), width, seqs[0].shape[-1], dtype=seqs[0].dtype)
                mask = torch.zeros(len(seqs), width, dtype=torch.long)
                for b, s in enumerate(seqs):  # left padding
                    x[b, width - s.shape[0]:] = s
                    mask[b, width - s.shape[0]:] = 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = model.model.language_model(inputs_embeds=x, attention_mask=mask,
                                                 position_ids=positions)
                logits = model.lm_head(out.last_hidden_state[:, -1])
                preds[name].extend(tok.batch_decode(logits.argmax(-1)[:, None]))
    finally:
        hook.remove()
    return preds


def markdown_table(results: dict[str, dict[str, float]], n: int) -> str:
    """Family x condition accuracy table (percent)."""
    cols = list(results)
    lines = [f"| family (n={n}) | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for fam in [*FAMILIES, "overall"]:
        row = [f"{100 * results[c].get(fam, float('nan')):.1f}" for c in cols]
        lines.append(f"| {fam} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="test samples (at most 2000)")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--path", default=None, help="checkpoint directory (default: shipped)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, processor = load_tiny_vlm(path=args.path)
    samples = scene_qa("test", args.n)
    results: dict[str, dict[str, float]] = {}
    t0 = time.time()
    results["full (generate)"] = accuracy_by_family(
        samples, answer(model, processor, samples, batch_size=args.batch_size))
    t_full = time.time() - t0
    rules = {"full (by hand)": None, f"cls-top-{args.keep}": ("cls", args.keep),
             f"random-{args.keep}": ("random", args.keep)}
    t1 = time.time()
    preds = pruned_predictions(model, processor, samples, rules, seed=args.seed)
    t_pruned = time.time() - t1
    for name, p in preds.items():
        results[name] = accuracy_by_family(samples, p)
    print(markdown_table(results, len(samples)))
    print(f"\nwall time: generate (full) {t_full:.1f}s; by-hand pass (3 conditions, shared "
          f"vision) {t_pruned:.1f}s; threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
