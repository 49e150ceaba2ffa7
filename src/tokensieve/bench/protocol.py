"""The evaluation protocol: methods x budgets on one model and one task, measured the same way.

For every (method, keep) cell, and once for the unreduced model (``method="full"``):

1. patch the model (``tokensieve.models.apply``), answer every sample greedily
   (``tokensieve.zoo.answer``) and score exact matches per question family;
2. record the method's ``reduce`` calls of one prefill of the timed batch
   (:mod:`tokensieve.bench.selection`);
3. account prefill/decode compute and KV-cache bytes analytically from the model config
   (:mod:`tokensieve.bench.flops`, multiply-adds counted once);
4. unpatch (``remove``).

Then every successful cell is timed in alternation with the others (round ``r`` patches,
times and unpatches each cell once; see :func:`tokensieve.bench.timing.measure_interleaved`):
``generate`` on a fixed batch (prefill, per-token decode, tokens/s) and the replayed
selection work, medians over repeats with their spread (IQR, min, max), then peak memory.

Retention is a cell's accuracy divided by the full model's, per family and overall. The
results (``results.json``, ``results.csv``) carry the environment (versions, device, dtype,
seed, sample count, threads) and each row's exact method config (``ReduceConfig``); the
Pareto plot (``pareto.png``) shows accuracy against prefill FLOPs and measured latency.

Everything that can be checked before the long work is checked first: methods, budgets
(against the model's visual-token count), the adapter's support for each method on this
model, the device, the dtype and that the output folder is writable.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokensieve.bench.flops import Cost, Plan, VLMDims, account, plan_for
from tokensieve.bench.selection import capture_reduce_calls, replay
from tokensieve.bench.timing import (
    LATENCIES,
    SPREAD_KEYS,
    Variant,
    cpu_threads,
    measure_interleaved,
)
from tokensieve.bench.tiny import RANDOM_TINY, random_tiny_llava
from tokensieve.core.api import ReduceConfig
from tokensieve.core.budget import resolve_keep
from tokensieve.core.registry import get_method, list_methods
from tokensieve.core.schedule import LlmSchedule
from tokensieve.models._llm import LlmStage

#: Default budgets, as counts out of LLaVA-1.5's 576 (scaled to other models' token counts).
REFERENCE_TOKENS = 576
REFERENCE_KEEPS = (192, 128, 64)
#: Methods tried by default, in this order (those registered and supported by the adapter).
#: One of each family: a random baseline, pooling (merge), [CLS] attention, attention plus
#: merging, diversity, text-conditioned diversity; then the rest.
DEFAULT_METHODS = ("random", "pool", "fastervlm", "visionzip", "divprune", "cdpruner",
                   "uniform", "vtc-cls", "mmtok", "hiprune", "dart", "fastv")
#: Default methods at most (a default ``tokensieve bench``: about 16 CPU-minutes).
DEFAULT_MAX_METHODS = 6
DEFAULT_LIMIT = 280  # 40 per question family
#: Timed rounds by default (every cell once per round, in alternation): enough for quartiles.
DEFAULT_REPEATS = 9
FULL = "full"
#: ``methods=("all",)``: every registered method the model can run at every budget.
ALL = "all"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16}
#: Option names a method may use for the layer where it acts (encoder or LLM).
LAYER_OPTIONS = ("layer", "prune_layer", "k_layer", "start_layer")
#: Benchmark tasks: scene QA on images (the embedded tiny LLaVA) or clip QA on 8-frame
#: videos (the embedded tiny LLaVA-OneVision, :mod:`tokensieve.zoo.clips`).
TASKS = ("image", "video")
#: Default video budgets: fractions of a clip's frame tokens (8 x 144 = 1152).
VIDEO_KEEP_FRACTIONS = (0.5, 0.25, 0.125)
#: Default video methods at most (those whose ``describe(m).signals`` include ``frames``).
DEFAULT_MAX_VIDEO_METHODS = 4


@dataclass
class BenchConfig:
    """What to run (plain data; written into the results).

    Attributes:
        model: a local path or hub id of a supported VLM; ``None`` for the embedded tiny VLM.
        methods: method names; ``None`` for the default list (see ``DEFAULT_METHODS``).
        methods: method names, or ``("all",)`` for every registered method the model can
            run at every budget (asked of :func:`supported`).
        keeps: visual-token budgets: int counts, or float fractions in (0, 1] of each
            image's tokens (``0.25``: a quarter, rounded as ``tokensieve.reduce`` does);
            ``None`` for 192/128/64 of 576 scaled to the model. The full model is always
            run as the reference.
        signal_layers: encoder layers whose attention signals pre-LLM methods read, passed
            to ``tokensieve.apply`` (``"all"`` or a tuple of indices / ``"feature"``;
            ``None``: each method's official layers). In-LLM methods read their own
            decoder layers and do not take it.
        limit: samples of the task's test split.
        device, dtype: where and in which precision the model runs.
        seed: seed of the methods' randomness.
        batch_size: samples per ``generate`` call when answering.
        answer_tokens: greedy tokens per answer (``None``: 1 for the embedded model, whose
            answers are single word-level tokens, else 4: enough for the first word, which is
            what is scored).
        timing_batch: samples in the timed batch; ``timing_repeats`` / ``timing_warmup``
            timed and untimed rounds (every cell once per round, in alternation);
            ``timing_new_tokens`` tokens for the decode timing.
        out: output folder.
        task: ``"image"`` (scene QA, the default) or ``"video"`` (clip QA on the embedded
            tiny video VLM; budgets count a clip's 1152 frame tokens, default
            0.5 / 0.25 / 0.125 of them; default methods: the video methods, those whose
            signals include ``frames``).
    """

    model: str | None = None
    methods: tuple[str, ...] | None = None
    keeps: tuple[int | float, ...] | None = None
    signal_layers: str | tuple[int | str, ...] | None = None
    limit: int = DEFAULT_LIMIT
    split: str = "test"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 16
    answer_tokens: int | None = None
    timing_batch: int = 1
    timing_repeats: int = DEFAULT_REPEATS
    timing_warmup: int = 1
    timing_new_tokens: int = 8
    out: str = "bench-results"
    task: str = "image"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (tuples as lists)."""
        d = asdict(self)
        d["methods"] = list(self.methods) if self.methods is not None else None
        d["keeps"] = list(self.keeps) if self.keeps is not None else None
        if isinstance(self.signal_layers, tuple):
            d["signal_layers"] = list(self.signal_layers)
        return d


@dataclass
class Row:
    """One cell of the grid (or the full reference)."""

    method: str
    keep: int
    stage: str
    config: dict[str, Any]
    accuracy: dict[str, float]
    retention: dict[str, float]
    cost: dict[str, Any]
    timing: dict[str, Any]
    eval_seconds: float
    plan: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult:
    """Everything a run produced."""

    environment: dict[str, Any]
    config: dict[str, Any]
    model: dict[str, Any]
    rows: list[Row]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"environment": self.environment, "config": self.config, "model": self.model,
                "rows": [r.to_dict() for r in self.rows]}


