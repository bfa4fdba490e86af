"""A step placed on GPUs stops before working when it cannot use them.

torch falls back to the CPU without a word when CUDA is unavailable, and so does every stage
(``sft``'s ``use_cpu``, the trainer's gloo fallback, the reward model, the judge): on a node whose
driver is older than the image's CUDA build, a small run "succeeds" on the CPU while holding its
GPUs, and a 7B run crawls or is OOM-killed hours later. The compiler marks every task it places
on an accelerator with :data:`GPUS_ENV` (spo.kube.platform.place, and the TrainJob's pods in
spo.cluster.trainjob); :func:`require_placed_gpus` runs first in every stage entry point (``spo
<stage>`` and the KFP components' runtime) and, with the mark set, refuses to start unless torch
sees that many CUDA devices, naming the driver found, the CUDA version the image's torch needs,
the driver that version needs and what to change.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from spo.errors import GpuUnavailableError

# set by the compiler on tasks placed on an accelerator: how many devices the task was given
GPUS_ENV = "SPO_PLACED_GPUS"

# The minimum Linux driver of each CUDA major release under minor-version compatibility: NVIDIA,
# "CUDA Compatibility", Table 1 "CUDA Toolkit 11.x, 12.x, and 13.x Driver Version Ranges"
# (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html).
DRIVER_FLOOR = {13: 580, 12: 525, 11: 450}
# The oldest GPU generation each CUDA major release builds for: CUDA 13.0 dropped compute
# capability < 7.5 (Maxwell, Pascal, Volta; CUDA 13.0 release notes, "Deprecated or Dropped
# Architectures"), CUDA 12 still builds for 5.0+.
GPU_FLOOR = {13: "Turing (compute capability 7.5) or newer", 12: "Maxwell (compute capability 5.0) or newer"}


@dataclass(frozen=True)
class CudaProbe:
    """What the process can see of its GPUs (each part injectable, for tests)."""

    torch_cuda: str | None       # the CUDA version torch was built for; None: a CPU build
    available: bool               # torch.cuda.is_available()
    device_count: int             # torch.cuda.device_count()
    driver: str | None            # the kernel driver's version, e.g. 580.82.07; None: no driver visible
    driver_cuda: str | None       # the newest CUDA the driver supports (cuDriverGetVersion), e.g. 12.4


def driver_version(proc_version: Path = Path("/proc/driver/nvidia/version"),
                   run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> str | None:
    """The NVIDIA kernel driver's version: from /proc (mounted into GPU containers by the NVIDIA
    container toolkit), else ``nvidia-smi``; None when neither shows one."""
    try:
        match = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+\.\d+(?:\.\d+)?)", proc_version.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                  text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1] if out.returncode == 0 else []
    return first[0].strip() if first and first[0].strip() else None


def driver_cuda_version(load: Callable[[str], ctypes.CDLL] = ctypes.CDLL) -> str | None:
    """The newest CUDA version the installed driver supports (libcuda's ``cuDriverGetVersion``,
    e.g. 12040 -> "12.4"); None when libcuda cannot be loaded."""
    try:
        libcuda = load("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def probe() -> CudaProbe:
    """What this process sees now."""
    import torch

    available = torch.cuda.is_available()
    return CudaProbe(torch_cuda=torch.version.cuda, available=available,
                     device_count=torch.cuda.device_count() if available else 0,
                     driver=driver_version(), driver_cuda=driver_cuda_version())


def require_placed_gpus(env: Mapping[str, str] | None = None, see: Callable[[], CudaProbe] = probe) -> None:
    """Raise :class:`GpuUnavailableError` when the task was placed on GPUs (:data:`GPUS_ENV`) and
    torch cannot use as many; do nothing for a task placed on none."""
    env = os.environ if env is None else env
    placed = env.get(GPUS_ENV, "").strip()
    if not placed:
        return
    try:
        wanted = int(placed)
    except ValueError:
        raise GpuUnavailableError(f"{GPUS_ENV}={placed!r}: not a number of GPUs") from None
    if wanted < 1:
        return
    seen = see()
    if seen.available and seen.device_count >= wanted:
        return
    raise GpuUnavailableError(_explain(wanted, seen))


def _explain(wanted: int, seen: CudaProbe) -> str:
    head = f"this task was placed on {wanted} GPU(s) ({GPUS_ENV}={wanted}) but "
    if seen.torch_cuda is None:
        return (head + "the image's torch is a CPU build: run GPU steps on the CUDA image (`make image-cuda`, "
                "docs/images.md; the platform file's `image`)")
    major = int(seen.torch_cuda.split(".")[0])
    floor = DRIVER_FLOOR.get(major)
    needs = f"the image's torch is built for CUDA {seen.torch_cuda}" + (
        f", which needs NVIDIA driver >= {floor} and a {GPU_FLOOR[major]} GPU" if floor and major in GPU_FLOOR else "")
    if seen.available:
        return (head + f"torch sees only {seen.device_count}: check the pool's accelerator count and the node's "
                "device plugin (`kubectl describe node`, nvidia.com/gpu allocatable)")
    if seen.driver is None and seen.driver_cuda is None:
        return (head + f"no NVIDIA driver is visible in the container ({needs}): the node needs the driver and "
                "the NVIDIA container toolkit / GPU operator, and the pod must request the GPUs (the platform "
                "file's accelerator) so the device plugin mounts them")
    found = f"driver {seen.driver or 'unknown'}" + (f" (supports CUDA up to {seen.driver_cuda})" if seen.driver_cuda
                                                    else "")
    return (head + f"torch cannot use CUDA: found {found}; {needs}. Fix: upgrade the node's driver to >= "
            f"{floor or '?'} (docs/operations.md, \"Before you install\"), or build the CUDA image for the "
            "cluster's driver with `make image-cuda TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126` "
            "(docs/images.md) and set it as the platform file's image")
