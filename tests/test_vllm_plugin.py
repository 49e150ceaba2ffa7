"""tokensieve in vLLM: the plugin's answers equal ``ts.apply`` on the embedded scene QA.

Needs vLLM (skipped without it): CI runs this file with the python of
``scripts/setup_vllm_env.sh`` (vLLM's CPU build beside the CPU torch). vLLM there pins
transformers < 5.20, on which ``ts.apply`` does not run LLaVA (the adapter reads one
hidden state through ``output_hidden_states=[layer]``, newer than 5.19), so the reference
answers come from the base python of the environment (the project's own transformers).
The engines run in this process (no engine / worker subprocesses): one per setting, a few
seconds each once vLLM is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("vllm", reason="vLLM is not installed "
                    "(scripts/setup_vllm_env.sh builds an environment with it)")

from tokensieve.integrations.vllm import hf_overrides, parse  # noqa: E402
from tokensieve.integrations.vllm._common import shutdown_llm  # noqa: E402
from tokensieve.zoo import CHECKPOINT_DIR, scene_qa  # noqa: E402
from tokensieve.zoo.build import PROMPT, build_tokenizer  # noqa: E402

N = 50
KEEP = 64
METHODS = ("fastervlm", "divprune", "visionzip", "dct")
REFERENCE_SCRIPT = """
import json, sys
import tokensieve as ts
from tokensieve.zoo import answer, load_tiny_vlm, scene_qa
n, keep, methods = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
model, processor = load_tiny_vlm()
samples = scene_qa("test", n)
out = {"plain": answer(model, processor, samples)}
for m in methods:
    with ts.applied(model, m, keep=keep):
        out[m] = answer(model, processor, samples)
print(json.dumps(out))
"""


def _base_python() -> str:
    """The python this environment was made from (it has the project's transformers)."""
    return os.environ.get("TOKENSIEVE_REFERENCE_PYTHON") or getattr(
        sys, "_base_executable", sys.executable)


@pytest.fixture(scope="module")
def samples() -> list:
    return scene_qa("test", N)


@pytest.fixture(scope="module")
def reference() -> dict[str, list[str]]:
    """``tokensieve.zoo.answer`` on the first N test samples in transformers: untouched and
    under ``ts.apply(method, keep=KEEP)`` for each method."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME",)}
    proc = subprocess.run([_base_python(), "-c", REFERENCE_SCRIPT, str(N), str(KEEP),
                           ",".join(METHODS)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _llm(overrides: dict[str, Any]) -> Any:
    from vllm import LLM

    return LLM(model=str(CHECKPOINT_DIR), dtype="float32", hf_overrides=overrides,
               max_model_len=1024, enforce_eager=True, limit_mm_per_prompt={"image": 1},
               max_num_seqs=16, distributed_executor_backend="uni", seed=0)


def _answers(llm: Any, samples: list) -> tuple[list[str], list[int]]:
    from vllm import SamplingParams

    reqs = [{"prompt": PROMPT.format(question=s.question), "multi_modal_data": {"image": s.image}}
            for s in samples]
    outs = llm.generate(reqs, SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs], [len(o.prompt_token_ids) for o in outs]


@pytest.fixture(scope="module", params=("plain", *METHODS))
def served(request: pytest.FixtureRequest, samples: list) -> tuple[str, list[str], list[int]]:
    """One engine per setting (plain: the plugin's architecture without a method):
    ``(setting, answers, prompt lengths)``."""
    name = request.param
    if name == "plain":
        overrides = {"architectures": ["TokensieveLlavaForConditionalGeneration"]}
    else:
        overrides = hf_overrides(name, KEEP)
    llm = _llm(overrides)
    try:
        answers, lengths = _answers(llm, samples)
    finally:
        shutdown_llm(llm)
    return name, answers, lengths


def test_answers_equal_transformers(served: tuple[str, list[str], list[int]],
                                    reference: dict[str, list[str]], samples: list) -> None:
    name, answers, lengths = served
    same = sum(a == b for a, b in zip(answers, reference[name], strict=True))
    assert same == N, f"{name}: {same}/{N} answers equal ts.apply's"
    # each prompt holds the image's placeholders (576, or the budget) and its text tokens
    n_img = 576 if name == "plain" else KEEP
    tok = build_tokenizer()
    text = [len(tok(PROMPT.format(question=s.question))["input_ids"]) - 1 for s in samples]
    assert lengths == [t + n_img for t in text]


@pytest.mark.parametrize("setting, message", [
    ({"method": "divprun", "keep": 64}, "unknown method 'divprun'"),
    ({"method": "cdpruner", "keep": 64}, "text-conditioned"),
    ({"method": "fastv", "keep": 64}, "inside the LLM"),
    ({"method": "tome", "keep": 64}, "inside the vision tower"),
    ({"method": "divprune", "keep": 0}, "keep=0"),
    ({"method": "divprune", "keep": 1.5}, "keep=1.5"),
    ({"method": "divprune", "keep": 64, "options": {"nope": 1}}, "unknown option"),
    ({"method": "divprune", "keep": 64, "extra": 1}, "unknown setting"),
    ({"method": "visiondrop", "keep": 64}, "llm=None"),  # its in-LLM stage: not in vLLM
    ({"method": "divprune", "keep": 64, "llm": "fastv"}, "llm='fastv'"),
])
def test_bad_settings_refused_up_front(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(setting)


def test_budget_above_tokens_fails_at_start() -> None:
    """keep larger than the image's 576 tokens: a clear error when the engine starts."""
    with pytest.raises(Exception, match="keep=1000"):
        _llm(hf_overrides("divprune", 1000))
