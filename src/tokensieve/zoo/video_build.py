"""Construction of the tiny video VLM: tokenizer, processor and a OneVision model.

The model is a stock ``transformers.LlavaOnevisionForConditionalGeneration``
whose vision tower is the shipped tiny LLaVA's CLIP tower (OneVision builds its
tower with ``AutoModel.from_config``, so a CLIP config works; ``"default"``
feature selection drops the CLS token, ``vision_feature_layer=-2``). A clip of
8 frames runs OneVision's video path: tower -> projector -> bilinear 2x2 pooling
(24x24 -> 12x12 = 144 tokens per frame) -> 8 x 144 tokens plus one
``image_newline``: 1153 video tokens, which the processor writes in place of
the ``<video>`` placeholder of ``"USER: <video>\\n{question} ASSISTANT:"``.

The processor is a small class of this module: transformers' OneVision video
processor needs torchvision, which tokensieve does not depend on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from .build import SPECIAL_TOKENS, pixel_values, word_level
from .clips import NUM_FRAMES, VIDEO_TOKENS, clip_vocabulary
from .scenes import vocabulary

VIDEO_TOKEN = "<video>"
VIDEO_PROMPT = "USER: <video>\n{question} ASSISTANT:"
MAX_POSITIONS = 2048


def build_video_tokenizer() -> PreTrainedTokenizerFast:
    """The image model's word-level tokenizer (same ids) extended with the clip words and
    ``<video>`` (appended, so the image model's embedding rows keep their ids)."""
    base = list(SPECIAL_TOKENS) + vocabulary()
    extra = [w for w in clip_vocabulary() if w not in base] + [VIDEO_TOKEN]
    tok = word_level(base + extra)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>", VIDEO_TOKEN]})
    return fast


class TinyVideoProcessor:
    """Prompts and frames -> ``input_ids``, ``attention_mask``, ``pixel_values_videos``.

    ``processor(text=[...], videos=[frames, ...], return_tensors="pt", padding=True)``
    expands each ``<video>`` to 1153 video tokens and stacks the CLIP-normalised
    frames as ``[B, T, 3, 192, 192]``; padding follows ``tokenizer.padding_side``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.video_token = VIDEO_TOKEN
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.num_video_tokens = VIDEO_TOKENS
        self.chat_template = None

    def __call__(self, text: str | Sequence[str], videos: Sequence | None = None,
                 return_tensors: str = "pt", padding: bool = True) -> dict[str, torch.Tensor]:
        """Tokenize ``text`` (placeholders expanded) and stack ``videos`` (lists of frames)."""
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        n_placeholders = sum(t.count(VIDEO_TOKEN) for t in texts)
        n_videos = 0 if videos is None else len(videos)
        if n_placeholders != n_videos:
            raise ValueError(f"{n_placeholders} {VIDEO_TOKEN} placeholders but {n_videos} videos")
        expanded = [t.replace(VIDEO_TOKEN, VIDEO_TOKEN * VIDEO_TOKENS) for t in texts]
        enc = self.tokenizer(expanded, return_tensors="pt", padding=padding)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if videos:
            out["pixel_values_videos"] = torch.stack([pixel_values(v) for v in videos])
        return out

    def prompt(self, question: str) -> str:
        """The tiny video model's prompt for ``question``."""
        return VIDEO_PROMPT.format(question=question)

    def save_pretrained(self, path: str | Path) -> None:
        """Save the tokenizer and a small ``video_processor_config.json``."""
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        cfg = {"processor_class": type(self).__name__, "num_frames": NUM_FRAMES,
               "num_video_tokens": VIDEO_TOKENS, "video_token": VIDEO_TOKEN,
               "prompt": VIDEO_PROMPT}
        (path / "video_processor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TinyVideoProcessor:
        """Load the tokenizer saved by :meth:`save_pretrained` (offline)."""
        tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        return cls(tok)


def build_video_model(image_model, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A OneVision model initialised from the tiny LLaVA ``image_model``.

    Tower, projector and LM weights are copied; the embedding and LM-head rows of
    the words the image tokenizer knows are copied by id, the new words' rows
    start from the mean old row plus small seeded noise.
    """
    icfg = image_model.config
    text = icfg.text_config.to_dict()
    text.update(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS)
    text.pop("model_type", None)
    from transformers import CLIPVisionConfig, LlamaConfig

    config = LlavaOnevisionConfig(
        vision_config=CLIPVisionConfig(**{k: v for k, v in icfg.vision_config.to_dict().items()
                                          if k != "model_type"}),
        text_config=LlamaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    src = image_model.state_dict()
    dst = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in dst.items():
            if name in src and src[name].shape == value.shape:
                value.copy_(src[name])
            elif name in src:  # the vocabulary-sized rows: embeddings and LM head
                old = src[name]
                value.copy_(old.mean(0, keepdim=True).expand_as(value)
                            + old.std() * 0.1 * torch.randn(value.shape, generator=gen))
                value[: old.shape[0]] = old
            elif name.endswith("image_newline"):
                value.copy_(0.02 * torch.randn(value.shape, generator=gen))
            else:
                raise KeyError(f"no source weight for {name}")
    g = model.generation_config
    g.pad_token_id, g.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    g.bos_token_id, g.do_sample = tokenizer.bos_token_id, False
    return model
