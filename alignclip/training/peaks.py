"""Peak dense FLOP/s of the accelerators we train on, the denominator of MFU.

Figures from NVIDIA's datasheets, dense (the datasheets' headline tensor-core figures are "with sparsity", twice
these). ``fp32`` is the plain FP32 rate: PyTorch runs fp32 matmuls without TF32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set. A device that is not in the table (a CPU, a GPU we have no figure
for) has no peak: MFU is then not reported unless ``fast_path.peak_tflops`` (or ``--peak-tflops``) names one.
"""

from __future__ import annotations

from typing import Optional

# device-name marker (checked in this order, against torch.cuda.get_device_name()) -> TFLOP/s by precision
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp32": 60.0},
    "GH200": {"bf16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp32": 66.9},  # the H100 SXM's compute with more and faster HBM
    "H100": {"bf16": 989.4, "fp32": 66.9},  # SXM5 ("NVIDIA H100 80GB HBM3")
    "A100": {"bf16": 312.0, "fp32": 19.5},
}


def lookup_peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The table's peak for a device name such as "NVIDIA H100 80GB HBM3", or None when it has no entry."""
    for marker, peaks in PEAK_TFLOPS.items():
        if marker.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or device.type


def peak_tflops(device, precision: str, override: float = 0.0) -> Optional[float]:
    """``override`` (> 0) wins; else the table's figure for a CUDA device; else None (CPUs, unknown GPUs)."""
    import torch

    if override and override > 0:
        return float(override)
    if torch.device(device).type != "cuda":
        return None
    return lookup_peak_tflops(device_name(device), precision)