Progress = Callable[[str], None]


# -- validation ---------------------------------------------------------------------------
def parse_dtype(name: str) -> torch.dtype:
    """``"float32" | "bf16" | ...`` -> torch dtype (ValueError naming the choices)."""
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def parse_device(name: str) -> torch.device:
    """A torch device that exists here (ValueError otherwise)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"device={name!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return device


def check_output_dir(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` if needed and make sure files can be written there."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".tokensieve-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output folder {str(path)!r} is not writable: "
                         f"{err.strerror or err}") from None
    return path


def default_keeps(n_tokens: int) -> tuple[int, ...]:
    """192 / 128 / 64 of 576, scaled to a model with ``n_tokens`` visual tokens."""
    return tuple(max(1, round(k * n_tokens / REFERENCE_TOKENS)) for k in REFERENCE_KEEPS)


def check_keep_values(keeps: Sequence[int | float]) -> tuple[int | float, ...]:
    """Budgets checked without the model: int counts >= 1 or float fractions in (0, 1]
    (ValueError naming the offending one)."""
    out: list[int | float] = []
    for k in keeps:
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"keep={k!r}: expected an int count of visual tokens or a "
                             "fraction in (0, 1]")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"keep={k}: expected a count >= 1 or a fraction in (0, 1]")
        if isinstance(k, float) and not (math.isfinite(k) and 0.0 < k <= 1.0):
            raise ValueError(f"keep={k}: expected a fraction in (0, 1] or an int count")
        out.append(k)
    return tuple(out)


def check_keeps(keeps: Sequence[int | float], n_tokens: int) -> tuple[int, ...]:
    """Budgets as counts in ``[1, n_tokens]``: fractions become counts of ``n_tokens`` as
    ``tokensieve.reduce`` rounds them (ValueError naming the offending one)."""
    out = []
    for k in check_keep_values(keeps):
        if isinstance(k, int) and k > n_tokens:
            raise ValueError(f"keep={k}: expected a count in [1, {n_tokens}] (the model gives "
                             f"the LLM {n_tokens} visual tokens per image)")
        try:
            out.append(resolve_keep(k, n_tokens))
        except ValueError as err:
            raise ValueError(f"{err} (the model gives the LLM {n_tokens} visual tokens per "
                             "image)") from None
    return tuple(dict.fromkeys(out))


def _in_encoder_patch(name: str) -> bool:
    """Whether ``tokensieve.apply`` has an in-encoder patch for ``name`` (its schedule is
    registered in ``tokensieve.core.encoder_schedule``)."""
    try:
        from tokensieve.core.encoder_schedule import encoder_schedule_class
    except ImportError:  # pragma: no cover - older cores without the encoder stage
        return False
    return encoder_schedule_class(name) is not None


def _encoder_keep(name: str) -> bool:
    """Whether ``name``'s in-encoder schedule maps ``keep`` to its options
    (``EncoderSchedule.for_keep``: ToMe's ``r`` per layer, EViT's keep rate)."""
    from tokensieve.core.encoder_schedule import EncoderSchedule, encoder_schedule_class

    cls = encoder_schedule_class(name)
    return cls is not None and cls.for_keep.__func__ is not EncoderSchedule.for_keep.__func__


def method_runs(name: str) -> dict[str, bool]:
    """Where a registered method runs: ``apply`` (tokensieve.apply patches it: pre-LLM
    methods, in-LLM ones with a layer schedule, encoder ones with an in-encoder schedule),
    ``bench`` (the protocol's grid of budgets: pre-LLM and in-LLM methods, and in-encoder
    ones whose schedule maps ``keep`` to its options: ToMe, EViT; video methods with
    ``--task video``) and ``viz`` (a pre-LLM or in-encoder reduction's picture of one image,
    or an in-LLM one's panel per cut; not the video methods, which need clips, nor the
    decoding-time ones, which cut nothing at the prefill)."""
    spec = get_method(name)
    in_llm = spec.stage == "llm" and isinstance(spec.config, type) and issubclass(
        spec.config, LlmSchedule)
    by_keep = spec.stage == "pre-llm" or in_llm
    in_encoder = spec.stage == "encoder" and _in_encoder_patch(spec.name)
    encoder_keep = in_encoder and _encoder_keep(spec.name)
    video = "frames" in spec.signals
    decoding = bool(getattr(spec.config, "decode", False))  # no prefill picture to draw
    return {"apply": by_keep or in_encoder, "bench": by_keep or encoder_keep,
            "viz": (by_keep or encoder_keep) and not video and not decoding}


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Registered method names that ``tokensieve.apply`` can patch, or ``(ALL,)`` when
    ``"all"`` is among them (ValueError with close matches for unknown names, and naming
    the stage of methods the protocol cannot run)."""
    names = []
    for m in methods:
        if m.lower() == FULL:
            continue
        if m.lower() == ALL:
            names.append(ALL)
            continue
        spec = get_method(m)
        if not method_runs(spec.name)["bench"]:
            raise ValueError(f"method {spec.name!r} acts at stage {spec.stage!r}, which the "
                             "benchmark's budget grid does not run (no in-model patch, or one "
                             "set by the method's own options instead of keep); bench runs "
                             "pre-LLM and in-LLM methods (`tokensieve list`, column bench)")
        names.append(spec.name)
    if not names and not methods:
        raise ValueError("methods=[]: expected at least one method name")
    if ALL in names:
        return (ALL,)
    return tuple(dict.fromkeys(names))


