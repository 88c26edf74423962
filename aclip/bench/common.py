"""Shared benchmark plumbing: environment record, step timing, peak memory, tables, JSON."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; the first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The peak FLOP/s (in TFLOP/s) that MFU divides by: ``override``, else the table's bf16
    figure for a known GPU, else None (CPUs and unknown GPUs report no MFU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for frag, peak in PEAK_BF16_TFLOPS if frag in name), None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """Date, machine, device and library versions, recorded beside every result."""
    import deepspeed
    import open_clip
    import timm

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": gpu or f"CPU: {_cpu_model()}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "open_clip": open_clip.__version__,
        "deepspeed": deepspeed.__version__,
    }


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand freed memory back (CUDA cache, glibc arenas)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _vm_kib(field: str) -> int:
    """A ``Vm*`` line of /proc/self/status (kB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak RSS (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMemory:
    """Peak memory over a region of code, above what was held when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated at ``start`` (tensors
    only: weights, optimizer state, gradients, activations; the caching allocator's slack is not
    counted). CPU: the kernel's peak resident set size of the process (VmHWM, reset at
    ``start`` through /proc/self/clear_refs) minus the RSS at ``start``, after freed heap
    memory was handed back (:func:`release_memory`): everything the region allocated and still
    held at its peak, tensors or not. ``base`` keeps the starting figure.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    @property
    def kind(self) -> str:
        """What the figures mean (goes into the JSON)."""
        if self.device.type == "cuda":
            return "CUDA max_memory_allocated minus allocated before building the mode"
        return "process peak RSS (kernel VmHWM) minus RSS before building the mode"

    def start(self) -> None:
        """Begin the region (after :func:`release_memory`)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        _reset_peak_rss()
        self._base = _vm_kib("VmRSS") * 1024

    def stop(self) -> int:
        """End the region; returns the peak in bytes (see the class docstring)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device)) - self._base
        return _vm_kib("VmHWM") * 1024 - self._base

    @property
    def base(self) -> int:
        """Bytes held when the region started (allocated tensors on CUDA, RSS on the CPU)."""
        return self._base


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], Any], device: torch.device, warmup: int, steps: int
) -> list[float]:
    """Run ``warmup`` untimed steps, then time ``steps`` steps one by one (seconds each), with
    the device synchronised around each timed step."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def count_host_syncs(step: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device synchronisations in one step, from CUDA's sync debug mode (None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median / min / max step time in seconds."""
    return {
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
    }


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table with right-aligned columns after the first."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path`` (parents created); no-op for None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
