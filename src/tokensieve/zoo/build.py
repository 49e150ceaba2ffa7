"""Construction of the tiny LLaVA: tokenizer, processor, model config.

The model is a stock ``transformers.LlavaForConditionalGeneration`` (CLIP
vision tower with CLS, ``vision_feature_layer=-2``, ``"default"`` feature
selection, two-layer GELU projector, Llama language model), so it runs exactly
the code path of LLaVA-1.5; only the sizes are tiny.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .scenes import IMAGE_SIZE, NUM_PATCHES, PATCH, vocabulary

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
PROMPT = "USER: <image>\n{question} ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %} </s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny VLM."""

    vision_hidden: int = 128
    vision_layers: int = 4  # the feature layer is -2: layers 0..2 feed the LM
    vision_heads: int = 4
    vision_mlp: int = 512
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_mlp: int = 512

    def to_dict(self) -> dict:
        """Plain dict (for logs)."""
        return asdict(self)


def word_level(words: list[str]) -> Tokenizer:
    """A word-level ``tokenizers.Tokenizer`` whose ids are the positions in ``words`` (which
    hold ``<unk>`` and ``<s>``): '?' is split off, words split on whitespace, ``<s>``
    prepended."""
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\?"), "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the scene vocabulary; '?' is split off, '<image>' is special."""
    tok = word_level(list(SPECIAL_TOKENS) + vocabulary())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=1024,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def _image_processor():
    try:  # transformers >= 5 without torchvision: the PIL backend, named explicitly
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Proc
    return Proc(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """LlavaProcessor that expands ``<image>`` into 576 image tokens (CLS dropped)."""
    tokenizer = tokenizer or build_tokenizer()
    return LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A freshly initialised (seeded) tiny LlavaForConditionalGeneration."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=NUM_PATCHES,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    return model


def pixel_values(images) -> torch.Tensor:
    """Normalise 192x192 PIL images exactly as the CLIP image processor does."""
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
