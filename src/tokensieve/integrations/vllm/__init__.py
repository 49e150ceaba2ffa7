"""tokensieve in vLLM: a ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every process it starts. It registers
``TokensieveLlavaForConditionalGeneration`` (vLLM's LLaVA-1.5, CLIP / SigLIP tower),
``TokensieveQwen2VLForConditionalGeneration`` and
``TokensieveQwen2_5_VLForConditionalGeneration``: vLLM's own models whose image embeddings
are reduced by a pre-LLM tokensieve method, with each image's placeholder count cut to the
budget before the encoder runs (Qwen's kept tokens keep their M-RoPE positions through
vLLM's ``SupportsMultiModalPruning`` interface). The method is chosen per model through
vLLM's ``hf_overrides``::

    from vllm import LLM
    from tokensieve.integrations.vllm import hf_overrides
    llm = LLM(model=path, hf_overrides=hf_overrides("divprune", 64))

    vllm serve PATH --hf-overrides '{"architectures": ["TokensieveLlavaForConditionalGeneration"],
                                    "tokensieve": {"method": "divprune", "keep": 64}}'

Without a ``tokensieve`` entry the architecture runs unreduced (vLLM's LLaVA plus the
weight-name mapping that loads checkpoints saved by transformers 5, such as the embedded
tiny LLaVA). Signals (``cls_attn``, ``attn_received``, ``keys``, ``values``) come from
hooks on the fused q/k/v projection of the needed tower layers; the tower keeps vLLM's
attention kernel. Importing this package does not import vLLM.
"""

from __future__ import annotations

from tokensieve.integrations.vllm.settings import (
    ARCH_PREFIX,
    CONFIG_KEY,
    VllmSieve,
    from_config,
    hf_overrides,
    parse,
    pre_llm_methods,
)

#: vLLM architecture name -> the plugin's class (module path, for lazy registration).
ARCHITECTURES = {
    ARCH_PREFIX + "LlavaForConditionalGeneration":
        "tokensieve.integrations.vllm.llava:TokensieveLlavaForConditionalGeneration",
    ARCH_PREFIX + "Qwen2VLForConditionalGeneration":
        "tokensieve.integrations.vllm.qwen_vl:TokensieveQwen2VLForConditionalGeneration",
    ARCH_PREFIX + "Qwen2_5_VLForConditionalGeneration":
        "tokensieve.integrations.vllm.qwen_vl:TokensieveQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """Register the plugin's architectures with vLLM (the entry point; idempotent)."""
    from vllm import ModelRegistry

    from tokensieve.integrations.vllm._common import patch_cpu_runner

    patch_cpu_runner()
    known = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in known:
            ModelRegistry.register_model(arch, target)


__all__ = ["ARCHITECTURES", "CONFIG_KEY", "VllmSieve", "from_config", "hf_overrides", "parse",
           "pre_llm_methods", "register"]
