"""The embedded tiny VLM: a LLaVA-format model trained on generated scene QA.

    from tokensieve.zoo import load_tiny_vlm, scene_qa, answer
    model, processor = load_tiny_vlm()
    samples = scene_qa("test", 100)
    preds = answer(model, processor, samples)
"""

from __future__ import annotations

from .api import (
    CHECKPOINT_DIR,
    accuracy_by_family,
    answer,
    build_prompt,
    checkpoint_available,
    is_correct,
    load_tiny_vlm,
)
from .scenes import FAMILIES, Sample, scene_qa

__all__ = [
    "CHECKPOINT_DIR",
    "FAMILIES",
    "Sample",
    "accuracy_by_family",
    "answer",
    "build_prompt",
    "checkpoint_available",
    "is_correct",
    "load_tiny_vlm",
    "scene_qa",
]
