"""A task placed on GPUs stops before any work when it cannot use them (issue 23: no silent CPU fallback).

torch 2.13 from PyPI is a CUDA 13.0 build; on a 535/550/570 driver ``torch.cuda.is_available()`` is
false and every stage would run on the CPU while holding its GPUs. The driver floors are NVIDIA's
"CUDA Compatibility" Table 1 (CUDA 13.x >= 580, 12.x >= 525, 11.x >= 450,
https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html).
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path
from typing import Any

import pytest

from spo import cli
from spo.accelerator import GPUS_ENV, CudaProbe, driver_cuda_version, driver_version, require_placed_gpus
from spo.errors import GpuUnavailableError

REPO = Path(__file__).resolve().parents[1]


def _never() -> CudaProbe:
    raise AssertionError("a task placed on no GPU must not probe CUDA")


def test_a_task_placed_on_no_gpu_is_not_checked() -> None:
    require_placed_gpus({}, see=_never)
    require_placed_gpus({GPUS_ENV: ""}, see=_never)
    require_placed_gpus({GPUS_ENV: "0"}, see=_never)


def test_a_gpu_task_that_sees_its_gpus_starts() -> None:
    require_placed_gpus({GPUS_ENV: "8"}, see=lambda: CudaProbe("13.0", True, 8, "580.82.07", "13.0"))


def test_an_old_driver_names_what_it_found_what_the_image_needs_and_the_fix() -> None:
    # the common case the issue describes: a 550 driver (CUDA <= 12.4) under PyPI's CUDA 13.0 torch
    with pytest.raises(GpuUnavailableError) as err:
        require_placed_gpus({GPUS_ENV: "1"}, see=lambda: CudaProbe("13.0", False, 0, "550.127.05", "12.4"))
    message = str(err.value)
    for part in ("placed on 1 GPU", "driver 550.127.05", "supports CUDA up to 12.4", "built for CUDA 13.0",
                 "driver >= 580", "Turing", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126",
                 "docs/operations.md"):
        assert part in message, (part, message)


def test_a_cuda12_image_on_a_too_old_driver_names_the_cuda12_floor() -> None:
    with pytest.raises(GpuUnavailableError, match=r"built for CUDA 12\.6, which needs NVIDIA driver >= 525"):
        require_placed_gpus({GPUS_ENV: "2"}, see=lambda: CudaProbe("12.6", False, 0, "470.256.02", "11.4"))


def test_no_driver_in_the_container_says_the_pod_must_request_the_gpus() -> None:
    with pytest.raises(GpuUnavailableError, match="no NVIDIA driver is visible .*request the GPUs"):
        require_placed_gpus({GPUS_ENV: "1"}, see=lambda: CudaProbe("13.0", False, 0, None, None))


def test_fewer_devices_than_placed_is_refused_too() -> None:
    with pytest.raises(GpuUnavailableError, match="sees only 4"):
        require_placed_gpus({GPUS_ENV: "8"}, see=lambda: CudaProbe("13.0", True, 4, "580.82.07", "13.0"))


def test_a_cpu_image_on_a_gpu_pool_is_named() -> None:
    with pytest.raises(GpuUnavailableError, match="CPU build.*make image-cuda"):
        require_placed_gpus({GPUS_ENV: "1"}, see=lambda: CudaProbe(None, False, 0, None, None))


def test_a_malformed_mark_is_an_error_not_a_pass() -> None:
    with pytest.raises(GpuUnavailableError, match="not a number"):
        require_placed_gpus({GPUS_ENV: "all"}, see=_never)


@pytest.mark.parametrize("line, version", [
    # the proprietary and the open kernel module's first line of /proc/driver/nvidia/version
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.127.05  Tue Oct  8 03:22:07 UTC 2024", "550.127.05"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.82.07  Release Build  (dvs-builder@U16)",
     "580.82.07"),
])
def test_driver_version_from_proc(tmp_path: Path, line: str, version: str) -> None:
    proc = tmp_path / "version"
    proc.write_text(line + "\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    assert driver_version(proc, run=lambda *a, **k: pytest.fail("nvidia-smi asked although /proc answered")) == version


def test_driver_version_from_nvidia_smi_when_proc_has_none(tmp_path: Path) -> None:
    def smi(args: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert args[0] == "nvidia-smi"
        return subprocess.CompletedProcess(args, 0, stdout="570.86.15\n570.86.15\n", stderr="")

    assert driver_version(tmp_path / "absent", run=smi) == "570.86.15"

    def missing(args: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError("nvidia-smi")

    assert driver_version(tmp_path / "absent", run=missing) is None


def test_driver_cuda_version_decodes_cuDriverGetVersion() -> None:
    class FakeLibcuda:
        def cuDriverGetVersion(self, pointer: Any) -> int:
            pointer._obj.value = 12040
            return 0

    assert driver_cuda_version(load=lambda name: FakeLibcuda()) == "12.4"  # type: ignore[arg-type,return-value]

    def absent(name: str) -> ctypes.CDLL:
        raise OSError(f"{name}: cannot open shared object file")

    assert driver_cuda_version(load=absent) is None


def test_spo_stage_on_this_cpu_machine_refuses_a_gpu_placement_before_any_work(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The real probe: this machine's torch is a CPU build, so `spo prepare` placed on a GPU exits 2
    and writes nothing; unplaced, the same command runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("SPO_DATA_DIR", str(shared_data))
    monkeypatch.setenv(GPUS_ENV, "1")
    assert cli.main(["prepare"]) == 2
    assert "placed on 1 GPU" in caplog.text and "CPU build" in caplog.text
    assert not (tmp_path / "data").exists()
