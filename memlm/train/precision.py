"""Compute precision: bf16 autocast on CUDA, plain float32 on CPU (weights stay float32)."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast context of `precision` (auto: bf16 on CUDA, fp32 elsewhere; bf16; fp32)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
