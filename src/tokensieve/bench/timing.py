"""Latency and memory measurement of generation: time to first token, time per decoded
token, tokens/s and peak memory, with warm-up, repeats, medians and CUDA synchronisation.

Prefill time (time to first token, TTFT) runs from the ``generate`` call to its first new
token: vision tower, projector, any reduction and the LLM prefill. Time per decoded token is
the median gap between later tokens; a streamer timestamps every token (after a CUDA
synchronisation), so one run gives both and noise on one token does not skew the other.
Going through ``generate`` keeps the measurement valid for any patched model (position
ids, caches and reductions are the adapter's business).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
(bytes held by tensors); on CPU the process's resident-set high-water mark ``VmHWM`` from
``/proc/self/status``, reset before each measurement through ``/proc/self/clear_refs`` where
the kernel allows it, else a sampling thread reading ``VmRSS`` every millisecond (both are
whole-process numbers: model weights included).

On a shared machine the load changes from second to second, so variants compared with each
other are timed in alternation (:func:`measure_interleaved`: round ``r`` runs every variant
once, in reversed order on odd rounds), never one block after another, and every latency is
reported as the median over repeats with its spread (interquartile range, minimum and
maximum). A spread above ``LARGE_SPREAD`` (IQR / median) marks the number as noisy.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

_STATUS = "/proc/self/status"
#: A latency is flagged as noisy when its interquartile range exceeds this share of its
#: median (IQR / median > 20 %): its differences to other rows are then not to be trusted.
LARGE_SPREAD = 0.20
#: The latencies of a :class:`Timing` that carry a spread (seconds).
LATENCIES = ("prefill_s", "decode_s_per_token", "prefill_cpu_s", "decode_cpu_s_per_token",
             "selection_s")
#: The spread statistics written next to every latency ``x``: ``x_iqr``, ``x_min``, ``x_max``.
SPREAD_KEYS = ("iqr", "min", "max")


@dataclass(frozen=True)
class Spread:
    """Median and spread of repeated measurements of one quantity.

    >>> s = Spread.of([1.0, 2.0, 3.0, 4.0, 100.0])
    >>> s.median, s.iqr, s.min, s.max
    (3.0, 2.0, 1.0, 100.0)
    """

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Median, quartiles (linear interpolation between order statistics), min and max."""
        xs = sorted(float(v) for v in values)
        if not xs:
            raise ValueError("no measurements: expected at least one value")
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 \
            else (xs[0], xs[0], xs[0])
        return cls(median=statistics.median(xs), q1=q1, q3=q3, min=xs[0], max=xs[-1],
                   n=len(xs))

    @property
    def iqr(self) -> float:
        """Interquartile range ``q3 - q1``."""
        return self.q3 - self.q1

    @property
    def relative(self) -> float:
        """``iqr / median`` (0 for a zero median)."""
        return self.iqr / self.median if self.median > 0 else 0.0

    @property
    def large(self) -> bool:
        """Whether the spread is large (``relative > LARGE_SPREAD``)."""
        return self.relative > LARGE_SPREAD


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``None`` where there is no procfs)."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (``VmHWM``) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring peak memory (bytes) of the code it wraps.

    ``device`` CUDA: peak bytes allocated by tensors on that device. CPU: peak resident set
    size of the process (``VmHWM`` after a reset, or a sampling thread).

    >>> with PeakMemory("cpu") as pm:
    ...     x = [0] * 1000
    >>> pm.peak_bytes > 0
    True
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.start_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _status_kib("VmRSS")
            if rss is not None:
                self._sampled = max(self._sampled, rss * 1024)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            self.method = "cuda max_memory_allocated"
        elif _status_kib("VmHWM") is not None and _reset_hwm():
            self.start_bytes = (_status_kib("VmRSS") or 0) * 1024
            self.method = "VmHWM (process peak RSS)"
        else:
            self.method = "sampled VmRSS"
            self._sampled = (_status_kib("VmRSS") or 0) * 1024
            self.start_bytes = self._sampled
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _status_kib("VmRSS") or 0
            self.peak_bytes = max(self._sampled, rss * 1024)
        else:
            self.peak_bytes = (_status_kib("VmHWM") or 0) * 1024

    @property
    def delta_bytes(self) -> int:
        """Peak minus the memory in use on entry (what the wrapped code added at its peak)."""
        return max(self.peak_bytes - self.start_bytes, 0)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 1,
              repeats: int = 3) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls,
    synchronising ``device`` before and after each timed call."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup={warmup}, repeats={repeats}: expected warmup >= 0, "
                         "repeats >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Timing:
    """Medians over repeats (seconds, bytes) of one generation setting.

    Attributes:
        prefill_s: time to first token (vision + reduction + LLM prefill).
        decode_s_per_token: time per decoded token after the first.
        prefill_cpu_s, decode_cpu_s_per_token: the same in process CPU time (all threads;
            steadier than wall time on a shared machine, blind to GPU work).
        tokens_per_s: decoded tokens per second over the batch
            (``batch_size / decode_s_per_token``).
        peak_memory_bytes: peak memory during one ``new_tokens`` generation (whole process on
            CPU, all tensors on CUDA).
        peak_memory_delta_bytes: that peak minus the memory in use before the call
            (activations, KV cache and temporaries of the generation).
        memory_method: how the peak was measured.
        batch_size: requests per generate call.
        new_tokens: tokens generated for the decode measurement.
        repeats, warmup: how many timed and untimed runs.
        selection_s: the method's own work per timed batch: its ``reduce`` calls of one
            prefill, replayed on the inputs they got in the model (``None``: no method, or
            it was not measured).
        spreads: ``Spread`` of every latency in ``LATENCIES`` that was measured.
        interleaved_with: how many variants were timed in alternation with this one
            (1: alone).
    """

    prefill_s: float
    decode_s_per_token: float
    prefill_cpu_s: float
    decode_cpu_s_per_token: float
    tokens_per_s: float
    peak_memory_bytes: int
    peak_memory_delta_bytes: int
    memory_method: str
    batch_size: int
    new_tokens: int
    repeats: int
    warmup: int
    selection_s: float | None = None
    spreads: Mapping[str, Spread] = field(default_factory=dict)
    interleaved_with: int = 1

    @property
    def large_spread(self) -> list[str]:
        """Names of the latencies whose spread is large (``Spread.large``)."""
        return [k for k in LATENCIES if k in self.spreads and self.spreads[k].large]

    def to_dict(self) -> dict[str, Any]:
        """Flat dict: every field, and ``x_iqr`` / ``x_min`` / ``x_max`` next to every
        latency ``x`` (``None`` where it was not measured); ``large_spread`` lists the noisy
        ones."""
        d = {k: v for k, v in asdict(self).items() if k != "spreads"}
        for name in LATENCIES:
            sp = self.spreads.get(name)
            d[f"{name}_iqr"] = sp.iqr if sp else None
            d[f"{name}_min"] = sp.min if sp else None
            d[f"{name}_max"] = sp.max if sp else None
        d["large_spread"] = self.large_spread
        return d


