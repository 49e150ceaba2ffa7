"""``--model tokensieve``: any model ``tokensieve.apply`` supports, reduced or untouched.

Model arguments (``--model_args key=value,...``):

- ``pretrained``: a local model folder or a hub id (``AutoModelForImageTextToText`` with
  its ``AutoProcessor``), or ``tiny`` / empty (the default) for the embedded tiny VLM,
  offline; ``random-tiny`` builds an untrained tiny LLaVA (smoke tests).
- ``method``, ``keep``: the reduction (``tokensieve.list_methods()``); no method runs the
  untouched model. ``keep`` is a count or a fraction per image, as in ``tokensieve.apply``.
- ``llm``: the in-LLM step after a pre-LLM method (a method name, ``official`` (default)
  or ``none``), ``llm_keep`` its budget; ``seed``; ``signal_layers`` (``all`` or layer
  indices joined by ``:``, e.g. ``9:feature``); any other key is a method option.
- ``device`` (default: the process's GPU when CUDA is available, else ``cpu``),
  ``dtype`` (``float32``, ``float16``, ``bfloat16``; default ``float32`` on CPU,
  ``float16`` on GPU), ``batch_size`` (also ``--batch_size``), ``max_new_tokens``
  (a default for tasks that set none: 128).

Generation tasks (``generate_until``) run batched with left padding and the processor's
chat template (one ``image`` entry per visual, then the task's text). Log-likelihood
(multiple-choice) requests, multi-round generation and video inputs are refused with a
``NotImplementedError`` naming what is supported.

Data parallel: launched by ``torchrun`` or ``accelerate launch``, each process loads the
model on its own device (``cuda:LOCAL_RANK``, or the CPU with gloo) and lmms-eval splits the
documents between the processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

import tokensieve as ts
from tokensieve.bench.protocol import load_model, parse_device, parse_dtype

#: ``pretrained`` values that mean the embedded tiny VLM.
TINY_NAMES = ("", "tiny", "embedded", "tokensieve-tiny")
#: Default ``max_new_tokens`` when a task's generation kwargs give none.
DEFAULT_MAX_NEW_TOKENS = 128

_UNSUPPORTED = ("tokensieve's lmms-eval model runs generation tasks (output_type "
                "generate_until) only")


def _none(value: Any) -> Any:
    """``None`` for the strings ``none`` / ``null`` / empty, else ``value``."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
        return None
    return value


def parse_signal_layers(value: Any) -> Any:
    """``signal_layers`` from a model argument: ``all``, an int, or ``:``-joined indices and
    ``feature`` (``9:feature``); ``None`` when unset."""
    value = _none(value)
    if value is None or value == "all":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    parts = [p.strip() for p in str(value).split(":") if p.strip()]
    out: list[int | str] = []
    for p in parts:
        if p == "feature":
            out.append(p)
        else:
            try:
                out.append(int(p))
            except ValueError:
                raise ValueError(f"signal_layers={value!r}: expected 'all' or layer indices "
                                 "and 'feature' joined by ':' (e.g. 9:feature)") from None
    if not out:
        raise ValueError(f"signal_layers={value!r}: empty")
    return tuple(out)


def prompt_for(processor: Any, context: str, n_images: int) -> str:
    """The prompt for ``context`` with ``n_images`` images: the processor's chat template
    with one ``image`` entry per image before the text (the format of
    ``tokensieve.zoo.build_prompt``); contexts that already hold the model's image token,
    and processors without a template, get the text with image tokens put in front."""
    token = getattr(processor, "image_token", None) or "<image>"
    has_tokens = token in context
    template = getattr(processor, "chat_template", None)
    if template:
        content: list[dict[str, Any]] = [] if has_tokens else [{"type": "image"}] * n_images
        content.append({"type": "text", "text": context})
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
    if has_tokens or n_images == 0:
        return context
    return "\n".join([token] * n_images + [context])


