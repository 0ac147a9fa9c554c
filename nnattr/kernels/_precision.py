"""Numerics shared by the kernels: float32 math even under a server's bf16 autocast."""

from __future__ import annotations

import torch


def no_autocast(x: torch.Tensor):
    """Autocast off on ``x``'s device: NDIF runs blocks under bf16 autocast, which would run our
    float32 matmuls in bf16."""
    device = x.device.type if torch.amp.is_autocast_available(x.device.type) else "cpu"
    return torch.autocast(device, enabled=False)