def check_signal_layers(value: Any) -> str | tuple[int | str, ...] | None:
    """``signal_layers`` checked without the model: ``None``, ``"all"`` or a non-empty
    tuple of int layer indices and ``"feature"`` (ValueError otherwise)."""
    if value is None or value == "all":
        return value
    if isinstance(value, (tuple, list)) and value and all(
            v == "feature" or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
        return tuple(value)
    raise ValueError(f"signal_layers={value!r}: expected 'all' or encoder layer indices "
                     "and 'feature', e.g. (9, 'feature')")


def _check_signal_depth(model: torch.nn.Module, layers: Any) -> None:
    """Layer indices of ``signal_layers`` within the vision tower's depth (when known)."""
    if not isinstance(layers, tuple):
        return
    vision = getattr(model.config, "vision_config", None)
    depth = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", None)
    if not isinstance(depth, int):
        return
    for w in layers:
        if isinstance(w, int) and not -depth <= w < depth:
            raise ValueError(f"signal_layers: layer {w} is not an encoder layer of this "
                             f"{depth}-layer tower; expected indices in [-{depth}, {depth}) "
                             "or 'feature'")


def apply_options(method: str, signal_layers: Any) -> dict[str, Any]:
    """Keyword arguments for ``tokensieve.apply`` beyond the budget: ``signal_layers`` for
    pre-LLM methods (in-LLM methods read their own decoder layers and refuse it)."""
    if signal_layers is None or get_method(method).stage != "pre-llm":
        return {}
    return {"signal_layers": signal_layers}


def _adapter():
    try:
        from tokensieve import models
    except ImportError as err:  # pragma: no cover - the adapters are part of the package
        raise ValueError(f"the model adapters are not available: {err}") from None
    return models


def supported(model: torch.nn.Module, method: str, keep: int,
              **options: Any) -> str | None:
    """``None`` if the adapter can patch ``model`` with ``method`` at ``keep`` (and
    ``options`` for ``apply``, e.g. ``signal_layers``), else why not."""
    models = _adapter()
    try:
        models.apply(model, method, keep, **options)
    except (ValueError, NotImplementedError, TypeError) as err:
        return str(err)
    models.remove(model)
    return None


def all_methods(model: torch.nn.Module, keeps: Sequence[int], n_tokens: int,
                signal_layers: Any = None) -> tuple[str, ...]:
    """Every registered method that :func:`supported` accepts on ``model`` at every budget
    below ``n_tokens`` (``--methods all``), in registry order."""
    out = []
    for m in list_methods():
        if not method_runs(m)["bench"]:
            continue
        opts = apply_options(m, signal_layers)
        if all(supported(model, m, k, **opts) is None for k in keeps if k < n_tokens):
            out.append(m)
    return tuple(out)


def default_methods(model: torch.nn.Module, keep: int,
                    max_methods: int = DEFAULT_MAX_METHODS) -> tuple[str, ...]:
    """The first ``max_methods`` of ``DEFAULT_METHODS`` that are registered and supported."""
    registered = set(list_methods())
    out = []
    for m in DEFAULT_METHODS:
        if m in registered and supported(model, m, keep) is None:
            out.append(m)
        if len(out) == max_methods:
            break
    return tuple(out)


# -- loading ------------------------------------------------------------------------------
#: Seconds a connection attempt to the hub may take before the hub counts as unreachable.
HUB_TIMEOUT_S = 3.0


def _hub_cached(name: str) -> bool:
    """Whether the HF cache holds the config of hub id ``name``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (ValueError, OSError):
        return False


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """``None`` if the Hugging Face hub can be reached, else why not (``HF_HUB_OFFLINE`` set,
    or a TCP connection to the endpoint failing within ``timeout`` seconds)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"no connection to {host}:{port} ({err.strerror or err})"
    return None


def check_model_name(name: str | None) -> None:
    """Check ``--model`` before anything is loaded: the embedded model, ``random-tiny``, an
    existing local folder, or a hub id that is in the HF cache or reachable now (ValueError
    naming the id otherwise)."""
    if name is None or name == RANDOM_TINY or Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"model={name!r}: no such folder (expected a local model folder or "
                         "a hub id like 'llava-hf/llava-1.5-7b-hf')")
    if _hub_cached(name):
        return
    why = hub_reachable()
    if why is not None:
        raise ValueError(f"model={name!r}: not a local folder and not in the Hugging Face "
                         f"cache, and the hub cannot be reached ({why}); download it where "
                         "there is a network and pass its folder, or --model random-tiny")


