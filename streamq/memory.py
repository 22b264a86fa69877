"""Measured memory peaks per block: host RSS high-water mark, CUDA max allocated and reserved."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peaks(device: torch.device) -> None:
    """Start a new measurement window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass  # no per-window reset: peak_rss() then reports the process-lifetime peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss() -> int:
    """Peak resident set size in bytes since the last reset_peaks (or process start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_reserved(device: torch.device) -> int | None:
    """What the caching allocator held at its peak (allocated plus cached, unused blocks)."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
