"""Image sources: files in folders, the project's shared image sets, and images bundled with scikit-image.

Everything returns float32 arrays [C, H, W] in [0, 1] (RGB C=3 or grey C=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["load_image", "list_images", "bundled_images", "shared_data_dir", "tile", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# Natural photographs that ship inside scikit-image (no download): the offline fallback data set.
_BUNDLED_RGB = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
_BUNDLED_GRAY = ("camera", "coins", "moon", "page", "clock", "brick", "grass", "gravel", "cell")


def _to_chw_float(img: np.ndarray, gray: bool | None = None) -> np.ndarray:
    """uint8/uint16/bool/float HxW[xC] -> float32 [C, H, W] in [0, 1]; RGBA drops alpha."""
    if img.dtype == np.bool_:
        img = img.astype(np.float32)
    elif np.issubdtype(img.dtype, np.integer):
        img = img.astype(np.float32) / float(np.iinfo(img.dtype).max)
    else:
        img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 4:
        img = img[..., :3]
    if img.shape[-1] == 2:  # grey + alpha
        img = img[..., :1]
    if gray is True and img.shape[-1] == 3:
        img = (img @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32))[..., None]
    elif gray is False and img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def load_image(path: str | os.PathLike, gray: bool | None = None) -> np.ndarray:
    """Read one image file; a file that cannot be decoded raises ValueError naming it."""
    from skimage import io

    try:
        img = io.imread(os.fspath(path))
    except Exception as e:  # decoders raise many types; the caller needs the file name
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return _to_chw_float(np.asarray(img), gray)


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def bundled_images(gray: bool = False) -> list[np.ndarray]:
    """The natural photographs bundled with scikit-image, [C, H, W] float32."""
    import skimage.data

    names = _BUNDLED_GRAY if gray else _BUNDLED_RGB
    return [_to_chw_float(getattr(skimage.data, n)(), gray) for n in names]


def shared_data_dir() -> Path | None:
    """``$RCL_DIST_DATA`` or the ``shared/data`` folder beside the checkout, when present."""
    env = os.environ.get("RCL_DIST_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in here.parents[2:4]] + [Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), None)


def tile(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Cut images into non-overlapping size x size tiles (each tile then gets its own noise
    parameters: a few bundled photographs become enough distinct 'images' for a batch)."""
    out = []
    for img in images:
        _, h, w = img.shape
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                out.append(np.ascontiguousarray(img[:, y : y + size, x : x + size]))
    return out
