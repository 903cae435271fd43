"""What machine a number was measured on, and which precision it runs fast.

On CPUs, bf16 autocast is only worth it with native bf16 instructions
(AVX-512-BF16 or AMX): there oneDNN's bf16 convolutions ran 1.5-4x faster than
fp32; on an AVX2-only CPU PyTorch emulates bf16 and the same 3x3 convolution
ran 35x slower than fp32 (issue 11). ``precision = "auto"`` asks this module.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 natively (AVX-512-BF16 or AMX tiles) and PyTorch may use it.

    The instruction flags come from cpuid; PyTorch's kernels may still be held to AVX2 by
    ``ATEN_CPU_CAPABILITY=avx2`` and oneDNN's by ``ONEDNN_MAX_CPU_ISA=AVX2`` (both together make an
    AMX machine behave like an AVX2-only one, which is how both kinds are benchmarked on one machine).
    """
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. ``auto``: on CUDA bf16 where supported, else fp16; on CPU bf16
    only with native bf16 instructions (AVX-512-BF16 / AMX), else fp32 (emulated bf16 is ~35x slower)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (an ``autocast_dtype`` result); None: fp32 (a disabled autocast)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU model, PyTorch's CPU capability (e.g. AVX2, AVX512), native bf16, thread count and GPUs."""
    info = {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_has_native_bf16(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


@functools.cache
def git_commit() -> str | None:
    """The source tree's git commit (with "-dirty" when it has uncommitted changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")
