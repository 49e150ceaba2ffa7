#!/usr/bin/env python
r"""Regenerate the embedded tiny LLaVA checkpoint (deterministic given --seed).

    python scripts/train_tiny_vlm.py                 # full run (2 CPU cores: about 85 min)
    python scripts/train_tiny_vlm.py --out /tmp/ck --stage1-steps 20 --symbolic-steps 20 \
        --align-steps 20 --finetune-steps 20

Stage 1 trains the CLIP tower with dense supervision while, in a second
process, the LM learns the questions on symbolic visual tokens; then the
projector is fitted to the tower features and projector + LM are fine-tuned
(see tokensieve.zoo.train). The checkpoint is saved in float16 with
safetensors, next to a ``training_log.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from tokensieve.zoo import CHECKPOINT_DIR
from tokensieve.zoo.train import PromptCodec, TrainConfig, quick_eval, train_tiny_vlm


def main() -> None:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"),
                            default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], int)
            ap.add_argument(flag, type=kind, default=getattr(defaults, f.name))
    ap.add_argument("--tower-file", default=None,
                    help="stage-1 result: loaded if present (skips stage 1), else saved there")
    ap.add_argument("--symbolic-file", default=None,
                    help="stage-2a result: loaded if present (skips it), else saved there")
    ap.add_argument("--val", type=int, default=700, help="val samples for the final check")
    args = ap.parse_args()
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "training_log.txt"
    lines: list[str] = []

    def log(msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {msg}", flush=True)
        lines.append(msg)

    log(f"config {json.dumps(dataclasses.asdict(cfg))} device={args.device} "
        f"threads={torch.get_num_threads()}")
    model, processor, times = train_tiny_vlm(cfg, log=log, device=args.device,
                                             tower_file=args.tower_file,
                                             symbolic_file=args.symbolic_file)
    log(f"wall times (s): {json.dumps({k: round(v, 1) for k, v in times.items()})}")
    if args.val:
        acc = quick_eval(model, PromptCodec(processor.tokenizer), "val", args.val,
                         device=args.device)
        log(f"val accuracy: {json.dumps({k: round(v, 4) for k, v in acc.items()})}")
    model.half().save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    log_path.write_text("\n".join(lines) + "\n")
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
