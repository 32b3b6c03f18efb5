"""Classical denoisers a user would try first, with no training and no clean image: the floor a trained
model must clear.

Each estimates the noise level from the noisy image itself, as a user without ground truth would
(:func:`skimage.restoration.estimate_sigma`, Donoho & Johnstone 1994), then denoises: ``nlm``
(non-local means, Buades et al. 2005), ``wavelet`` (BayesShrink, Chang et al. 2000) or ``bm3d``
(Dabov et al. 2007; the ``bm3d`` package is free for non-commercial use only and not installed with
this product: ``pip install bm3d`` where its licence allows). The heteroscedastic noise of Eq. 8 has
no single sigma; these methods get the one the estimator reports. :class:`ClassicalDenoiser` has a
``restore`` like the trained networks, so :func:`rcl_dist.evaluate.evaluate_folder` and ``rcl-dist
evaluate --model classical:NAME`` measure it on the same fixed test inputs as every trained method.
Settings of each method: ``docs/classical.md``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["CLASSICAL_METHODS", "ClassicalDenoiser", "estimate_noise_sigma", "classical_denoise", "parse_classical"]

CLASSICAL_METHODS = ("nlm", "wavelet", "bm3d")
MIN_SIGMA = 1e-5  # below one 16-bit grey level (1.5e-5): the image is taken as clean
PREFIX = "classical:"


def estimate_noise_sigma(img: np.ndarray) -> float:
    """Noise standard deviation of an image [H, W, C] (or [H, W]) on its own value scale."""
    from skimage.restoration import estimate_sigma

    a = np.asarray(img, dtype=np.float64)
    return float(estimate_sigma(a, channel_axis=-1 if a.ndim == 3 else None, average_sigmas=True))


def classical_denoise(method: str, img: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """``method`` applied to one image [H, W, C] (C 1 or 3, values ~[0, 1]); ``sigma`` None: estimated."""
    if method not in CLASSICAL_METHODS:
        raise ValueError(f"unknown classical denoiser {method!r}; choose one of {CLASSICAL_METHODS}")
    a = np.asarray(img, dtype=np.float64)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image [H, W, 1 or 3], got shape {a.shape}")
    s = estimate_noise_sigma(a) if sigma is None else float(sigma)
    if s < MIN_SIGMA:  # a clean (or constant) image: nothing to remove (BM3D returns NaN at sigma ~1e-9)
        return a.astype(np.float32)
    rgb = a.shape[-1] == 3
    if method == "nlm":
        from skimage.restoration import denoise_nl_means

        out = denoise_nl_means(a, h=0.8 * s, sigma=s, fast_mode=True, patch_size=5, patch_distance=6, channel_axis=-1)
    elif method == "wavelet":
        from skimage.restoration import denoise_wavelet

        out = denoise_wavelet(a, sigma=s, channel_axis=-1, convert2ycbcr=rgb, method="BayesShrink", mode="soft",
                              rescale_sigma=True)  # fmt: skip
    else:
        try:
            import bm3d
        except ImportError:
            raise ImportError("classical:bm3d needs the bm3d package (free for non-commercial use only, so not "
                              "installed with rcl_dist): pip install bm3d") from None  # fmt: skip
        out = bm3d.bm3d_rgb(a, s) if rgb else bm3d.bm3d(a[..., 0], s)[..., None]
    out = np.asarray(out, dtype=np.float32).reshape(a.shape)
    if not np.isfinite(out).all():
        raise ValueError(f"{method} returned non-finite values (estimated sigma {s:.3g})")
    return out


class ClassicalDenoiser(nn.Module):
    """``restore(x)`` of a classical method on a batch [B, C, H, W], one image (and one sigma) at a time."""

    raw = None

    def __init__(self, method: str, sigma: float | None = None) -> None:
        super().__init__()
        if method not in CLASSICAL_METHODS:
            raise ValueError(f"unknown classical denoiser {method!r}; choose one of {CLASSICAL_METHODS}")
        if sigma is not None and not (np.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0 or None (estimated), got {sigma!r}")
        self.method, self.sigma = method, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.restore(x)

    @torch.no_grad()
    def restore(self, x: torch.Tensor) -> torch.Tensor:
        imgs = x.detach().float().cpu().numpy().transpose(0, 2, 3, 1)  # [B, H, W, C]
        out = np.stack([classical_denoise(self.method, im, self.sigma) for im in imgs])
        return torch.from_numpy(out.transpose(0, 3, 1, 2).copy()).to(x.device, x.dtype)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, sigma={'estimated' if self.sigma is None else self.sigma}"


def parse_classical(model: str) -> ClassicalDenoiser | None:
    """``"classical:nlm"`` (``classical:NAME``) -> its denoiser; any other string -> None."""
    s = str(model)
    if not s.startswith(PREFIX):
        return None
    return ClassicalDenoiser(s[len(PREFIX):])
