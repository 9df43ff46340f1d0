"""An independent PyTorch transcription of DiffusionNFT's policy loss (REFERENCE §2), for cross-checks."""

from __future__ import annotations

import torch


def torch_nft_policy_loss(v, v_old, x_t, x0, t, r, beta: float, adv_clip_max: float, adaptive: bool = True):
    """Mean over the batch of ``adv_clip_max (r P + (1 - r) N) / beta``; any layout with batch first.

    ``adaptive``: the x0-space terms with the adaptive weights, computed in float64 under no_grad as the public code
    does; otherwise the plain velocity-space terms ``P = mean((v+ - v*)^2)`` against the flow target
    ``v* = (x_t - x0) / t`` (the velocity that maps ``x_t`` back to ``x0``).
    """
    te = t.view(-1, *([1] * (v.ndim - 1)))
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v
    dims = tuple(range(1, v.ndim))
    if not adaptive:
        target = (x_t - x0) / te.clamp(min=1e-5)
        p, n = ((pos - target) ** 2).mean(dim=dims), ((neg - target) ** 2).mean(dim=dims)
        return (adv_clip_max * (r * p / beta + (1 - r) * n / beta)).mean()
    x0_pos = x_t - te * pos
    x0_neg = x_t - te * neg
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
        w_neg = (x0_neg.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    p = ((x0_pos - x0) ** 2 / w_pos.float()).mean(dim=dims)
    n = ((x0_neg - x0) ** 2 / w_neg.float()).mean(dim=dims)
    return (adv_clip_max * (r * p / beta + (1 - r) * n / beta)).mean()
