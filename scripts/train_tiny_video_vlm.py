#!/usr/bin/env python
r"""Regenerate the embedded tiny video VLM checkpoint.

The shipped checkpoint is two runs of this script (2 CPU cores, about 89 min in all):

    python scripts/train_tiny_video_vlm.py --out /tmp/vck1 --feature-store ~/.cache/tsv
    python scripts/train_tiny_video_vlm.py --init /tmp/vck1 --steps 500 --budget-min 12 \
        --lr 5e-4 --focus order,vanished --last-frame true --two-hop true \
        --val-every 250 --feature-store ~/.cache/tsv

The first (12 min caching 3,000 clips, 60 min training: 1,907 of 2,000 steps here,
2 min scoring) learns every family; the second fine-tunes on the two hardest
(``order``, ``vanished``) with their last-frame and two-hop attention targets and
writes the checkpoint (default ``--out``). A smoke run:

    python scripts/train_tiny_video_vlm.py --out /tmp/vck --clips 64 --steps 20 --test 16

Starts from the shipped tiny LLaVA (src/tokensieve/zoo/checkpoints/tiny-llava):
builds a LlavaOnevisionForConditionalGeneration with its tower, projector and
LM (tokenizer extended with the clip words), caches the pooled frame features
of the training clips once, trains the LM and ``image_newline`` (see
tokensieve.zoo.video_train), then scores the test split with ``model.generate``
(tokensieve.zoo.video_api.answer_video). The checkpoint is saved in float16
with safetensors, next to a ``training_log.txt``. Runs are seeded; a time budget
(``--budget-min``) may stop one before its last step, so the step count depends on the
machine's speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from tokensieve.zoo import load_tiny_vlm
from tokensieve.zoo.clips import CLIP_TEST_SIZE, chance_levels, clip_qa
from tokensieve.zoo.video_api import (
    VIDEO_CHECKPOINT_DIR,
    accuracy_by_family,
    answer_video,
    load_tiny_video_vlm,
)
from tokensieve.zoo.video_build import TinyVideoProcessor, build_video_model, build_video_tokenizer
from tokensieve.zoo.video_train import (
    VideoCodec,
    VideoTrainConfig,
    build_bank,
    cache_clips,
    frame_features,
    train_video_lm,
)


def main() -> None:
    defaults = VideoTrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=VIDEO_CHECKPOINT_DIR)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in dataclasses.fields(VideoTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"),
                            default=f.default)
        else:
            ap.add_argument(flag, type=type(f.default), default=getattr(defaults, f.name))
    ap.add_argument("--test", type=int, default=CLIP_TEST_SIZE, help="test samples scored")
    ap.add_argument("--budget-min", type=float, default=60.0,
                    help="training stops (schedule unchanged) after this many minutes of it")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this video checkpoint (a second, shorter schedule) "
                         "instead of building the model from the image model")
    ap.add_argument("--feature-store", type=Path, default=None,
                    help="keep the cached clip features here across runs (default: none)")
    args = ap.parse_args()
    cfg = VideoTrainConfig(**{f.name: getattr(args, f.name)
                              for f in dataclasses.fields(VideoTrainConfig)})
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    t_start = time.time()

    def log(msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {msg}", flush=True)
        lines.append(msg)

    log(f"config {json.dumps(cfg.to_dict())} device={args.device} "
        f"threads={torch.get_num_threads()}")
    tokenizer = build_video_tokenizer()
    if args.init is not None:
        model = load_tiny_video_vlm(path=args.init)[0].float().to(args.device).eval()
        log(f"continuing from {args.init}")
    else:
        image_model, _ = load_tiny_vlm()
        model = build_video_model(image_model, tokenizer, seed=cfg.seed).to(args.device).eval()
        del image_model
    processor = TinyVideoProcessor(tokenizer)
    codec = VideoCodec(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    n_lm = sum(p.numel() for p in model.model.language_model.parameters())
    log(f"params: total {n_params / 1e6:.2f} M, LM {n_lm / 1e6:.2f} M, vocab {len(tokenizer)}")

    t0 = time.time()
    clips, feats = cache_clips(model, "train", cfg.clips, log=log, store=args.feature_store)
    bank, targets = build_bank(clips, codec, cfg.last_frame, cfg.two_hop)
    val_samples = clip_qa("val", cfg.val) if cfg.val else []
    val = None
    if val_samples:
        vfeats = frame_features(model, [s.frames for s in val_samples])
        val = (vfeats, [(i, s.question, s.answer, s.family) for i, s in enumerate(val_samples)])
    cache_s = time.time() - t0
    log(f"cached {len(clips)} clips ({feats.numel() * 2 / 2**20:.0f} MiB) in {cache_s:.0f}s")

    t0 = time.time()
    steps = train_video_lm(model, codec, cfg, clips, bank, targets, feats, log=log, val=val,
                           deadline=t0 + 60 * args.budget_min)
    train_s = time.time() - t0

    t0 = time.time()
    model.eval()
    test = clip_qa("test", args.test)
    preds = answer_video(model, processor, test, batch_size=16)
    acc = accuracy_by_family(test, preds)
    chance = chance_levels(test)
    test_s = time.time() - t0
    log(f"test accuracy (n={len(test)}, generate, full tokens): "
        f"{json.dumps({k: round(v, 4) for k, v in acc.items()})}")
    log(f"chance (most frequent answer per question template): "
        f"{json.dumps({k: round(v, 4) for k, v in chance.items()})}")
    times = {"cache_s": round(cache_s, 1), "train_s": round(train_s, 1), "steps": steps,
             "test_s": round(test_s, 1), "total_s": round(time.time() - t_start, 1)}
    log(f"wall times (s): {json.dumps(times)}")
    model.half().save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    (args.out / "training_log.txt").write_text("\n".join(lines) + "\n")
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
