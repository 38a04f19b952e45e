"""Which CPU ran a run: its model name, torch's CPU capability and the int8 instruction sets the
quantized kernels use (VNNI, AVX512, AMX), so runs from different machines can be told apart. Every
run gets them as tags (pipeline.tracking.run_tags) and as <run dir>/machine.json."""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The first "model name" of /proc/cpuinfo (Linux); else platform.processor(), else "unknown"."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _flag(probe: Callable[[], bool] | None) -> str:
    """ "true"/"false" from one of torch.cpu's private probes, or "unknown" when this torch has none."""
    if probe is None:
        return "unknown"
    try:
        return str(bool(probe())).lower()
    except Exception:
        return "unknown"


@functools.cache
def machine_tags() -> dict[str, str]:
    """{tag: value} describing this machine's CPU, read once per process (torch is imported here, not at
    module import: pipeline.tracking, which Hydra's sweep callback imports, stays light)."""
    import torch

    capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return {
        "cpu.model": cpu_model(),
        "cpu.capability": capability() if capability is not None else "unknown",  # DEFAULT, AVX2, AVX512...
        "cpu.vnni": _flag(getattr(torch.cpu, "_is_vnni_supported", None)),  # int8 dot products (fbgemm, onednn)
        "cpu.avx512": _flag(getattr(torch.cpu, "_is_avx512_supported", None)),
        "cpu.amx": _flag(getattr(torch.cpu, "_is_amx_tile_supported", None)),  # AMX tiles (onednn int8)
        "torch.version": torch.__version__,
    }
