"""PSNR and SSIM (App. C.3, Eq. 16-17): one function used everywhere, scikit-image's implementations.

Images are float in [0, data_range]; the prediction is clipped to that range first, as a saved
8/16-bit image would be. Accepts torch tensors or numpy arrays, [C, H, W] / [B, C, H, W] (channel
first, the layout of the whole code base) or [H, W]; batches are averaged per image.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

__all__ = ["image_metrics"]


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pair_chw(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = _to_numpy(pred), _to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.ndim == 3:
        p, t = p[None], t[None]
    if p.ndim != 4:
        raise ValueError(f"expected [H, W], [C, H, W] or [B, C, H, W] images, got shape {p.shape}")
    return p, t  # [B, C, H, W]


def image_metrics(pred, target, data_range: float = 1.0) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over the images of a batch.

    ``skimage.metrics`` with explicit ``data_range`` and ``channel_axis`` (SSIM: the default 7x7
    uniform window; images smaller than 7 pixels on a side get the largest odd window that fits).
    """
    p, t = _pair_chw(pred, target)
    p = np.clip(p, 0.0, data_range)
    psnrs, ssims = [], []
    for pi, ti in zip(p, t):
        psnrs.append(peak_signal_noise_ratio(ti, pi, data_range=data_range))
        win = min(7, *ti.shape[1:])
        win -= 1 - win % 2  # odd
        ssims.append(
            structural_similarity(ti, pi, data_range=data_range, channel_axis=0, win_size=win)
        )
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
