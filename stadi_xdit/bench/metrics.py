"""PSNR and SSIM in plain torch, for latents (any channel count) and decoded images.

Both take the *reference* (single-rank output) first; its value range sets the data range unless
one is given (latents have no fixed range; images in [0, 1] use ``data_range=1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _range_of(reference: torch.Tensor, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    span = float(reference.max() - reference.min())
    return span if span > 0 else 1.0


def psnr(reference: torch.Tensor, other: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical tensors."""
    reference, other = reference.double(), other.double()
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    mse = float(((reference - other) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(_range_of(reference, data_range) ** 2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = torch.outer(g, g)
    return window.expand(channels, 1, size, size).contiguous()


def ssim(reference: torch.Tensor, other: torch.Tensor, data_range: float | None = None,
         window_size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1=0.01, K2=0.03).

    Inputs are (C, H, W), (B, C, H, W) or video (B, C, F, H, W), whose frames are compared as images;
    each channel is compared on its own. The window shrinks to the image for small latents (odd size,
    at least 3).
    """
    reference, other = reference.double(), other.double()
    if reference.shape != other.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    if reference.dim() == 3:
        reference, other = reference[None], other[None]
    if reference.dim() == 5:  # frames into the batch: (B * F, C, H, W)
        reference, other = (x.transpose(1, 2).flatten(0, 1) for x in (reference, other))
    if reference.dim() != 4:
        raise ValueError("ssim expects (C, H, W) or (B, C, H, W) tensors")
    size = min(window_size, reference.shape[-1], reference.shape[-2])
    size = max(3, size - (1 - size % 2))
    channels = reference.shape[1]
    window = _gaussian_window(size, sigma, channels)
    c1 = (0.01 * _range_of(reference, data_range)) ** 2
    c2 = (0.03 * _range_of(reference, data_range)) ** 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_x, mu_y = blur(reference), blur(other)
    var_x = blur(reference * reference) - mu_x**2
    var_y = blur(other * other) - mu_y**2
    cov = blur(reference * other) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())