def load_model(name: str | None, device: torch.device, dtype: torch.dtype):
    """``(model, processor)``: the embedded tiny VLM (``name=None``) or a HF model by path or
    hub id (loaded with ``AutoModelForImageTextToText`` / ``AutoProcessor``)."""
    if name is None:
        from tokensieve.zoo import checkpoint_available, load_tiny_vlm

        if not checkpoint_available():
            raise ValueError("the embedded tiny VLM checkpoint is not installed (expected under "
                             "tokensieve/zoo/checkpoints); pass --model PATH, or --model "
                             f"{RANDOM_TINY} for an untrained smoke-test model")
        return load_tiny_vlm(dtype=dtype, device=device)
    if name == RANDOM_TINY:
        return random_tiny_llava(dtype=dtype, device=device)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    local = Path(name).exists()
    check_model_name(name)
    try:
        AutoConfig.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as err:
        where = "local folder" if local else "hub id (needs the network or the HF cache)"
        raise ValueError(f"model={name!r}: cannot read a model config from this {where}: "
                         f"{str(err).splitlines()[0]}") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype,
                                                            local_files_only=local).to(device)
        processor = AutoProcessor.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model={name!r}: cannot load it as an image-text-to-text model with "
                         f"its processor: {str(err).splitlines()[0]}") from None
    model.eval()
    return model, processor


def model_dims(model: torch.nn.Module, processor: Any = None, image: Any = None) -> VLMDims:
    """Accounting dimensions from the model's config (ValueError if it has no images).

    Models whose visual-token count depends on the image size (Qwen2-VL) are sized for
    ``image`` as ``processor`` prepares it (the benchmark's images all have one size)."""
    dims = VLMDims.from_config(model.config)
    if dims.patch_volume and dims.vision is not None:
        if processor is None or image is None:
            raise ValueError(f"{type(model).__name__}: the visual-token count depends on the "
                             "image; pass the processor and an image")
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
        dims = dims.for_grid(*(int(x) for x in grid[0]))
    elif processor is not None and image is not None and dims.vision is not None:
        dims = _measured_tokens(model, processor, image, dims)
    if dims.image_tokens <= 0:
        raise ValueError(f"model {type(model).__name__} has no vision tower in its config; "
                         "expected a vision-language model")
    return dims


def _measured_tokens(model: torch.nn.Module, processor: Any, image: Any,
                     dims: VLMDims) -> VLMDims:
    """Visual tokens per image as the processor lays them out (anyres crops, pooling, pixel
    shuffle): the LLM cost is then exact; the tower and projector are estimates unless the
    count is the LLaVA-1.5 one the config implies."""
    from dataclasses import replace

    from tokensieve.zoo import build_prompt

    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None)
    if image_id is None:
        image_id = getattr(cfg, "image_token_index", None)
    if image_id is None:
        return dims
    enc = processor(text=[build_prompt(processor, "what color is the circle ?")],
                    images=[image], return_tensors="pt")
    n = int((enc["input_ids"] == image_id).sum())
    pixels = enc.get("pixel_values")
    crops = 1
    if torch.is_tensor(pixels):
        crops = int(pixels.shape[1]) if pixels.dim() == 5 else int(pixels.shape[0])
    if n == dims.image_tokens and crops == 1:
        return dims
    return replace(dims, image_tokens=n, crops=max(crops, 1),
                   approximate=f"{type(model).__name__}: LLM terms exact ({n} visual tokens "
                               f"from the processor); vision tower ({crops} pass(es)) and "
                               "projector estimated")


# -- the protocol -------------------------------------------------------------------------
def _layer_option(method: str, options: dict[str, Any]) -> int | None:
    spec = get_method(method)
    merged = {**spec.defaults(), **options}
    for name in LAYER_OPTIONS:
        if isinstance(merged.get(name), int):
            return int(merged[name])
    return None


