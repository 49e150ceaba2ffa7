"""Measurement: analytic FLOPs / KV accounting, timing and memory, the evaluation protocol,
plots and token visualisations.

>>> from tokensieve.bench import VLMDims, Plan, account
>>> from transformers import LlavaConfig
>>> cost = account(VLMDims.from_config(LlavaConfig()), Plan.pre_llm(64), text_tokens=40)
>>> cost.llm_tokens[0]
104
"""

from tokensieve.bench.flops import (
    Cost,
    Plan,
    StackDims,
    VLMDims,
    account,
    decode_macs,
    fastv_layer_flops,
)
from tokensieve.bench.protocol import BenchConfig, BenchResult, load_results, run_protocol
from tokensieve.bench.timing import (
    LARGE_SPREAD,
    PeakMemory,
    Spread,
    Timing,
    Variant,
    measure_generation,
    measure_interleaved,
)

__all__ = [
    "LARGE_SPREAD", "BenchConfig", "BenchResult", "Cost", "PeakMemory", "Plan", "Spread",
    "StackDims", "Timing", "VLMDims", "Variant", "account", "decode_macs", "fastv_layer_flops",
    "load_results", "measure_generation", "measure_interleaved", "run_protocol",
]