def truncate_at(text: str, until: Sequence[str]) -> str:
    """``text`` cut at the first of the stop strings ``until`` (empty ones ignored)."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


class TokenSieveLMM(lmms):
    """lmms-eval model ``tokensieve``: a Hugging Face VLM patched by ``tokensieve.apply``."""

    is_simple = True

    def __init__(self, pretrained: str | None = "tiny", method: str | None = None,
                 keep: int | float | None = None, llm: str | None = "official",
                 llm_keep: int | float | None = None, seed: int = 0,
                 signal_layers: Any = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_batch_size: int | None = None, **options: Any) -> None:
        super().__init__()
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int "
                             "('auto' is not supported)") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")
        self.default_max_new_tokens = max_new_tokens

        # lmms-eval's entry point builds an Accelerator first; on CPU it leaves accelerate's
        # state single-process but starts torch.distributed (gloo) under torchrun, so the
        # ranks come from torch.distributed when it runs
        self.accelerator = Accelerator()
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        else:
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        local_rank = int(os.environ.get("LOCAL_RANK", self.accelerator.local_process_index))
        if _none(device) is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self._world_size > 1:
            device = f"cuda:{local_rank}"
        self._device = parse_device(str(device))
        if _none(dtype) is None:
            dtype = "float16" if self._device.type == "cuda" else "float32"
        torch_dtype = parse_dtype(str(dtype))

        name = _none(pretrained)
        name = None if name is None or str(name).strip().lower() in TINY_NAMES else str(name)
        self.pretrained = name or "tiny"
        self._model, self.processor = load_model(name, self._device, torch_dtype)
        self._model.eval()
        self._tokenizer = getattr(self.processor, "tokenizer", self.processor)

        self.method = _none(method)
        self.keep = _none(keep)
        if self.method is None:
            if self.keep is not None or options:
                raise ValueError(f"keep / method options {sorted(options) or ['keep']} given "
                                 "without a method; pass method=NAME (tokensieve.list_methods())")
        else:
            llm_step: Any = _none(llm)
            if llm_step is not None and _none(llm_keep) is not None:
                llm_step = ts.ReduceConfig(str(llm_step), keep=llm_keep)
            kwargs: dict[str, Any] = dict(options)
            layers = parse_signal_layers(signal_layers)
            if layers is not None:
                kwargs["signal_layers"] = layers
            ts.apply(self._model, str(self.method), self.keep, seed=int(seed), llm=llm_step,
                     **kwargs)
        if self._rank == 0:
            what = (f"{self.method} keep={self.keep}" if self.method else "untouched")
            eval_logger.info(f"tokensieve: {self.pretrained} ({type(self._model).__name__}), "
                             f"{what}, {self._device}, {torch_dtype}, "
                             f"{self._world_size} process(es)")

    # -- lmms-eval's model interface --------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The (patched) Hugging Face model."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer."""
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        """Requests per ``generate`` call in this process."""
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self._device

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-sequence id."""
        return self._tokenizer.eos_token_id

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(
            f"{_UNSUPPORTED}; loglikelihood requests (multiple_choice / perplexity tasks) are "
            "not supported: pick the generation variant of the task")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(f"{_UNSUPPORTED}; multi-round generation is not supported")

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        out = []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(
                    f"{_UNSUPPORTED} on images; task {task!r} gave a {type(v).__name__} "
                    f"visual ({str(v)[:80]!r}): videos and audio are not supported yet")
            out.append(v if v.mode == "RGB" else v.convert("RGB"))
        return out

    @torch.no_grad()
    def _generate(self, contexts: Sequence[str], visuals: Sequence[list[Any]],
                  gen_kwargs: dict[str, Any]) -> list[str]:
        """Answers to one batch (left padding), cut at ``until``, stripped."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(gen_kwargs.pop("max_new_tokens", None) or self.default_max_new_tokens)
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        num_beams = int(gen_kwargs.pop("num_beams", 1) or 1)
        top_p = gen_kwargs.pop("top_p", None)
        extra: dict[str, Any] = {"num_beams": num_beams}
        if do_sample:
            extra["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                extra["top_p"] = float(top_p)
        prompts = [prompt_for(self.processor, c, len(v)) for c, v in zip(contexts, visuals,
                                                                       strict=True)]
        images = [im for v in visuals for im in v]
        tok = self._tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = self.processor(text=prompts, images=images or None, return_tensors="pt",
                                 padding=True)
        finally:
            tok.padding_side = old_side
        dtype = next(self._model.parameters()).dtype
        enc = {k: (v.to(self._device, dtype) if k == "pixel_values" else v.to(self._device))
               if torch.is_tensor(v) else v for k, v in enc.items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = self._model.generate(**enc, max_new_tokens=max_new, do_sample=do_sample,
                                   pad_token_id=pad, **extra)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return [truncate_at(t, until).strip() for t in texts]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Generate for each request; batched per identical generation kwargs, longest
        contexts first; answers come back in the requests' order."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            gen_kwargs = req.args[1]
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        n_batches = sum(-(-len(g) // self.batch_size) for g in groups.values())
        pbar = tqdm(total=n_batches, disable=self._rank != 0, desc="tokensieve generating")
        for idx in groups.values():
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                contexts, visuals = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    contexts.append(context)
                    visuals.append(self._visuals(doc_to_visual, doc_id, task, split))
                texts = self._generate(contexts, visuals, requests[chunk[0]].args[1])
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0],
                                                                   requests[i].args[1]), text)
                pbar.update(1)
        pbar.close()
        return [r if r is not None else "" for r in results]
