"""Loading the shipped tiny video VLM and answering clip questions with ``generate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .api import accuracy_by_family, generate_answers, is_correct
from .clips import VideoSample
from .video_build import VIDEO_PROMPT, TinyVideoProcessor

VIDEO_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "tiny-llava-video"


def video_checkpoint_available(path: Path = VIDEO_CHECKPOINT_DIR) -> bool:
    """Whether the shipped video checkpoint (weights and tokenizer) is present."""
    return (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def load_tiny_video_vlm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        path: str | Path | None = None):
    """Load the embedded tiny video VLM and its processor offline.

    Returns ``(model, processor)``: a ``LlavaOnevisionForConditionalGeneration`` in
    eval mode and a :class:`~tokensieve.zoo.video_build.TinyVideoProcessor`.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    path = Path(path) if path is not None else VIDEO_CHECKPOINT_DIR
    if not video_checkpoint_available(path):
        raise FileNotFoundError(
            f"no tiny video VLM checkpoint at {path}; regenerate it with "
            "scripts/train_tiny_video_vlm.py"
        )
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=dtype, local_files_only=True
    ).to(device)
    model.eval()
    return model, TinyVideoProcessor.from_pretrained(path)


def build_video_prompt(processor, question: str) -> str:
    """The prompt for one clip and ``question`` (the processor's own, else the tiny model's)."""
    make = getattr(processor, "prompt", None)
    return make(question) if callable(make) else VIDEO_PROMPT.format(question=question)


def answer_video(model, processor, samples: Sequence[VideoSample], batch_size: int = 8,
                 max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (stripped strings) to clip ``samples``, batched with left padding.

    Uses ``model.generate`` on ``processor(text=..., videos=...)``, so a model
    patched by tokensieve answers through it too.
    """
    return generate_answers(model, processor, [build_video_prompt(processor, s.question)
                                               for s in samples],
                            {"videos": [s.frames for s in samples]}, "pixel_values_videos",
                            batch_size, max_new_tokens)


__all__ = [
    "VIDEO_CHECKPOINT_DIR",
    "accuracy_by_family",
    "answer_video",
    "build_video_prompt",
    "is_correct",
    "load_tiny_video_vlm",
    "video_checkpoint_available",
]
