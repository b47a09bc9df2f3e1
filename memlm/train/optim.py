"""AdamW with weight decay on matrices and embeddings only (the nanoGPT rule).

Parameters with two or more dimensions (linear weights, embedding tables) are decayed;
vectors and scalars (biases, norm gains, the QK-norm scale) are not. Tied weights are one
parameter and land in one group once.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: parameters with dim >= 2 decayed, the rest not."""
    params = [p for p in model.parameters() if p.requires_grad]  # model.parameters() yields tied weights once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over `param_groups`, the fused kernel (CUDA and CPU): it takes a `found_inf` flag on the
    device and skips a non-finite step without the host reading anything (the Trainer relies on it)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=True)


def keep_fused(optimizer: torch.optim.AdamW) -> None:
    """Switch a loaded optimizer back to the fused kernel: a state dict written before memlm fused
    AdamW on the CPU carries `fused: False` in its groups, which `load_state_dict` restores, and the
    plain kernels refuse the Trainer's `found_inf`."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
