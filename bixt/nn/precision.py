"""Mixed precision (`--amp`): which autocast dtype a device gets, decided in one place for `train` and `profile`."""
from __future__ import annotations

import torch

CPU_REFUSAL = "--amp on this CPU needs bf16 support (AVX512-BF16 or AMX): run without --amp"


def cpu_supports_bf16() -> bool:
    """True where oneDNN runs bf16 natively on this processor (AVX512-BF16 or AMX).

    Without it autocast still 'works' on a CPU but emulates bf16 through fp32 conversions: slower than plain fp32,
    so `--amp` there would only lose accuracy and time.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:  # an op missing from this build reads as no support
            return False
    # Older builds without the probe: AVX512 is where oneDNN's bf16 kernels start.
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for `device`: bf16 on a CPU that has it (refuses otherwise); on CUDA bf16 where the GPU
    supports it (Ampere on), else fp16."""
    device = torch.device(device)
    if device.type == "cpu":
        if not cpu_supports_bf16():
            raise ValueError(CPU_REFUSAL)
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"--amp is for cpu or cuda, not {device.type}: run without --amp")
