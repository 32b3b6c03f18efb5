"""Noise model of the paper: heteroscedastic Gaussian (NLF) noise, its parameter samplers, and Bayer RAW.

Images are float tensors in [0, 1], laid out [B, C, H, W]. Every random draw takes an explicit
``torch.Generator`` so that a sample is a pure function of its inputs and the generator state
(the DALI pipelines of ``rcl_dist.data`` use the same formulas with their own RNG).

Equations (numbers as in Dong et al., IJCAI 2022, ``shared/paper/rcl-paper.txt``):

* Eq. 8   n_i ~ N(0, lambda_shot * x_i + lambda_read)                 -> :func:`add_nlf_noise`
* Eq. 14-15  sqrt(lambda_shot), sqrt(lambda_read) ~ U(a, b),
  a = sigma_min / sqrt(2), b = sigma_max / sqrt(2)                       -> :func:`sample_nlf_uniform`
* Eq. 12-13  log lambda_shot ~ U(log 0.001, log 0.12),
  log lambda_read ~ N(2.18 log lambda_shot + 1.2, 0.26)                  -> :func:`sample_nlf_brooks`
* App. B.2 / C.2 RGGB mosaic and its packed form, and bilinear demosaicing -> :func:`mosaic`, :func:`demosaic_bilinear`
  (the classical baseline for the JDD task; T of Eq. 11 is in :mod:`rcl_dist.losses.consistency`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "NoiseParams",
    "sample_nlf_uniform",
    "sample_nlf_brooks",
    "sample_nlf",
    "nlf_variance",
    "add_nlf_noise",
    "mosaic",
    "pack_bayer",
    "unpack_bayer",
    "demosaic_bilinear",
    "BAYER_PATTERN",
]

# RGGB: the colour (0=R, 1=G, 2=B) at offsets (row % 2, col % 2).
BAYER_PATTERN: tuple[tuple[int, int], ...] = ((0, 1), (1, 2))
# Order of the four planes of the packed form: R, G (on the red row), G (on the blue row), B.
_PACK_OFFSETS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))


@dataclass(frozen=True)
class NoiseParams:
    """Per-image NLF parameters, each a float tensor of shape [B]."""

    shot: torch.Tensor
    read: torch.Tensor

    def __post_init__(self) -> None:
        if self.shot.shape != self.read.shape or self.shot.dim() != 1:
            raise ValueError(
                f"NoiseParams: shot and read must be 1-D of equal length, got {tuple(self.shot.shape)} "
                f"and {tuple(self.read.shape)}"
            )

    def __len__(self) -> int:
        return self.shot.shape[0]


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    if not (0.0 <= sigma_min <= sigma_max):
        raise ValueError(f"need 0 <= sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def sample_nlf_uniform(
    n: int, sigma_min: float = 0.0, sigma_max: float = 20.0 / 255.0, *, generator: torch.Generator | None = None
) -> NoiseParams:
    """App. C.1, Eq. 14-15: sqrt(lambda_shot), sqrt(lambda_read) ~ U(sigma_min/sqrt 2, sigma_max/sqrt 2).

    sigma is on the image's scale: the paper's sigma in [0, 20] on 0-255 is the default [0, 20/255] here.
    With x in [0, 1] the total variance lambda_shot*x + lambda_read then stays within sigma_max**2, and
    the two parameters are drawn independently (no log-linear camera relation), so each image gets its
    own, approximately unique, pair (the paper's one-to-one mapping between images and noise).
    """
    _check_sigma_range(sigma_min, sigma_max)
    a, b = sigma_min / math.sqrt(2.0), sigma_max / math.sqrt(2.0)
    u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    root = a + (b - a) * u  # [2, n]: sqrt(lambda_shot), sqrt(lambda_read)
    lam = (root**2).to(torch.float32)
    return NoiseParams(shot=lam[0], read=lam[1])


def sample_nlf_brooks(
    n: int,
    shot_min: float = 0.001,
    shot_max: float = 0.12,
    slope: float = 2.18,
    intercept: float = 1.2,
    read_log_std: float = 0.26,
    *,
    generator: torch.Generator | None = None,
) -> NoiseParams:
    """Brooks et al. (2019) sampler, Eq. 12-13 as printed in the paper.

    log lambda_shot ~ U(log shot_min, log shot_max); log lambda_read ~ N(slope*log lambda_shot + intercept,
    read_log_std) with read_log_std the standard deviation (as in Brooks et al.'s code).
    """
    if not (0.0 < shot_min <= shot_max):
        raise ValueError(f"need 0 < shot_min <= shot_max, got shot_min={shot_min}, shot_max={shot_max}")
    if read_log_std < 0:
        raise ValueError(f"read_log_std must be >= 0, got {read_log_std}")
    lo, hi = math.log(shot_min), math.log(shot_max)
    log_shot = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    log_read = slope * log_shot + intercept + read_log_std * torch.randn(n, generator=generator, dtype=torch.float64)
    return NoiseParams(shot=log_shot.exp().float(), read=log_read.exp().float())


def sample_gaussian(
    n: int, sigma_min: float = 0.0, sigma_max: float = 55.0 / 255.0, *, generator: torch.Generator | None = None
) -> NoiseParams:
    """Plain (homoscedastic) Gaussian noise, the special case lambda_shot = 0 of Eq. 8:
    sigma ~ U(sigma_min, sigma_max), lambda_read = sigma^2 (a blind Gaussian denoiser's training noise;
    sigma_min = sigma_max for one fixed level)."""
    _check_sigma_range(sigma_min, sigma_max)
    sigma = sigma_min + (sigma_max - sigma_min) * torch.rand(n, generator=generator, dtype=torch.float64)
    return NoiseParams(shot=torch.zeros(n, dtype=torch.float32), read=(sigma**2).to(torch.float32))


SAMPLERS = {"uniform": sample_nlf_uniform, "brooks": sample_nlf_brooks, "gaussian": sample_gaussian}


def sample_nlf(name: str, n: int, *, generator: torch.Generator | None = None, **options: float) -> NoiseParams:
    """Draw ``n`` parameter pairs with the sampler ``name`` ("uniform": App. C.1, "brooks": Eq. 12-13)."""
    try:
        sampler = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown noise sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return sampler(n, generator=generator, **options)


def _per_image(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a [B] tensor of per-image values against x [B, C, H, W]."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.dim() == 0:
        return v
    if v.dim() != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"per-image parameter of shape {tuple(v.shape)} does not match batch of {x.shape[0]}")
    return v.view(-1, *([1] * (x.dim() - 1)))


def nlf_variance(clean: torch.Tensor, shot: torch.Tensor | float, read: torch.Tensor | float) -> torch.Tensor:
    """Eq. 8 variance lambda_shot * x + lambda_read, clamped at 0 (x may dip below 0 after resampling)."""
    return (_per_image(shot, clean) * clean + _per_image(read, clean)).clamp_min(0.0)


def add_nlf_noise(
    clean: torch.Tensor,
    params: NoiseParams,
    *,
    generator: torch.Generator | None = None,
    clip: bool = False,
) -> torch.Tensor:
    """Eq. 8: x = y + n, n ~ N(0, lambda_shot * y + lambda_read), one (shot, read) pair per image.

    ``clean`` is [B, C, H, W] (or [C, H, W] with one pair). The result is not clipped by default: clipping
    to [0, 1] would bias the noise distribution near black and white, which the residual distances see.
    """
    squeeze = clean.dim() == 3
    y = clean.unsqueeze(0) if squeeze else clean
    if y.dim() != 4:
        raise ValueError(f"clean must be [B, C, H, W] or [C, H, W], got shape {tuple(clean.shape)}")
    if len(params) != y.shape[0]:
        raise ValueError(f"{len(params)} noise parameter pairs for a batch of {y.shape[0]} images")
    std = nlf_variance(y, params.shot, params.read).sqrt()
    eps = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    x = y + std * eps
    if clip:
        x = x.clamp(0.0, 1.0)
    return x.squeeze(0) if squeeze else x


def _check_even(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what}: expected [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"{what}: height and width must be even for a 2x2 Bayer pattern, got {tuple(x.shape[-2:])}")


def mosaic(rgb: torch.Tensor) -> torch.Tensor:
    """RGGB Bayer mosaic (App. B.2, C.2): [B, 3, H, W] RGB -> [B, 1, H, W] RAW, one colour kept per pixel."""
    _check_even(rgb, "mosaic")
    if rgb.shape[1] != 3:
        raise ValueError(f"mosaic: expected 3 colour channels, got {rgb.shape[1]}")
    raw = torch.empty_like(rgb[:, :1])
    for dy in (0, 1):
        for dx in (0, 1):
            c = BAYER_PATTERN[dy][dx]
            raw[:, 0, dy::2, dx::2] = rgb[:, c, dy::2, dx::2]
    return raw


def pack_bayer(raw: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] mosaic -> [B, 4, H/2, W/2] planes (R, G_r, G_b, B): the paper's footnote 7 layout."""
    _check_even(raw, "pack_bayer")
    if raw.shape[1] != 1:
        raise ValueError(f"pack_bayer: expected a 1-channel mosaic, got {raw.shape[1]} channels")
    return torch.stack([raw[:, 0, dy::2, dx::2] for dy, dx in _PACK_OFFSETS], dim=1)


def unpack_bayer(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bayer`: [B, 4, H/2, W/2] -> [B, 1, H, W]."""
    if packed.dim() != 4 or packed.shape[1] != 4:
        raise ValueError(f"unpack_bayer: expected [B, 4, h, w], got shape {tuple(packed.shape)}")
    b, _, h, w = packed.shape
    raw = packed.new_empty(b, 1, 2 * h, 2 * w)
    for plane, (dy, dx) in enumerate(_PACK_OFFSETS):
        raw[:, 0, dy::2, dx::2] = packed[:, plane]
    return raw


def _bayer_masks(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[1, 3, H, W] indicator of where each colour was sampled."""
    m = torch.zeros(1, 3, h, w, dtype=dtype, device=device)
    for dy in (0, 1):
        for dx in (0, 1):
            m[0, BAYER_PATTERN[dy][dx], dy::2, dx::2] = 1.0
    return m


# Per colour: R and B (sampled on a 2x2 lattice) use the tent kernel, G (a quincunx) the cross kernel.
_TENT = [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
_CROSS = [[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]]
_BILINEAR_KERNELS = torch.tensor([[_TENT], [_CROSS], [_TENT]])  # [3, 1, 3, 3]


def demosaic_bilinear(raw: torch.Tensor) -> torch.Tensor:
    """Bilinear demosaicing: [B, 1, H, W] RGGB -> [B, 3, H, W] (the classical linear-interpolation baseline).

    Normalised convolution: each colour plane, zero where not sampled, is convolved with its 3x3 kernel
    (tent for R and B, cross for G) and divided by the convolved sampling mask. In the interior this is exactly the classic
    bilinear demosaic (R/B: mean of 2 or 4 neighbours, G: mean of 4); at the borders it averages the
    neighbours that exist instead of inventing padded ones. Sampled pixels are returned unchanged.
    """
    _check_even(raw, "demosaic_bilinear")
    if raw.shape[1] != 1:
        raise ValueError(f"demosaic_bilinear: expected a 1-channel mosaic, got {raw.shape[1]} channels")
    _, _, h, w = raw.shape
    masks = _bayer_masks(h, w, raw.dtype, raw.device)  # [1, 3, H, W]
    k = _BILINEAR_KERNELS.to(dtype=raw.dtype, device=raw.device)
    num = F.conv2d(raw * masks, k, padding=1, groups=3)  # [B, 3, H, W]
    den = F.conv2d(masks, k, padding=1, groups=3)  # [1, 3, H, W], > 0 everywhere
    return num / den
