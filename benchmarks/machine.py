"""One line that says where a benchmark ran: CPU model, cores, threads, library versions."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> str:
    try:
        from megatron.core import __version__ as megatron_version
    except ImportError:
        megatron_version = "absent"
    return (f"python {platform.python_version()}, torch {torch.__version__}, "
            f"megatron-core {megatron_version}")


def describe(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{where}; {library_versions()}"