def _plan(method: str, keep: int, n_tokens: int, options: dict[str, Any],
          llm_layers: int | None = None,
          tower: Sequence[tuple[int, int]] | None = None,
          then: tuple[LlmSchedule, int | float | None] | None = None) -> Plan:
    """The accounting plan of a cell; ``tower``: an in-encoder method's tokens per tower
    layer (attention, MLP), read from the patched model's stage; ``then``: the schedule
    and budget of the in-LLM stage a pre-LLM method runs after it (HoliTom, PruneVid,
    ToDRE, VisionDrop), counted on the ``keep`` tokens entering the LLM (its counts as
    caps)."""
    if method == FULL or keep >= n_tokens:
        return Plan.full()
    spec = get_method(method)
    if tower:
        return Plan.in_encoder_layers(tower, keep)
    if then is not None and llm_layers is not None and spec.stage == "pre-llm":
        sched, llm_keep = then
        tokens = sched.image_tokens(keep, sched.counts(keep, llm_keep, llm_layers))
        steps = dict(zip(sched.cut_layers(llm_layers), tokens, strict=True))
        return Plan.llm_schedule([(0, keep), *sorted(steps.items())],
                                 before_projector=spec.features == "vision")
    if llm_layers is not None and isinstance(spec.config, type) and issubclass(
            spec.config, LlmSchedule):
        # the method's own schedule: its cut layers and the tokens kept from each on
        sched = spec.make_config(options)
        tokens = sched.image_tokens(n_tokens, sched.counts(n_tokens, keep, llm_layers))
        steps = dict(zip(sched.cut_layers(llm_layers), tokens, strict=True))  # last wins
        return Plan.llm_schedule(sorted(steps.items()))
    layer = _layer_option(method, options)
    if spec.stage == "encoder" and layer is None:
        # progressive in-encoder schedules (ToMe: r per layer) are not known here: count the
        # tower at full size (an upper bound) and the projector and LLM at ``keep``
        return Plan.pre_llm(keep, before_projector=True)
    return plan_for(spec.stage, keep, layer, before_projector=spec.features == "vision")


def _is_video(samples: Sequence[Any]) -> bool:
    return bool(samples) and hasattr(samples[0], "frames")


def _text_tokens(processor: Any, samples: Sequence[Any]) -> int:
    """Mean number of non-image (non-video) prompt tokens of ``samples`` (for the
    accounting)."""
    from tokensieve.zoo import build_prompt
    from tokensieve.zoo.video_api import build_video_prompt

    tok = processor.tokenizer
    video = _is_video(samples)
    image_token = getattr(processor, "video_token" if video else "image_token", None) \
        or "<image>"
    prompt = build_video_prompt if video else build_prompt
    counts = []
    for s in samples:
        ids = tok(prompt(processor, s.question))["input_ids"]
        image_id = tok.convert_tokens_to_ids(image_token)
        counts.append(sum(1 for i in ids if i != image_id))
    return round(sum(counts) / max(len(counts), 1))


def _timing_inputs(model: torch.nn.Module, processor: Any, samples: Sequence[Any],
                   dtype: torch.dtype) -> dict[str, Any]:
    from tokensieve.zoo import build_prompt
    from tokensieve.zoo.video_api import build_video_prompt

    tokenizer = processor.tokenizer
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if _is_video(samples):
            enc = processor(text=[build_video_prompt(processor, s.question) for s in samples],
                            videos=[s.frames for s in samples], return_tensors="pt",
                            padding=True)
        else:
            enc = processor(text=[build_prompt(processor, s.question) for s in samples],
                            images=[s.image for s in samples], return_tensors="pt",
                            padding=True)
    finally:
        tokenizer.padding_side = old
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in enc:
            enc[key] = enc[key].to(dtype)
    return enc


def environment(device: torch.device, dtype: torch.dtype, seed: int,
                samples: int) -> dict[str, Any]:
    """Versions, hardware and run settings recorded with every result."""
    import numpy
    import transformers

    import tokensieve

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {
        "tokensieve": tokensieve.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": cpu_threads(), "dtype": str(dtype).removeprefix("torch."),
        "seed": seed, "samples": samples,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "flops_convention": "multiply-adds counted once (FastV Eq. 5, as in the token-"
                            "reduction literature); hardware FLOPs are 2x",
    }


def plan_grid(methods: Sequence[str], keeps: Sequence[int], n_tokens: int,
              ) -> list[tuple[str, int]]:
    """The cells to run: the full reference first, then every method at every budget
    below the model's token count."""
    cells = [(FULL, n_tokens)]
    cells += [(m, k) for m in methods for k in keeps if k < n_tokens]
    return cells


def video_methods(max_methods: int = DEFAULT_MAX_VIDEO_METHODS) -> tuple[str, ...]:
    """The default video methods: the first ``max_methods`` registered methods (registry
    order) whose ``describe(m).signals`` include ``frames``."""
    from tokensieve.core.registry import describe

    names = [m for m in list_methods() if "frames" in describe(m).signals]
    return tuple(names[:max_methods])


def video_dims(model: torch.nn.Module) -> VLMDims:
    """Accounting dimensions of the tiny video VLM for one 8-frame clip: the LLM gets the
    clip's frame tokens (the trailing newline is not counted); the tower runs once per
    frame (``crops``)."""
    from dataclasses import replace

    from tokensieve.zoo.clips import NUM_FRAMES, TOKENS_PER_FRAME

    dims = VLMDims.from_config(model.config)
    return replace(dims, image_tokens=NUM_FRAMES * TOKENS_PER_FRAME, crops=NUM_FRAMES,
                   approximate=f"video: {NUM_FRAMES} frames x {TOKENS_PER_FRAME} pooled "
                               "tokens; LLM terms exact for the frame tokens (the one newline "
                               "token is not counted); vision tower once per frame; projector "
                               "and pooling estimated")


def _load_video_model(config: BenchConfig, device: torch.device, dtype: torch.dtype):
    if config.model is not None:
        raise ValueError(f"task='video' runs on the embedded tiny video VLM only; got "
                         f"model={config.model!r} (drop --model)")
    from tokensieve.zoo.video_api import load_tiny_video_vlm, video_checkpoint_available

    if not video_checkpoint_available():
        raise ValueError("the embedded tiny video VLM checkpoint is not installed (expected "
                         "under tokensieve/zoo/checkpoints/tiny-llava-video); regenerate it "
                         "with scripts/train_tiny_video_vlm.py")
    return load_tiny_video_vlm(dtype=dtype, device=device)


