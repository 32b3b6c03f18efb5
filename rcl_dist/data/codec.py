"""Image files as arrays at their own bit depth: decoding with a pixel budget, PNG encoding, [0, 1] floats.

8-bit and 16-bit PNG (all 16 bits: Pillow alone reduces 16-bit RGB(A) PNGs to 8 bits, so
:func:`decode_image_bytes` runs Pillow's C inflate + unfilter twice, once per byte of each sample, see
:func:`_decode_png16`), TIFF through ``tifffile``, other formats through Pillow (a JPEG's EXIF
orientation applied). Every read goes through :func:`read_image` / :func:`decode_image_bytes`:
regular files only, at most :func:`rcl_dist.data.images.file_byte_limit` bytes, and at most the pixel
budget (:func:`rcl_dist.data.images.pixel_budget`) checked from the header before anything is decoded.
``rcl-dist denoise`` (:mod:`rcl_dist.denoise`) and the served model (:mod:`rcl_dist.registry`) use it.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from rcl_dist.data.images import (
    apply_orientation, check_pixels, exif_orientation, file_byte_limit, pixel_budget, read_regular_file, show_path,
)

__all__ = ["PNG_SIGNATURE", "decode_image_bytes", "read_image", "encode_png", "write_image", "to_float", "from_float"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}


# ---------------------------------------------------------------------------------------------- decoding
def _png_chunks(data: bytes):
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        if len(body) != n:
            raise ValueError("truncated PNG chunk")
        yield kind, body
        if kind == b"IEND":
            return
        pos += 12 + n


def _png_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from the IHDR chunk."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file (no IHDR chunk)")
    w, h, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return w, h, depth, ctype, interlace


def _decode_png16(data: bytes, budget: int) -> np.ndarray:
    """A 16-bit PNG as uint16 [H, W, C] with all 16 bits.

    Pillow maps 16-bit RGB/RGBA PNGs to 8-bit modes (keeping the high byte). Its zip decoder (inflate +
    PNG unfiltering, Adam7 included, in C) is public through ``Image.frombytes(mode, size, idat, "zip",
    rawmode, interlace)``; the unfiltering depends only on the bytes per pixel, which the raw mode
    gives. So: grey is read as ``I;16`` (exact); RGB/RGBA twice, with raw modes ``RGB;16B`` (each
    sample's first, big-endian high byte) and ``RGB;16L`` (its second byte: the low byte), and combined;
    grey+alpha (4 bytes per pixel) as 8-bit RGBA bytes, which are its high/low byte pairs.
    """
    from PIL import Image

    w, h, depth, ctype, interlace = _png_header(data)
    check_pixels(w, h, budget)  # before the inflate allocates h x w x 8 bytes
    if depth != 16 or ctype not in _PNG_CHANNELS:
        raise ValueError(f"_decode_png16: not a 16-bit grey/RGB PNG (depth {depth}, colour type {ctype})")
    idat = b"".join(body for kind, body in _png_chunks(data) if kind == b"IDAT")
    if not idat:
        raise ValueError("PNG without image data (no IDAT chunk)")
    size = (w, h)

    def frombytes(mode: str, rawmode: str) -> np.ndarray:
        return np.asarray(Image.frombytes(mode, size, idat, "zip", rawmode, interlace))

    if ctype == 0:
        return frombytes("I;16", "I;16B").astype(np.uint16)[..., None]
    if ctype == 4:
        b = frombytes("RGBA", "RGBA").astype(np.uint16)  # [G_hi, G_lo, A_hi, A_lo]
        return np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], axis=-1)
    mode = "RGB" if ctype == 2 else "RGBA"
    hi = frombytes(mode, f"{mode};16B").astype(np.uint16)
    lo = frombytes(mode, f"{mode};16L").astype(np.uint16)
    return hi << 8 | lo


def _pil_to_array(im) -> np.ndarray:
    """A Pillow image as uint8/uint16 [H, W, C] (C = 1, 2, 3 or 4)."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)  # apply (and drop) a camera's orientation tag
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(im).astype(np.uint16)[..., None]
    if mode in ("I", "F", "I;32", "I;32B"):
        raise ValueError(f"unsupported sample format (Pillow mode {mode!r}: 32-bit integer or float samples)")
    if mode in ("1", "L"):
        target = "L"
    elif mode in ("LA", "La"):
        target = "LA"
    elif mode in ("P", "PA"):
        target = "RGBA" if mode == "PA" or "transparency" in im.info else "RGB"
    elif mode in ("RGBA", "RGBa"):
        target = "RGBA"
    else:  # RGB, CMYK, YCbCr, LAB, HSV
        target = "RGB"
    a = np.asarray(im.convert(target))
    return a[..., None] if a.ndim == 2 else a


def _tiff_to_array(src: Any, budget: int) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(src) as tf:
        if not tf.series:
            raise ValueError("TIFF without images")
        series = tf.series[0]
        dims = dict(zip(series.axes, series.shape))
        pixels = math.prod(n for axis, n in zip(series.axes, series.shape) if axis != "S")  # every page counts
        width = max(1, dims.get("X", 1))
        check_pixels(width, -(-pixels // width), budget)  # from the tags, before any strip is decoded
        if str(getattr(series.pages[0], "photometric", "")).upper().endswith("PALETTE"):
            raise ValueError("palette TIFF images are not supported")
        axes, a = series.axes, series.asarray()
    if axes == "YX":
        a = a[..., None]
    elif axes == "SYX":
        a = np.moveaxis(a, 0, -1)
    elif axes != "YXS":
        raise ValueError(f"unsupported TIFF layout {axes!r} (expected one 2-D image: YX, YXS or SYX)")
    if a.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"unsupported TIFF sample type {a.dtype} (8- or 16-bit unsigned integers only)")
    if not 1 <= a.shape[-1] <= 4:
        raise ValueError(f"unsupported TIFF with {a.shape[-1]} samples per pixel (1-4)")
    return np.ascontiguousarray(a)


def decode_image_bytes(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file's bytes to uint8 or uint16 [H, W, C] (C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).

    16-bit PNG and TIFF keep 16 bits; everything else Pillow reads (JPEG, BMP, 1-8-bit PNG, WebP, ...)
    comes out as 8-bit. The header's width x height is checked against the pixel budget
    (:func:`rcl_dist.data.images.pixel_budget` of ``max_pixels``) before anything is decoded. Raises
    ``ValueError`` for data that is not a readable image or is over the budget.
    """
    from PIL import Image, UnidentifiedImageError

    budget = pixel_budget(max_pixels)
    try:
        png16 = False
        if data[:8] == PNG_SIGNATURE:
            w, h, depth, _ctype, _interlace = _png_header(data)
            check_pixels(w, h, budget)  # every PNG: before Pillow's or our inflate
            png16 = depth == 16
        if png16 or data[:4] in _TIFF_SIGNATURES:
            # our own decoders first (they enforce the pixel budget), then Pillow on the header only:
            # frames and orientation, applied as exif_transpose does on the 8-bit path
            a = _decode_png16(data, budget) if png16 else _tiff_to_array(io.BytesIO(data), budget)
            with Image.open(io.BytesIO(data)) as im:
                _single_frame(im)
                a = apply_orientation(a, exif_orientation(im))
        else:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                check_pixels(*im.size, budget)
                _single_frame(im)
                im.load()
                a = _pil_to_array(im)
    except ValueError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, met in Image.open before our check
        raise ValueError(f"too large: over the pixel budget of {budget} ({e})") from None
    except (OSError, UnidentifiedImageError, SyntaxError, EOFError, zlib.error, struct.error) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"not a 2-D image (decoded shape {a.shape})")
    return a


def _single_frame(im) -> None:
    """An animated PNG/GIF/WebP or a multi-page TIFF is refused (``data index`` rejects them too):
    which frame to restore is not for a reader to guess."""
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise ValueError(f"unsupported: {im.format} with {frames} frames (animated or multi-page); store one image per file")


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Read one image file as uint8/uint16 [H, W, C] keeping its bit depth (see :func:`decode_image_bytes`).

    Regular files only, size checked before reading, pixel budget checked from the header (see
    ``docs/denoise.md``, "Hostile files"). Raises ``ValueError`` naming the file when it cannot be read,
    is refused, or cannot be decoded."""
    budget = pixel_budget(max_pixels)
    try:
        data = read_regular_file(path, max_bytes=file_byte_limit(budget))
    except OSError as e:
        raise ValueError(f"{show_path(path)}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"{show_path(path)}: cannot read image: {e}") from None
    try:
        return decode_image_bytes(data, max_pixels=budget)
    except ValueError as e:
        raise ValueError(f"{show_path(path)}: cannot read image: {e}") from None


# ---------------------------------------------------------------------------------------------- encoding
def _png_filter(raw: np.ndarray, bpp: int, kind: int) -> np.ndarray:
    """PNG-filter every row of ``raw`` [H, row bytes] (uint8) with filter ``kind`` (0-4); vectorised
    (filtering uses the unfiltered neighbours, so unlike unfiltering it has no sequential dependency)."""
    if kind == 0:
        return raw
    x = raw.astype(np.int16)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    if kind == 1:
        pred = a
    elif kind == 2:
        pred = b
    elif kind == 3:
        pred = (a + b) // 2
    elif kind == 4:
        c = np.zeros_like(x)
        c[1:, bpp:] = x[:-1, :-bpp]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    else:
        raise ValueError(f"PNG filter type must be 0-4, got {kind!r}")
    return ((x - pred) % 256).astype(np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def encode_png(img: np.ndarray, *, filter_type: int = 4, level: int = 6) -> bytes:
    """PNG bytes of a uint8 or uint16 image [H, W] or [H, W, C] (C 1-4), same bit depth.

    8-bit images go through Pillow; 16-bit ones are written here (Pillow cannot write 16-bit RGB):
    non-interlaced, every row with ``filter_type`` (default 4, Paeth), zlib ``level``.
    """
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in _PNG_COLOR_TYPE or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"encode_png: expected [H, W] or [H, W, 1-4], got shape {img.shape}")
    h, w, c = a.shape
    if a.dtype == np.uint8:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a[..., 0] if c == 1 else a)).save(buf, format="PNG", compress_level=level)
        return buf.getvalue()
    if a.dtype != np.uint16:
        raise ValueError(f"encode_png: expected uint8 or uint16 samples, got {a.dtype}")
    raw = np.ascontiguousarray(a.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    filtered = _png_filter(raw, 2 * c, filter_type)
    rows = np.concatenate([np.full((h, 1), filter_type, dtype=np.uint8), filtered], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, _PNG_COLOR_TYPE[c], 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + _png_chunk(b"IEND", b"")
    )


def write_image(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write uint8/uint16 [H, W, C] to ``path`` by its suffix (.png; .tif/.tiff; 8-bit .bmp/.jpg/.jpeg),
    atomically (a temporary file in the same folder, then a rename). Returns the path."""
    p = Path(path)
    suffix = p.suffix.lower()
    a = np.asarray(img)
    if suffix in (".bmp", ".jpg", ".jpeg") and a.dtype != np.uint8:
        raise ValueError(f"{p}: {suffix} holds 8-bit images only; this image has {a.dtype} samples (use .png or .tif)")
    if suffix not in (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg"):
        raise ValueError(f"{p}: unsupported output suffix {p.suffix!r} (use .png, .tif, .tiff, .bmp or .jpg)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        if suffix == ".png":
            tmp.write_bytes(encode_png(a))
        elif suffix in (".tif", ".tiff"):
            import tifffile

            c = a.shape[-1]
            data = a[..., 0] if c == 1 else a
            tifffile.imwrite(tmp, data, photometric="rgb" if c >= 3 else "minisblack")
        else:
            from PIL import Image

            c = a.shape[-1]
            im = Image.fromarray(np.ascontiguousarray(a[..., 0] if c == 1 else a))
            if suffix in (".jpg", ".jpeg"):
                im.convert("RGB" if c >= 3 else "L").save(tmp, format="JPEG", quality=95)
            else:
                im.save(tmp, format="BMP")
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8/uint16 -> float32 in [0, 1] (divided by 255 / 65535); float input is returned as float32."""
    a = np.asarray(img)
    if a.dtype == np.uint8 or a.dtype == np.uint16:
        return a.astype(np.float32) / np.float32(np.iinfo(a.dtype).max)
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    raise ValueError(f"expected uint8, uint16 or float samples, got {a.dtype}")


def from_float(img: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """float in [0, 1] -> ``dtype`` (uint8 / uint16: clipped, scaled and rounded to nearest; float: clipped)."""
    dt = np.dtype(dtype)
    y = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if dt == np.uint8 or dt == np.uint16:
        return np.rint(y * np.float32(np.iinfo(dt).max)).astype(dt)
    return y.astype(dt)
