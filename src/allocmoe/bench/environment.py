"""The record of where a benchmark ran: versions, threads, load average, dtype, device, experts implementation.

Ratios measured on a machine where another CPU-heavy process runs can be far off (the other process
steals time from some runs and not others), so the load average is recorded at the start and the end
of every benchmark, next to the thread count the benchmark used.
"""

from __future__ import annotations

import os
import platform

import torch
from torch import nn

from .. import experts_fast
from .._version import __version__
from ..errors import SettingsError


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (runnable processes), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_busy(env: dict) -> bool:
    """Whether the recorded 1-minute load average (start or end) exceeds the benchmark's own threads by more
    than one, i.e. other processes competed for the CPU during the run."""
    loads = [l[0] for l in (env.get("loadavg_start"), env.get("loadavg_end")) if l]
    return bool(loads) and max(loads) > (env.get("threads") or 1) + 1.0


def environment(model: nn.Module, *, count_experts: bool = False, sparse_path: str | None = None) -> dict:
    """Versions, threads, CPU, device, dtype, experts implementation, sparse path and the load average now
    (as `loadavg_start`; the runner adds `loadavg_end`)."""
    import transformers

    p = next(model.parameters())
    env = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "allocmoe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": str(p.device),
        "dtype": str(p.dtype).replace("torch.", ""),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "sparse_experts_path": sparse_path,
        "count_experts": bool(count_experts),
        "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        "loadavg_start": load_average(),
    }
    if p.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(p.device)
    return env


def set_experts_implementation(model: nn.Module, impl: str) -> None:
    """Select the experts implementation (`set_experts_implementation` when the model has it); "allocmoe"
    registers allocmoe's kernels with transformers first."""
    if impl == getattr(model.config, "_experts_implementation", None):
        return
    if impl == experts_fast.IMPL_NAME:
        experts_fast.register_experts_implementation()
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(impl)
        except (ValueError, ImportError, KeyError) as e:
            raise SettingsError(f"experts implementation {impl!r} is not available: {str(e).splitlines()[0]}",
                                param="experts_implementation") from None
    if getattr(model.config, "_experts_implementation", None) != impl:
        model.config._experts_implementation = impl  # the experts modules read the config on every call
