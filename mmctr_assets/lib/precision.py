"""Numeric precision of CLIP inference and CTR training: the names, the fp16-needs-CUDA rule and
autocast, in one place so every stage accepts and refuses the same settings.

torch is imported only where a dtype is needed, so configuration code can check a setting cheaply.
"""

from __future__ import annotations

import contextlib

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device=None) -> None:
    """Raise ``ValueError`` for an unknown precision, or fp16 on a device other than CUDA.

    fp16 needs a GradScaler and CUDA kernels; on the CPU bf16 is the reduced precision that works.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if device is not None and precision == "fp16" and str(device).split(":")[0] != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device; the device is {device}. "
                         "Use 'bf16' or 'fp32' there.")


def torch_dtype(precision: str):
    """The autocast dtype of a precision name; None for fp32."""
    import torch

    check_precision(precision)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, precision: str):
    """Mixed precision by autocast (weights stay fp32); a no-op for fp32."""
    import torch

    device = torch.device(device)
    check_precision(precision, device)
    dtype = torch_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
