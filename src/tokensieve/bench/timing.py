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
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

_STATUS = "/proc/self/status"


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def measure_generation(model: Any, inputs: Mapping[str, Any], *, new_tokens: int = 8,
                       warmup: int = 1, repeats: int = 3) -> Timing:
    """Time ``model.generate(**inputs)``: prefill, per-token decode and peak memory.

    Every run generates exactly ``new_tokens`` tokens (``min_new_tokens``, so EOS does not
    cut it short) with a streamer that timestamps each token: the time to first token runs
    from the call (images, reduction and prefill included) to the first new token; the
    decode time is the median interval between later tokens, over all timed runs.

    Args:
        model: a Hugging Face generative model (patched or not), in eval mode.
        inputs: processor outputs already on the model's device.
        new_tokens: tokens per run (>= 2).
        warmup: untimed runs before timing (caches, allocator, lazy kernels).
        repeats: timed runs; medians are reported.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens!r}: expected an int >= 2")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup={warmup}, repeats={repeats}: expected warmup >= 0, "
                         "repeats >= 1")
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

    for _ in range(warmup):
        once()
    firsts: list[float] = []
    gaps: list[float] = []
    cpu_firsts: list[float] = []
    cpu_gaps: list[float] = []
    for _ in range(repeats):
        clock = _TokenClock(device)
        t0, c0 = once(clock)
        stamps, cpu = clock.stamps[1:], clock.cpu[1:]  # [0]: the prompt, before any token
        if len(stamps) < 2:
            raise ValueError(f"generate produced {len(stamps)} timed token(s); expected "
                             f"{new_tokens} (does the model honour min_new_tokens?)")
        firsts.append(stamps[0] - t0)
        gaps.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        cpu_firsts.append(cpu[0] - c0)
        cpu_gaps.extend(b - a for a, b in zip(cpu, cpu[1:], strict=False))
    per_token = statistics.median(gaps)
    with PeakMemory(device) as pm:
        once()
    return Timing(
        prefill_s=statistics.median(firsts), decode_s_per_token=per_token,
        prefill_cpu_s=statistics.median(cpu_firsts),
        decode_cpu_s_per_token=statistics.median(cpu_gaps),
        tokens_per_s=(batch / per_token) if per_token > 0 else float("inf"),
        peak_memory_bytes=pm.peak_bytes, peak_memory_delta_bytes=pm.delta_bytes,
        memory_method=pm.method, batch_size=batch, new_tokens=new_tokens, repeats=repeats,
        warmup=warmup,
    )


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


__all__ = ["PeakMemory", "Timing", "cpu_threads", "environment_memory", "measure_generation",
           "synchronize", "time_call"]

