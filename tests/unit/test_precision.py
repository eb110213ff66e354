"""bf16 autocast: on CUDA and on CPUs that compute bf16 natively, never emulated, never when off."""
from __future__ import annotations

import torch

from ncd.model import precision
from ncd.model.precision import autocast, cpu_has_native_bf16, uses_bf16


def _matmul_dtype(device: str, enabled: bool) -> torch.dtype:
    a = torch.randn(4, 4)
    with autocast(device, enabled):
        return (a @ a).dtype


def test_cpu_autocast_follows_the_cpu_flags():
    assert uses_bf16("cpu", True) is cpu_has_native_bf16()
    assert _matmul_dtype("cpu", True) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_off_means_float32_everywhere():
    assert not uses_bf16("cpu", False) and not uses_bf16("cuda", False)
    assert _matmul_dtype("cpu", False) == torch.float32


def test_cuda_always_counts_as_native():
    assert uses_bf16("cuda", True) and uses_bf16(torch.device("cuda", 0), True)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    def has_bf16(flags: str) -> bool:
        path = tmp_path / f"cpuinfo_{flags.replace(' ', '_')}"  # one file per case: the answer is cached per path
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        return cpu_has_native_bf16(str(path))

    assert not has_bf16("fpu sse avx2 avx512f avx512bw")  # bf16 only emulated: slower than float32
    assert has_bf16("fpu sse avx512f avx512_bf16") and has_bf16("fpu amx_tile amx_bf16")
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_an_emulating_cpu_keeps_float32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not uses_bf16("cpu", True) and _matmul_dtype("cpu", True) == torch.float32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert uses_bf16("cpu", True) and _matmul_dtype("cpu", True) == torch.bfloat16
