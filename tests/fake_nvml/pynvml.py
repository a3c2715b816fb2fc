"""A stand-in for nvidia-ml-py's `pynvml` (NVML stands in for a GPU here, as the sim stands in
for engines): put this directory on PYTHONPATH and kvctl/gpu.py's `import pynvml` finds it.

It has the calls kvctl/gpu.py makes, with nvidia-ml-py's names and shapes (checked against
nvidia-ml-py 13.615: module `pynvml`, `nvmlDeviceGetComputeRunningProcesses` gives objects with
`pid` and `usedGpuMemory` in bytes). One GPU, whose processes are read at every call from the
JSON file `$KVCTL_FAKE_NVML` names: {"PID": bytes, ...} (missing file: no process).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    pass


def nvmlInit() -> None:
    if not os.environ.get("KVCTL_FAKE_NVML"):
        raise NVMLError("Driver Not Loaded")  # as when no NVIDIA driver is there


def nvmlDeviceGetCount() -> int:
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if index != 0:
        raise NVMLError(f"fake NVML: no GPU {index}")
    return index


def nvmlDeviceGetComputeRunningProcesses(handle: Any) -> list[SimpleNamespace]:
    try:
        with open(os.environ["KVCTL_FAKE_NVML"], encoding="utf-8") as fh:
            figures = json.load(fh)
    except FileNotFoundError:
        return []
    return [SimpleNamespace(pid=int(pid), usedGpuMemory=int(used)) for pid, used in figures.items()]