def _prepare_video(config: BenchConfig, device: torch.device, dtype: torch.dtype,
                   methods: tuple[str, ...] | None, out: Path, model: Any,
                   processor: Any) -> Prepared:
    """The video task's part of :func:`prepare` (after the shared checks). Methods are not
    tried on the model beforehand: one that cannot reduce the clips gives an error row."""
    from tokensieve.zoo.clips import CLIP_SPLIT_SEEDS, CLIP_TEST_SIZE, clip_qa

    if config.split not in CLIP_SPLIT_SEEDS:
        raise ValueError(f"split={config.split!r}: expected one of {sorted(CLIP_SPLIT_SEEDS)}")
    if config.split == "test" and config.limit > CLIP_TEST_SIZE:
        raise ValueError(f"limit={config.limit}: the video test split has {CLIP_TEST_SIZE} "
                         "samples")
    if config.signal_layers is not None:
        raise ValueError("signal_layers: not used by the video task (video methods read the "
                         "clip's LLM tokens)")
    name = "tokensieve tiny video VLM (embedded)"
    if model is None:
        model, processor = _load_video_model(config, device, dtype)
    elif processor is None:
        raise ValueError("a model was given without its processor")
    else:
        name = config.model or type(model).__name__
    dims = video_dims(model)
    n = dims.image_tokens
    keeps = check_keeps(config.keeps if config.keeps is not None else VIDEO_KEEP_FRACTIONS, n)
    if methods is None:
        methods = video_methods()
    elif methods == (ALL,):
        methods = tuple(m for m in list_methods() if method_runs(m)["bench"])
    samples = clip_qa(config.split, config.limit)
    return Prepared(config=config, model=model, processor=processor, dims=dims,
                    device=device, dtype=dtype, methods=methods, keeps=keeps, out=out,
                    cells=plan_grid(methods, keeps, n), samples=samples, model_name=name)


@dataclass
class Prepared:
    """A validated run: the loaded model and everything needed before the long work."""

    config: BenchConfig
    model: Any
    processor: Any
    dims: VLMDims
    device: torch.device
    dtype: torch.dtype
    methods: tuple[str, ...]
    keeps: tuple[int, ...]
    out: Path
    cells: list[tuple[str, int]]
    samples: list[Any] = field(default_factory=list)
    model_name: str = ""


def prepare(config: BenchConfig, model: Any = None, processor: Any = None) -> Prepared:
    """Validate everything (cheap checks first), load the model and resolve defaults.

    ``model`` / ``processor`` may be given directly (then ``config.model`` only labels them).
    """
    device = parse_device(config.device)
    dtype = parse_dtype(config.dtype)
    if isinstance(config.limit, bool) or not isinstance(config.limit, int) or config.limit < 1:
        raise ValueError(f"limit={config.limit!r}: expected a positive number of samples")
    if config.answer_tokens is not None and config.answer_tokens < 1:
        raise ValueError(f"answer_tokens={config.answer_tokens}: expected >= 1")
    if config.batch_size < 1 or config.timing_batch < 1:
        raise ValueError(f"batch_size={config.batch_size}, timing_batch={config.timing_batch}:"
                         " expected >= 1")
    from tokensieve.zoo.scenes import SPLIT_SEEDS, TEST_SIZE

    if config.task not in TASKS:
        raise ValueError(f"task={config.task!r}: expected one of {list(TASKS)}")
    if config.task == "video":
        methods = check_methods(config.methods) if config.methods is not None else None
        if config.keeps is not None and not config.keeps:
            raise ValueError("keeps=[]: expected at least one budget")
        if config.keeps is not None:
            check_keep_values(config.keeps)
        if isinstance(config.timing_repeats, bool) or not isinstance(
                config.timing_repeats, int) or config.timing_repeats < 1 \
                or config.timing_warmup < 0:
            raise ValueError(f"timing_repeats={config.timing_repeats!r}, timing_warmup="
                             f"{config.timing_warmup!r}: expected repeats >= 1, warmup >= 0")
        return _prepare_video(config, device, dtype, methods, check_output_dir(config.out),
                              model, processor)
    if config.split not in SPLIT_SEEDS:
        raise ValueError(f"split={config.split!r}: expected one of {sorted(SPLIT_SEEDS)}")
    if config.split == "test" and config.limit > TEST_SIZE:
        raise ValueError(f"limit={config.limit}: the test split has {TEST_SIZE} samples")
    methods = check_methods(config.methods) if config.methods is not None else None
    if config.keeps is not None and not config.keeps:
        raise ValueError("keeps=[]: expected at least one budget")
    if config.keeps is not None:
        check_keep_values(config.keeps)
    signal_layers = check_signal_layers(config.signal_layers)
    if isinstance(config.timing_repeats, bool) or not isinstance(config.timing_repeats, int) \
            or config.timing_repeats < 1 or config.timing_warmup < 0:
        raise ValueError(f"timing_repeats={config.timing_repeats!r}, timing_warmup="
                         f"{config.timing_warmup!r}: expected repeats >= 1, warmup >= 0")
    out = check_output_dir(config.out)
    name = config.model or "tokensieve tiny VLM (embedded)"
    if model is None:
        check_model_name(config.model)
        model, processor = load_model(config.model, device, dtype)
    elif config.model is None:
        name = type(model).__name__
    elif processor is None:
        raise ValueError("a model was given without its processor")
    from tokensieve.zoo import scene_qa

    dims = model_dims(model, processor, scene_qa(config.split, 1)[0].image)
    n = dims.image_tokens
    keeps = check_keeps(config.keeps, n) if config.keeps is not None else default_keeps(n)
    _check_signal_depth(model, signal_layers)
    if methods is None:
        methods = default_methods(model, min(keeps))
        if not methods:
            why = supported(model, "random", min(keeps))
            raise ValueError(f"none of the default methods runs on {type(model).__name__}"
                             + (f": {why}" if why else "") + "; pass --methods")
    elif methods == (ALL,):
        methods = all_methods(model, keeps, n, signal_layers)
        if not methods:
            raise ValueError(f"methods=all: no method runs on {type(model).__name__} at "
                             f"keep={list(keeps)}")
    else:
        for m in methods:
            for k in keeps:
                why = supported(model, m, k, **apply_options(m, signal_layers)) \
                    if k < n else None
                if why is not None:
                    raise ValueError(f"method {m!r} at keep={k} cannot run on "
                                     f"{type(model).__name__}: {why}")
    samples = scene_qa(config.split, config.limit)
    return Prepared(config=config, model=model, processor=processor, dims=dims,
                    device=device, dtype=dtype, methods=methods, keeps=keeps, out=out,
                    cells=plan_grid(methods, keeps, n), samples=samples,
                    model_name=name)


