"""Per-process GPU memory through NVML (`pip install 'kvctl[gpu]'`, which brings nvidia-ml-py).

Optional: without the package, a driver or a GPU, every figure here is unknown (None) and
`unavailable_reason()` says why, for the config check of `memory_gb: auto`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from typing import Any


@functools.cache
def _nvml() -> tuple[Any, str | None]:
    """(the initialised pynvml module, None), or (None, why not)."""
    try:
        import pynvml  # type: ignore[import-not-found]  # from nvidia-ml-py, the optional `gpu` extra
    except ImportError:
        return None, "nvidia-ml-py is not installed: pip install 'kvctl[gpu]'"
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None, "NVML sees no GPU"
    except pynvml.NVMLError as exc:
        return None, f"NVML cannot start: {exc}"
    return pynvml, None


def unavailable_reason() -> str | None:
    """None when per-process GPU memory can be measured here; else why it cannot."""
    return _nvml()[1]


def process_memory_bytes(pids: Collection[int]) -> int | None:
    """GPU memory held by these processes on every GPU together; None when unknown."""
    nvml, _ = _nvml()
    if nvml is None:
        return None
    total = 0
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            device = nvml.nvmlDeviceGetHandleByIndex(index)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(device):
                if proc.pid in pids and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
    except nvml.NVMLError:
        return None
    return total
