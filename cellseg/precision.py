"""Numeric precision of the network: ``fp32`` or ``bf16`` autocast, and what ``auto`` picks.

bf16 (bfloat16: fp32's 8-bit exponent, 8-bit mantissa) roughly halves the cost of convolutions and
matrix products where the hardware has bf16 units: CUDA GPUs with bf16 support (Ampere and newer)
and Intel CPUs with AMX or AVX512-BF16 (measured in issue 9: 1.5-2.9x for training, 2.1-2.3x for
inference, with channels_last). Elsewhere bf16 is emulated and slower, so ``auto`` keeps fp32.

bf16 runs as *autocast*: weights, optimiser and losses stay fp32, and only the ops autocast lists
(convolutions, linear layers, attention) run in bf16. The numerically sensitive ops are pinned to
fp32 in the model code itself with :func:`fp32_region` (SimAM's variance, the output head), and the
losses and the CIM run on fp32 tensors outside autocast (see docs/NOTES.md, "fp32 islands").
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The CPU's native-bf16 flags (``amx_bf16``, ``avx512_bf16``) that are present.

    Two independent sources, either suffices: torch's own ISA probes (the ones oneDNN uses to pick
    its bf16 kernels; they work where ``/proc`` is hidden) and the kernel's ``/proc/cpuinfo``
    flags (Linux). ``torch.backends.cpu.get_cpu_capability()`` is not enough on its own: it
    reports ``AVX512`` for CPUs with and without the bf16 extension.
    """
    found = set()
    probes = {
        "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None),
        "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
    }
    for flag, probe in probes.items():
        try:
            if probe is not None and probe():
                found.add(flag)
        except (RuntimeError, AttributeError):  # older/unusual builds: fall back to cpuinfo
            pass
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    found.update(f for f in _FAST_BF16_CPU_FLAGS if f in cpuinfo_flags(text))
    return tuple(f for f in _FAST_BF16_CPU_FLAGS if f in found)


def cpuinfo_flags(text: str) -> set[str]:
    """The ``flags`` of the first processor in a ``/proc/cpuinfo`` text (empty if none)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` has native bf16 arithmetic (so bf16 autocast pays)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`bf16_is_fast`, else ``fp32``; explicit choices are kept.

    ``bf16`` is refused (``CellsegError``) only on a CUDA device without bf16 support; on a CPU
    without native bf16 it runs, emulated and slower (useful to test agreement).
    """
    from .errors import CellsegError

    if precision not in PRECISIONS:
        raise CellsegError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CellsegError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (``fp32``: autocast off)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Turns autocast off for the ops inside (use with ``x.float()`` at the start).

    For ops whose result bf16 would change: a sum over a whole feature map, a difference of
    nearly equal numbers, a small epsilon added to a variance (bf16 keeps about 3 significant
    digits, so ``v + 1e-4`` equals ``v`` for any ``v > 0.05``).
    """
    return torch.autocast(x.device.type, enabled=False)


def use_channels_last(precision: str, device: torch.device) -> bool:
    """channels_last (NHWC) memory format where it is faster for this model.

    CUDA: always (cuDNN's tensor-core kernels are NHWC). CPU: with bf16 (oneDNN's AMX/AVX512
    bf16 kernels are NHWC; issue 9: bf16 without channels_last gains little), but not in fp32,
    where it measured slower on an AVX2 EPYC (benchmarks/README.md, "channels_last").
    """
    return device.type == "cuda" or precision == "bf16"
