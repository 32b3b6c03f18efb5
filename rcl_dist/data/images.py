"""Image sources: files in folders, the project's shared image sets, and images bundled with scikit-image.

Everything returns float32 arrays [C, H, W] in [0, 1] (RGB C=3 or grey C=1). Also the checks every
image reader shares (:func:`read_regular_file`, :func:`pixel_budget`, :func:`check_pixels`,
:func:`show_path`): regular files only, checked on the open descriptor (a FIFO named ``.png`` would
block ``open()`` forever, a link to ``/dev/zero`` would be read without end), and at most
:func:`pixel_budget` pixels per image (default :data:`DEFAULT_PIXEL_BUDGET`, 2**26;
``$RCL_DIST_MAX_PIXELS`` or ``--max-pixels``), checked from the header before anything is decoded:
restoring costs about 70 bytes a pixel. Details: ``docs/data.md``.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np

__all__ = [
    "load_image",
    "list_images",
    "bundled_images",
    "shared_data_dir",
    "tile",
    "IMAGE_SUFFIXES",
    "DEFAULT_PIXEL_BUDGET",
    "MAX_PIXELS_ENV",
    "pixel_budget",
    "check_pixels",
    "file_byte_limit",
    "read_regular_file",
    "show_path",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_PIXEL_BUDGET = 2**26  # 67 M pixels: a 50-megapixel camera frame fits, a 100000^2 header does not
MAX_PIXELS_ENV = "RCL_DIST_MAX_PIXELS"
_MAX_BYTES_PER_PIXEL = 8  # 16-bit RGBA: the largest uncompressed pixel a reader accepts
_HEADER_SLACK_BYTES = 16 << 20  # metadata beside the pixels (EXIF, ICC profiles, camera previews)


# ---------------------------------------------------------------------------------------------- shared checks
def show_path(path: str | os.PathLike | bytes) -> str:
    """``path`` as text that can always be printed and stored: bytes that are not UTF-8 (held as
    surrogates by ``os.listdir``/``os.walk``) and control characters become ``\\xNN`` escapes."""
    text = os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}") for c in text)


def pixel_budget(max_pixels: int | None = None) -> int:
    """The most pixels (width x height) one image may have: ``max_pixels`` when given, else
    ``$RCL_DIST_MAX_PIXELS`` (a whole number, ``64000000`` or ``64e6``), else :data:`DEFAULT_PIXEL_BUDGET`."""
    where = "max_pixels"
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_PIXEL_BUDGET
        where = f"${MAX_PIXELS_ENV}"
        try:
            max_pixels = float(text)
        except ValueError:
            raise ValueError(f"{where} must be a whole number of pixels >= 1, got {text[:40]!r}") from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, float)):
        raise ValueError(f"{where} must be a whole number of pixels >= 1, got {type(max_pixels).__name__}")
    if not (math.isfinite(max_pixels) and max_pixels >= 1 and max_pixels == int(max_pixels)):
        raise ValueError(f"{where} must be a whole number of pixels >= 1, got {max_pixels!r}")
    return int(max_pixels)


def check_pixels(width: int, height: int, budget: int) -> None:
    """``ValueError`` when a header's ``width x height`` is over ``budget`` (see :func:`pixel_budget`)."""
    if width * height > budget:
        raise ValueError(
            f"too large: {width}x{height} = {width * height} pixels, over the pixel budget of {budget} "
            f"(raise it with ${MAX_PIXELS_ENV} or --max-pixels)"
        )


def file_byte_limit(budget: int) -> int:
    """The largest image file accepted under a pixel budget: the budget's pixels uncompressed at the
    widest sample format read (16-bit RGBA), plus room for metadata."""
    return budget * _MAX_BYTES_PER_PIXEL + _HEADER_SLACK_BYTES


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"not a regular file ({kind}); only regular image files are read"


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (links followed), read once.

    The file is opened with ``O_NONBLOCK`` (opening a FIFO does not wait for a writer) and the open
    descriptor is checked: anything but a regular file (FIFO, device such as ``/dev/zero``, folder,
    socket) raises ``ValueError`` before a byte is read, and so does a size over ``max_bytes``.
    ``OSError`` (missing file, no permission, a link loop) is raised as it comes.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        why = _not_regular(st.st_mode)
        if why:
            raise ValueError(why)
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"too large: the file has {st.st_size} bytes, over the {max_bytes} that the pixel budget allows")
        f = open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # it grew while being read
        raise ValueError(f"too large: the file grew past {max_bytes} bytes while being read")
    return data


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


# EXIF orientation (tag 0x0112) -> the array operation that displays the image upright: what Pillow's
# ImageOps.exif_transpose and DALI's decoders (adjust_orientation=True) do; 5-8 swap width and height
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def exif_orientation(im) -> int:
    """The EXIF orientation (1-8) of an opened Pillow image, 1 when absent or unreadable."""
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block: take the pixels as stored
        return 1
    return value if value in range(1, 9) else 1


def apply_orientation(a: np.ndarray, orientation: int) -> np.ndarray:
    """``a`` ([H, W] or [H, W, C], as stored in the file) turned upright for EXIF ``orientation``."""
    return np.ascontiguousarray(_ORIENT[orientation](a)) if orientation in _ORIENT else a


def file_orientation(path_or_bytes) -> int:
    """:func:`exif_orientation` of a file (a path or its bytes), reading the header only."""
    import io

    from PIL import Image

    try:
        src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else os.fspath(path_or_bytes)
        with Image.open(src) as im:
            return exif_orientation(im)
    except Exception:  # not an image Pillow knows: the decoders report that themselves
        return 1


def load_image(path: str | os.PathLike, gray: bool | None = None) -> np.ndarray:
    """Read one image file; a file that cannot be decoded, or is not a regular file, raises ValueError naming it."""
    from skimage import io

    try:
        why = _not_regular(os.stat(path).st_mode)
    except OSError as e:
        raise ValueError(f"{show_path(path)}: cannot read image ({type(e).__name__}: {e.strerror or e})") from None
    if why:  # a FIFO would block imageio's open() forever, /dev/zero would be read without end
        raise ValueError(f"{show_path(path)}: {why}")
    try:
        img = io.imread(os.fspath(path))
    except Exception as e:  # decoders raise many types; the caller needs the file name
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    # imageio leaves a camera's orientation tag alone; DALI and the codec apply it: so does this reader
    return _to_chw_float(apply_orientation(np.asarray(img), file_orientation(path)), gray)


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
