"""What the CPU offers for reduced-precision arithmetic: int8 dot products and native bfloat16.

Read from the kernel's CPU flags (``/proc/cpuinfo`` on Linux), without importing a runtime, so the
ONNX path (no torch) and the benchmarks share one answer. x86: int8 runs fast with VNNI dot products
(``avx512_vnni``, ``avx_vnni``, or AMX's ``amx_int8``); without them ONNX Runtime's int8 kernels fall
back to AVX2 instructions that may be no faster than fp32, and whose 16-bit intermediate sums can
saturate with per-channel weights. Arm: the dot-product extension (``asimddp``). bfloat16: AMX
(``amx_bf16``) or ``avx512_bf16``; Arm ``bf16``.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
X86_INT8 = ("amx_int8", "avx512_vnni", "avx_vnni")
X86_BF16 = ("amx_bf16", "avx512_bf16")
ARM_INT8 = ("asimddp",)
ARM_BF16 = ("bf16",)
# Flags a report lists, when present.
REPORTED = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile",
            "asimddp", "i8mm", "bf16")
_warned: set[str] = set()


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm) from ``cpuinfo`` (the text of
    /proc/cpuinfo; None: read it). An empty set where they cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def cpu_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return platform.processor() or platform.machine()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "cpu model"):
            return value.strip()
    return platform.processor() or platform.machine()


def int8_support(flags: set[str] | None = None, machine: str | None = None) -> tuple[bool | None, str]:
    """(whether the CPU has int8 dot-product instructions, the reason in words). None where the flags
    cannot be read: nothing is claimed."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if not flags:
        return None, "the CPU's feature flags cannot be read here"
    arm = machine.startswith(("arm", "aarch64"))
    wanted = ARM_INT8 if arm else X86_INT8
    present = [flag for flag in wanted if flag in flags]
    if present:
        return True, f"int8 dot products: {', '.join(present)}"
    return False, (f"this CPU has no int8 dot-product instructions (none of {', '.join(wanted)}): int8 kernels "
                   "run on wider fallbacks that may be no faster than fp32, and per-channel int8 weights may "
                   "saturate their 16-bit sums")


def bf16_support(flags: set[str] | None = None, machine: str | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    wanted = ARM_BF16 if machine.startswith(("arm", "aarch64")) else X86_BF16
    return any(flag in flags for flag in wanted)


def describe_cpu() -> dict:
    """The CPU as a benchmark or an int8 report records it: name, machine and the flags that matter."""
    flags = cpu_flags()
    return {"name": cpu_name(), "machine": platform.machine(),
            "features": [flag for flag in REPORTED if flag in flags], "int8_dot_products": int8_support(flags)[0],
            "bf16": bf16_support(flags)}


def warn_int8_once(what: str, flags: set[str] | None = None) -> None:
    """One RuntimeWarning per process (and per ``what``) when the CPU lacks int8 dot products."""
    supported, reason = int8_support(flags)
    if supported is False and what not in _warned:
        _warned.add(what)
        warnings.warn(f"{what}: {reason}; an int8 export may run slower than fp32 here (export fp32, or bf16 "
                      "where the CPU has it)", RuntimeWarning, stacklevel=3)
