"""The precision a run trains in when its config leaves ``trainer.precision`` unset: bf16 autocast
where the device multiplies bf16 natively, fp32 elsewhere.

On this project's development CPU (avx512_bf16) the nets train 1.4-1.6x faster in bf16, with fp32's
quality over three seeds on Fashion-MNIST and semi-supervised digits (each net's output layer and
batch norms, the codes, logits and losses stay fp32: ``nets.FullPrecision``); without bf16 units
autocast would emulate bf16 and run slower than fp32. A config or ``--trainer.precision`` still
forces either: `clustering.yaml` (K = 16, with the contrast term) sets fp32, where bf16 lost purity;
K = 10 with the same term gained in bf16 and sets none (README).
"""

import torch
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator

BF16 = "bf16-mixed"
FP32 = "32-true"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def training_device(accelerator: str | Accelerator) -> str:
    """``cuda``, ``cpu`` or ``other``: the device Lightning will pick for ``trainer.accelerator``
    (``auto`` takes a CUDA GPU where there is one, then Apple's MPS, then the CPU)."""
    if isinstance(accelerator, Accelerator):
        return "cuda" if isinstance(accelerator, CUDAAccelerator) else "cpu" if isinstance(accelerator, CPUAccelerator) else "other"
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available()):
        return "cpu"
    return "other"


def choose_precision(accelerator: str | Accelerator) -> tuple[str, str]:
    """The precision for a run on ``accelerator`` whose config sets none, and why, in words."""
    device = training_device(accelerator)
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return BF16, f"{torch.cuda.get_device_name()} has bf16"
    if device == "cpu" and cpu_has_bf16():
        return BF16, "this CPU has bf16 units (avx512_bf16 / AMX)"
    where = {"cuda": "this GPU", "cpu": "this CPU"}.get(device, "this accelerator")
    return FP32, f"{where} has no native bf16"