def run(prepared: Prepared, progress: Progress | None = None,
        samples: Sequence[Any] | None = None) -> BenchResult:
    """Run the grid of a prepared config and write ``results.json``, ``results.csv`` and
    ``pareto.png`` into its output folder. ``progress(label)`` is called once per cell and
    once more (``TIMING_STEP``) before the interleaved timing of all cells."""
    cfg, model, processor = prepared.config, prepared.model, prepared.processor
    if samples is None:
        samples = prepared.samples
    answer_tokens = cfg.answer_tokens or (1 if cfg.model is None else 4)
    timing_inputs = _timing_inputs(model, processor, samples[:cfg.timing_batch],
                                   prepared.dtype)
    text_tokens = _text_tokens(processor, samples)
    n = prepared.dims.image_tokens
    rows: list[Row] = []
    variants: list[Variant] = []
    full_acc: dict[str, float] = {}
    for method, keep in prepared.cells:
        if progress is not None:
            progress(f"{method} @ {keep}")
        try:
            row, variant = _run_cell(prepared, method, keep, samples, timing_inputs,
                                     text_tokens, answer_tokens, full_acc)
        except Exception as err:  # noqa: BLE001 - a failing method becomes an error row
            # image task: only the adapter's refusals; video task (video support in the
            # adapters is newer): any failure of a method's cell
            expected = isinstance(err, (ValueError, RuntimeError)) or cfg.task == "video"
            if method == FULL or not expected:
                raise
            rows.append(_error_row(prepared, method, keep, err))
            continue
        rows.append(row)
        variants.append(variant)
        if method == FULL:
            full_acc = rows[-1].accuracy
    if progress is not None:
        progress(TIMING_STEP)
    timings = measure_interleaved(model, timing_inputs, variants,
                                  new_tokens=cfg.timing_new_tokens, warmup=cfg.timing_warmup,
                                  repeats=cfg.timing_repeats)
    for r in rows:
        if r.error is None:
            r.timing = timings[f"{r.method}@{r.keep}"].to_dict()
    env = environment(prepared.device, prepared.dtype, cfg.seed, len(samples))
    model_info = {"name": prepared.model_name, "task": cfg.task,
                  "accounting": prepared.dims.approximate or "exact",
                  "class": type(model).__name__, "visual_tokens": n,
                  "dims": prepared.dims.to_dict(), "answer_tokens": answer_tokens}
    result = BenchResult(environment=env, config=cfg.to_dict(), model=model_info, rows=rows)
    result.files = write_results(result, prepared.out)
    return result


#: The progress label of the timing phase.
TIMING_STEP = "timing (interleaved)"


def _error_row(prepared: Prepared, method: str, keep: int, err: Exception) -> Row:
    return Row(method=method, keep=keep, stage=get_method(method).stage,
               config=ReduceConfig(method, keep, seed=prepared.config.seed).to_dict(),
               accuracy={}, retention={}, cost={}, timing={}, eval_seconds=0.0,
               error=f"{type(err).__name__}: {err}")


