"""What this CPU can do for training: bf16 support (AMX or AVX512-BF16), recorded in every run.

bf16 autocast on a CPU without native bf16 instructions is emulated and slower than float32,
so it is enabled only where ``/proc/cpuinfo`` lists ``amx_bf16`` or ``avx512_bf16`` (or, where
there is no /proc, where torch's own CPU capability says AVX512/AMX and the platform reports
bf16). The loss is always computed in float32.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor listed (empty where there is no /proc)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_cpu_capability() -> str | None:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - old torch: no capability query
        return None


def bf16_support(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """(usable, why): whether bf16 autocast runs natively on this CPU, and the evidence."""
    flags = cpu_flags(cpuinfo)
    native = [f for f in BF16_FLAGS if f in flags]
    if native:
        return True, "cpu flags: " + ", ".join(native)
    if flags:
        return False, "no amx_bf16/avx512_bf16 in the cpu flags: bf16 would be emulated (slower than float32)"
    capability = torch_cpu_capability()
    if capability and ("AMX" in capability.upper()):
        return True, f"torch cpu capability {capability}"
    return False, f"cpu flags unavailable, torch cpu capability {capability}: bf16 not assumed"


def resolve_bf16(request: str, device: str = "cpu", cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool, str]:
    """``--bf16 auto|on|off`` → (enabled, reason). ``on`` without native support is refused."""
    from u2zoo.errors import ConfigError

    if request not in ("auto", "on", "off"):
        raise ConfigError(f"unknown --bf16 {request!r} (choose from: auto, on, off)")
    if device != "cpu":
        return False, f"bf16 autocast is for the CPU; {device} uses its own AMP"
    if request == "off":
        return False, "off (asked)"
    usable, why = bf16_support(cpuinfo)
    if request == "on" and not usable:
        raise ConfigError(f"--bf16 on: this CPU has no native bf16 ({why})")
    return usable, why


def host_record(bf16: bool, bf16_reason: str) -> dict[str, Any]:
    """What a run's record says about the machine it trained on."""
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "cpu_capability": torch_cpu_capability(),
        "bf16_autocast": bf16,
        "bf16_reason": bf16_reason,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
