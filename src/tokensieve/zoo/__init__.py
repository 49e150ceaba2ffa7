"""The embedded tiny VLM: a LLaVA-format model trained on generated scene QA.

    from tokensieve.zoo import load_tiny_vlm, scene_qa, answer
    model, processor = load_tiny_vlm()
    samples = scene_qa("test", 100)
    preds = answer(model, processor, samples)

The embedded tiny video VLM (a LLaVA-OneVision on 8-frame synthetic clips):

    from tokensieve.zoo import load_tiny_video_vlm, clip_qa, answer_video
    model, processor = load_tiny_video_vlm()
    preds = answer_video(model, processor, clip_qa("test", 40))
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
from .clips import CLIP_FAMILIES, VideoSample, clip_qa
from .scenes import FAMILIES, Sample, scene_qa
from .video_api import (
    VIDEO_CHECKPOINT_DIR,
    answer_video,
    load_tiny_video_vlm,
    video_checkpoint_available,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CLIP_FAMILIES",
    "FAMILIES",
    "VIDEO_CHECKPOINT_DIR",
    "Sample",
    "VideoSample",
    "accuracy_by_family",
    "answer",
    "answer_video",
    "build_prompt",
    "checkpoint_available",
    "clip_qa",
    "is_correct",
    "load_tiny_video_vlm",
    "load_tiny_vlm",
    "scene_qa",
    "video_checkpoint_available",
]
