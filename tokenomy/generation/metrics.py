"""Quality metrics on local features: Fréchet distance, unbiased KID with its spread, PSNR."""
from __future__ import annotations

import numpy as np
import torch


def psnr(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    from scipy import linalg

    a, b = features_a.double().numpy(), features_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 20, subset_size: int = 200,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets (KID)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = features_a.double(), features_b.double()
    dim, size = a.shape[1], min(subset_size, a.shape[0], b.shape[0])
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:size]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:size]]
        k_xx, k_yy, k_xy = [(u @ v.t() / dim + 1) ** 3 for u, v in ((x, x), (y, y), (x, y))]
        off = 1 - torch.eye(size, dtype=torch.float64)
        mmd = (k_xx * off).sum() / (size * (size - 1)) + (k_yy * off).sum() / (size * (size - 1)) - 2 * k_xy.mean()
        values.append(float(mmd))
    return float(np.mean(values)), float(np.std(values))