class _TokenClock:
    """A ``generate`` streamer that timestamps every ``put`` (the prompt, then each new
    token), synchronising CUDA first so a stamp marks a finished token."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []
        self.cpu: list[float] = []

    def put(self, value: Any) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


@dataclass
class Variant:
    """One setting timed by :func:`measure_interleaved`.

    Attributes:
        label: its name in the result.
        enter, exit: called around each of its runs (e.g. patch / unpatch the model).
        selection: replays the method's own work of one prefill (``None``: nothing to time).
    """

    label: str
    enter: Callable[[], Any] = lambda: None
    exit: Callable[[], Any] = lambda: None
    selection: Callable[[], Any] | None = None


@dataclass
class _Runs:
    firsts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    cpu_firsts: list[float] = field(default_factory=list)
    cpu_gaps: list[float] = field(default_factory=list)
    selection: list[float] = field(default_factory=list)


def _check_counts(new_tokens: int, warmup: int, repeats: int) -> None:
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens!r}: expected an int >= 2")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup={warmup}, repeats={repeats}: expected warmup >= 0, "
                         "repeats >= 1")


def _time_selection(fn: Callable[[], Any], device: torch.device, inner: int = 3) -> float:
    """Mean wall time of ``inner`` back-to-back calls of ``fn`` (one sample)."""
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(inner):
            fn()
    synchronize(device)
    return (time.perf_counter() - t0) / inner


def measure_interleaved(model: Any, inputs: Mapping[str, Any], variants: Sequence[Variant],
                        *, new_tokens: int = 8, warmup: int = 1, repeats: int = 3,
                        ) -> dict[str, Timing]:
    """Time ``model.generate(**inputs)`` under every variant, in alternation.

    Round ``r`` (``warmup`` untimed rounds, then ``repeats`` timed ones) runs each variant
    once: ``enter()``, one generation of exactly ``new_tokens`` tokens (a streamer
    timestamps every token), the variant's ``selection`` (timed separately), ``exit()``;
    odd rounds go through the variants in reverse order, so a slow phase of the machine
    falls on all of them alike. Per run: the time to first token (from the call: images,
    reduction and prefill) and the median gap between later tokens; each latency is the
    median over runs with its ``Spread``. Peak memory: one more generation per variant.

    Args:
        model: a Hugging Face generative model, in eval mode.
        inputs: processor outputs already on the model's device.
        variants: the settings compared (distinct labels).
        new_tokens: tokens per run (>= 2).
        warmup: untimed rounds before timing (caches, allocator, lazy kernels).
        repeats: timed rounds; medians and spreads are over these.
    """
    _check_counts(new_tokens, warmup, repeats)
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variants: labels must be distinct, got {labels}")
    device = next(model.parameters()).device
    batch = int(next(iter(v for v in inputs.values() if torch.is_tensor(v))).shape[0])

    def once(streamer: _TokenClock | None = None) -> tuple[float, float]:
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, streamer=streamer)
        synchronize(device)
        return t0, c0

    runs = {v.label: _Runs() for v in variants}
    for r in range(warmup + repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            v.enter()
            try:
                if r < warmup:
                    once()
                    if v.selection is not None:
                        _time_selection(v.selection, device, inner=1)
                    continue
                clock = _TokenClock(device)
                t0, c0 = once(clock)
                if v.selection is not None:
                    runs[v.label].selection.append(_time_selection(v.selection, device))
            finally:
                v.exit()
            stamps, cpu = clock.stamps[1:], clock.cpu[1:]  # [0]: the prompt, before any token
            if len(stamps) < 2:
                raise ValueError(f"generate produced {len(stamps)} timed token(s); expected "
                                 f"{new_tokens} (does the model honour min_new_tokens?)")
            rec = runs[v.label]
            rec.firsts.append(stamps[0] - t0)
            rec.gaps.append(statistics.median(b - a for a, b in zip(stamps, stamps[1:],
                                                                     strict=False)))
            rec.cpu_firsts.append(cpu[0] - c0)
            rec.cpu_gaps.append(statistics.median(b - a for a, b in zip(cpu, cpu[1:],
                                                                         strict=False)))
    out: dict[str, Timing] = {}
    for v in variants:
        v.enter()
        try:
            with PeakMemory(device) as pm:
                once()
        finally:
            v.exit()
        rec = runs[v.label]
        spreads = {"prefill_s": Spread.of(rec.firsts), "decode_s_per_token": Spread.of(rec.gaps),
                   "prefill_cpu_s": Spread.of(rec.cpu_firsts),
                   "decode_cpu_s_per_token": Spread.of(rec.cpu_gaps)}
        if rec.selection:
            spreads["selection_s"] = Spread.of(rec.selection)
        per_token = spreads["decode_s_per_token"].median
        out[v.label] = Timing(
            prefill_s=spreads["prefill_s"].median, decode_s_per_token=per_token,
            prefill_cpu_s=spreads["prefill_cpu_s"].median,
            decode_cpu_s_per_token=spreads["decode_cpu_s_per_token"].median,
            tokens_per_s=(batch / per_token) if per_token > 0 else float("inf"),
            peak_memory_bytes=pm.peak_bytes, peak_memory_delta_bytes=pm.delta_bytes,
            memory_method=pm.method, batch_size=batch, new_tokens=new_tokens,
            repeats=repeats, warmup=warmup,
            selection_s=spreads["selection_s"].median if "selection_s" in spreads else None,
            spreads=spreads, interleaved_with=len(variants))
    return out


def measure_generation(model: Any, inputs: Mapping[str, Any], *, new_tokens: int = 8,
                       warmup: int = 1, repeats: int = 3) -> Timing:
    """Time ``model.generate(**inputs)`` alone: prefill, per-token decode and peak memory
    (:func:`measure_interleaved` with a single variant, the model as it is).

    Every run generates exactly ``new_tokens`` tokens (``min_new_tokens``, so EOS does not
    cut it short); the time to first token runs from the call (images, reduction and
    prefill included) to the first new token; the decode time of a run is the median
    interval between its later tokens. Medians over runs, with their spreads.

    Args:
        model: a Hugging Face generative model (patched or not), in eval mode.
        inputs: processor outputs already on the model's device.
        new_tokens: tokens per run (>= 2).
        warmup: untimed runs before timing (caches, allocator, lazy kernels).
        repeats: timed runs; medians are reported.
    """
    return measure_interleaved(model, inputs, [Variant("model")], new_tokens=new_tokens,
                               warmup=warmup, repeats=repeats)["model"]


def cpu_threads() -> int:
    """Threads torch uses for CPU ops (recorded with every result)."""
    return torch.get_num_threads()


def environment_memory() -> dict[str, int | None]:
    """Total and available system memory in bytes (Linux ``/proc/meminfo``)."""
    out: dict[str, int | None] = {"total": None, "available": None}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, val = line.split(":", 1)
                if key == "MemTotal":
                    out["total"] = int(val.split()[0]) * 1024
                elif key == "MemAvailable":
                    out["available"] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


__all__ = ["LARGE_SPREAD", "LATENCIES", "PeakMemory", "Spread", "Timing", "Variant", "cpu_threads",
           "environment_memory", "measure_generation", "measure_interleaved", "synchronize",
           "time_call"]

