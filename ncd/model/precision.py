"""Mixed precision: bf16 autocast where the device computes bf16 natively."""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16, Arm BF16).

    Without it torch emulates bf16 on the CPU, slower than float32, so autocast stays off."""
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def uses_bf16(device: torch.device | str, enabled: bool) -> bool:
    """Whether ``autocast(device, enabled)`` computes in bf16."""
    kind = torch.device(device).type
    return enabled and (kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()))


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when enabled, on CUDA and on CPUs with native bf16; a no-op elsewhere."""
    if uses_bf16(device, enabled):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
