"""Loading the shipped tiny VLM and answering scene questions with ``generate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .build import PROMPT
from .scenes import Sample

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "tiny-llava"


def checkpoint_available(path: Path = CHECKPOINT_DIR) -> bool:
    """Whether the shipped checkpoint (weights and processor) is present."""
    return (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def load_tiny_vlm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  path: str | Path | None = None):
    """Load the embedded tiny LLaVA and its processor offline.

    Returns ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval
    mode and a ``LlavaProcessor``. ``path`` defaults to the checkpoint shipped
    inside the package.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path) if path is not None else CHECKPOINT_DIR
    if not checkpoint_available(path):
        raise FileNotFoundError(
            f"no tiny VLM checkpoint at {path}; regenerate it with scripts/train_tiny_vlm.py"
        )
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, local_files_only=True
    ).to(device)
    model.eval()
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def build_prompt(processor, question: str) -> str:
    """The processor's chat-template prompt for one image and ``question``.

    Falls back to the tiny model's format when the processor has no template.
    """
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    return PROMPT.format(question=question)


def answer(model, processor, samples: Sequence[Sample], batch_size: int = 16,
           max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (stripped strings) to ``samples``, batched with left padding.

    Uses ``model.generate``, so it works for any Hugging Face VLM whose
    processor takes ``text=`` and ``images=`` (patched by tokensieve or not).
    """
    return generate_answers(model, processor, [build_prompt(processor, s.question)
                                               for s in samples],
                            {"images": [s.image for s in samples]}, "pixel_values",
                            batch_size, max_new_tokens)


@torch.no_grad()
def generate_answers(model, processor, prompts: Sequence[str], media: dict[str, Sequence],
                     pixel_key: str, batch_size: int = 16, max_new_tokens: int = 3,
                     ) -> list[str]:
    """Greedy answers to ``prompts`` with their ``media`` (the processor's keyword, e.g.
    ``images`` or ``videos``, to one item per prompt), batched with left padding; the
    processor's ``pixel_key`` output is cast to the model's dtype."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    dtype = next(model.parameters()).dtype
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = {k: list(v[i:i + batch_size]) for k, v in media.items()}
            enc = processor(text=list(prompts[i:i + batch_size]), **chunk, return_tensors="pt",
                            padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            if pixel_key in enc:
                enc[pixel_key] = enc[pixel_key].to(dtype)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out


def is_correct(prediction: str, sample: Sample) -> bool:
    """Exact match of the first word of ``prediction`` with the sample's answer."""
    words = prediction.strip().lower().split()
    return bool(words) and words[0].strip(".,!") == sample.answer.lower()


def accuracy_by_family(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy per question family plus ``"overall"``."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    hits: dict[str, list[bool]] = {}
    for s, p in zip(samples, predictions, strict=False):
        hits.setdefault(s.family, []).append(is_correct(p, s))
    acc = {f: sum(h) / len(h) for f, h in sorted(hits.items())}
    acc["overall"] = sum(sum(h) for h in hits.values()) / max(1, len(samples))
    return acc
