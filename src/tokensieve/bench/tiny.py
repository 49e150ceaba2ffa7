"""A randomly initialised, very small LLaVA built offline, for smoke runs and tests of the
protocol (``tokensieve bench --model random-tiny``): same classes and code path as the
embedded VLM (``LlavaForConditionalGeneration``, CLIP tower with CLS, ``vision_feature_layer
-2``, Llama decoder), the scene vocabulary, but an ``image_size / patch`` grid of 8x8 = 64
visual tokens and untrained weights (its answers are noise; its costs and timings are real).
"""

from __future__ import annotations

import torch

RANDOM_TINY = "random-tiny"


def random_tiny_llava(seed: int = 0, image_size: int = 64, patch: int = 8,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, processor)`` of a seeded random tiny LLaVA with ``(image_size/patch)^2``
    visual tokens (default 64), built without any file or network access."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tokensieve.zoo.build import (
        CHAT_TEMPLATE,
        CLIP_MEAN,
        CLIP_STD,
        IMAGE_TOKEN,
        build_tokenizer,
    )

    if image_size % patch:
        raise ValueError(f"image_size={image_size} is not a multiple of patch={patch}")
    tok = build_tokenizer()
    try:  # transformers >= 5 without torchvision: the PIL image processor
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_convert_rgb=True, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD))
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=image_size, patch_size=patch,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch) ** 2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, tok.eos_token_id
    gen.bos_token_id, gen.do_sample = tok.bos_token_id, False
    return model, processor