def _run_cell(prepared: Prepared, method: str, keep: int, samples: Sequence[Any],
              timing_inputs: dict[str, Any], text_tokens: int, answer_tokens: int,
              full_acc: dict[str, float]) -> tuple[Row, Variant]:
    """Evaluate and account one cell, record its selection calls on the timed batch (the
    model is patched only inside); returns the row (timing still empty) and the variant
    that times it."""
    from tokensieve.zoo import accuracy_by_family, answer
    from tokensieve.zoo.video_api import answer_video

    cfg, model, processor = prepared.config, prepared.model, prepared.processor
    respond = answer_video if _is_video(samples) else answer
    models = _adapter()
    rc = ReduceConfig(method=method, keep=keep, seed=cfg.seed)
    patched = method != FULL
    options = apply_options(method, cfg.signal_layers) if patched else {}

    def enter() -> None:
        if patched:
            models.apply(model, method, keep, seed=cfg.seed, **options)

    def leave() -> None:
        if patched:
            models.remove(model)

    enter()
    try:
        t0 = time.perf_counter()
        preds = respond(model, processor, samples, batch_size=cfg.batch_size,
                        max_new_tokens=answer_tokens)
        eval_s = time.perf_counter() - t0
        calls = capture_reduce_calls(model, timing_inputs) if patched else []
        state = models.get_state(model) if patched else None
        tower = None
        llm_keep = keep
        if state is not None:
            rc = state.config
            if getattr(state, "encoder", None) is not None:
                # adaptive methods (ATS, FlowCut) counted at what images really kept
                tower = state.encoder.layer_tokens(prepared.dims.vision_tokens, measured=True)
                if state.encoder.measured_tokens():
                    llm_keep = min(keep, tower[-1][1] - int(state.encoder.has_cls))
    finally:
        leave()
    acc = accuracy_by_family(samples, preds)
    ref = acc if method == FULL else full_acc
    retention = {f: (a / ref[f] if ref.get(f) else float("nan")) for f, a in acc.items()}
    n = prepared.dims.image_tokens
    then = None
    if state is not None and state.pre_llm and isinstance(state.llm, LlmStage):
        then = (state.llm.schedule, state.llm.config.keep)  # the pipeline's in-LLM stage
    plan = _plan(method, llm_keep, n, dict(rc.options), prepared.dims.llm.layers, tower, then)
    cost: Cost = account(prepared.dims, plan, text_tokens=text_tokens,
                         bytes_per_element=torch.finfo(prepared.dtype).bits // 8)
    row = Row(
        method=method, keep=keep, stage="none" if method == FULL else get_method(method).stage,
        config=rc.to_dict(), accuracy=acc, retention=retention,
        cost={**cost.to_dict(), "text_tokens": text_tokens,
              "llm_tokens_first_layer": cost.llm_tokens[0]},
        timing={}, eval_seconds=round(eval_s, 3), plan=plan.to_dict())
    return row, Variant(f"{method}@{keep}", enter, leave, replay(calls))


def run_protocol(config: BenchConfig, progress: Progress | None = None, *, model: Any = None,
                 processor: Any = None, samples: Sequence[Any] | None = None) -> BenchResult:
    """``prepare`` then ``run``: the whole protocol in one call."""
    return run(prepare(config, model, processor), progress, samples)


# -- outputs ------------------------------------------------------------------------------
#: Latency columns of the CSV: every latency, then its spread (``_iqr``, ``_min``, ``_max``).
LATENCY_FIELDS = tuple(f"{name}{suffix}" for name in LATENCIES
                       for suffix in ("", *(f"_{k}" for k in SPREAD_KEYS)))
CSV_FIELDS = ("method", "keep", "stage", "options", "seed", "accuracy", "retention",
              "prefill_macs", "decode_macs_per_token", "kv_cache_bytes", *LATENCY_FIELDS,
              "large_spread", "tokens_per_s", "peak_memory_bytes", "peak_memory_delta_bytes",
              "eval_seconds")


def flat_rows(result: BenchResult | dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per row: the CSV columns plus ``acc_<family>`` for every family."""
    data = result.to_dict() if isinstance(result, BenchResult) else result
    out = []
    for r in data["rows"]:
        if r.get("error"):
            continue
        flat = {
            "method": r["method"], "keep": r["keep"], "stage": r["stage"],
            "options": json.dumps(r["config"].get("options", {}), sort_keys=True),
            "seed": r["config"].get("seed"),
            "accuracy": r["accuracy"]["overall"], "retention": r["retention"]["overall"],
            "prefill_macs": r["cost"]["prefill_macs"],
            "decode_macs_per_token": r["cost"]["decode_macs_per_token"],
            "kv_cache_bytes": r["cost"]["kv_cache_bytes"],
            **{k: r["timing"].get(k) for k in LATENCY_FIELDS},
            "large_spread": ";".join(r["timing"].get("large_spread") or []),
            "tokens_per_s": r["timing"]["tokens_per_s"],
            "peak_memory_bytes": r["timing"]["peak_memory_bytes"],
            "peak_memory_delta_bytes": r["timing"]["peak_memory_delta_bytes"],
            "eval_seconds": r["eval_seconds"],
        }
        for fam, acc in r["accuracy"].items():
            if fam != "overall":
                flat[f"acc_{fam}"] = acc
        out.append(flat)
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_results(result: BenchResult, out: Path) -> dict[str, str]:
    """Write ``results.json``, ``results.csv`` and ``pareto.png``; returns their paths."""
    from tokensieve.bench.plot import pareto_plot

    out = check_output_dir(out)
    data = _json_safe(result.to_dict())
    json_path = out / "results.json"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    rows = flat_rows(data)
    fields = list(CSV_FIELDS) + sorted({k for r in rows for k in r if k.startswith("acc_")})
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    png_path = out / "pareto.png"
    pareto_plot(data, png_path)
    return {"json": str(json_path), "csv": str(csv_path), "png": str(png_path)}


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json`` (or the folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ValueError(f"{str(p)!r}: no results.json there (run `tokensieve bench` first)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "rows" not in data or "environment" not in data:
        raise ValueError(f"{str(p)!r}: expected a tokensieve bench results file")
    return data
