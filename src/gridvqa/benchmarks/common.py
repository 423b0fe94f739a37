"""What the timing benchmarks share: the device's clock and memory, the machine's description, output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gridvqa.atomic import atomic_write_text

MB = 1024 * 1024


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: a timer read before that measures only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpu_model() or platform.processor() or platform.machine()
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def cpu_model() -> str | None:
    """The model name in /proc/cpuinfo (Linux), else None: platform.processor() gives only "x86_64"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak device memory (torch.cuda.max_memory_allocated, MiB) over a block; None off CUDA.

    The peak counts everything allocated during the block, what was already there (weights, optimizer
    state, pre-loaded batches) included: the figure a run needs free on its device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / MB


@contextmanager
def timed_row(device: torch.device, images: int) -> Iterator[dict[str, Any]]:
    """A row {images, seconds, images_per_s, peak_memory_mb} filled in when the block ends (synced)."""
    row: dict[str, Any] = {"images": images}
    with PeakMemory(device) as peak:
        sync(device)
        start = time.perf_counter()
        yield row
        sync(device)
        row["seconds"] = time.perf_counter() - start
    row["images_per_s"] = images / row["seconds"] if row["seconds"] > 0 else 0.0
    row["peak_memory_mb"] = peak.mb


# torch's caching allocator of page-locked host memory: blocks it creates (cudaHostAlloc), and their time
# (microseconds): counter -> (our name, scale)
PINNED_KEYS = {
    "num_host_alloc": ("pinned_allocs", 1.0),
    "host_alloc_time.total": ("pinned_alloc_seconds", 1e-6),
}


def pinned_host_stats(device: torch.device) -> dict[str, float] | None:
    """torch.cuda.host_memory_stats()' allocation counters now; None off CUDA or where torch lacks them."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if device.type != "cuda" or stats is None:
        return None
    return {k: float(v) for k, v in stats().items() if k in PINNED_KEYS}


def pinned_host_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float]:
    """What a block cost in new page-locked host blocks: {pinned_allocs, pinned_alloc_seconds}, {} when
    not counted. A block the allocator already cached costs nothing; a new one is a page-locking call
    (pinned loader batches, the grid maps' copies to the host) whose time a long run pays once."""
    if before is None or after is None:
        return {}
    out = {}
    for key, (name, scale) in PINNED_KEYS.items():
        if key in before and key in after:
            out[name] = (after[key] - before[key]) * scale
    return out


@contextmanager
def pinned_host_allocs(device: torch.device) -> Iterator[dict[str, float]]:
    """A dict filled in when the block ends with `pinned_host_delta` of the block (empty off CUDA)."""
    row: dict[str, float] = {}
    before = pinned_host_stats(device)
    yield row
    row.update(pinned_host_delta(before, pinned_host_stats(device)))


def environment(device: torch.device) -> dict[str, Any]:
    """The machine a figure was taken on."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # the vector instructions torch's CPU kernels use (e.g. AVX2, AVX512): CPU figures and the
        # ratios between convolution shapes move with it from host to host
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device.type == "cuda":
        env["device_memory_mb"] = torch.cuda.get_device_properties(device).total_memory / MB
        # "float32" rows run their convolutions in TF32 where cuDNN allows it (torch's default): the
        # bfloat16 / float32 ratios are against that
        env["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                       "matmul": torch.backends.cuda.matmul.allow_tf32}
    return env


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def write_json(path: Path, record: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
