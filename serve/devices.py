"""Which onnxruntime providers a ``--device`` means here: ``cuda`` that cannot be had is refused
with one line, ``auto`` takes the GPU when there is one."""

from __future__ import annotations

import os

import onnxruntime as ort

from rnnlm.errors import RnnlmError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")


def cuda_unavailable() -> str | None:
    """Why onnxruntime cannot run on a GPU here, or None when it can try."""
    if not gpu_present():
        return "no NVIDIA GPU on this machine"
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    return None


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for ``device``: ``cuda`` that cannot be had is refused (exit 2);
    ``auto`` takes the GPU when there is one."""
    if device == "cpu":
        return [CPU]
    if device not in ("auto", "cuda"):
        raise RnnlmError(f"--device must be auto, cpu or cuda, not {device!r}")
    reason = cuda_unavailable()
    if reason is None:
        return [CUDA, CPU]
    if device == "cuda":
        raise RnnlmError(f"--device cuda: {reason}; use --device cpu or auto")
    return [CPU]


def device_note(asked: str, providers: list[str], on_gpu: bool) -> str | None:
    """After the first session: refuse ``cuda`` when onnxruntime fell back to the CPU (say, CUDA
    libraries missing); for ``auto`` on a machine with a GPU, the one line that says why it runs on
    the CPU; otherwise None."""
    if CUDA in providers and not on_gpu:
        if asked == "cuda":
            raise RnnlmError("--device cuda: onnxruntime could not start its CUDA provider (are the CUDA and "
                             "cuDNN libraries installed?); use --device cpu or auto")
        return "--device auto: onnxruntime could not start its CUDA provider; running on the CPU"
    if asked == "auto" and not on_gpu and gpu_present():  # a GPU it cannot use; without one, CPU is no fallback
        return f"--device auto: {cuda_unavailable()}; running on the CPU"
    return None
