"""Denoise image files with a fine-tuned model: ``rcl-dist denoise``, and the image codec the served model uses.

:func:`denoise_paths` (CLI: :func:`main_denoise`) restores image files and folders with a model given as
a checkpoint (file or folder holding ``state.pt``) or an MLflow model URI (``models:/NAME@alias``,
``models:/NAME/3``, ``runs:/RUN/denoiser``, or a local MLflow model folder; see
:func:`rcl_dist.registry.load_denoiser`). Inference is tiled (:func:`rcl_dist.evaluate.tiled_restore`),
so the network's memory is bounded by the tile size, not the image size.

Files and bit depth
-------------------
* Folders are read non-recursively; files with the suffixes of :data:`rcl_dist.data.images.IMAGE_SUFFIXES`
  are taken in sorted order. A file given by name is read whatever its suffix.
* The output keeps the input's sample depth: 8-bit in, 8-bit out; 16-bit in, 16-bit out. 16-bit PNGs are
  read with all 16 bits (Pillow alone reduces 16-bit RGB(A) PNGs to 8 bits; :func:`decode_image_bytes`
  runs Pillow's C inflate + unfilter twice, once per byte of each sample, see :func:`_decode_png16`),
  and written by :func:`encode_png`. TIFF (8/16-bit) goes through ``tifffile``.
* Output format: PNG in, PNG out; TIFF in, TIFF out (same suffix); BMP in, BMP out; JPEG (and
  anything else) in, **PNG out** (lossless: a JPEG re-encoding would add its own artefacts to the
  restored image). A JPEG's EXIF orientation is applied before restoring. Images with less than 8 bits
  per sample (1/2/4-bit PNG, palette images) come out as 8-bit. Metadata (ICC profiles, EXIF, text
  chunks) is not copied.
* Channels: grey stays grey, RGB stays RGB; an alpha channel is passed through unchanged. A grey image
  through an RGB model is restored as 3 equal channels and averaged back; an RGB image through a grey
  model is restored channel by channel. RAW-input (``jdd``) models cannot denoise image files.

Where outputs go
----------------
``out`` is a folder (created when missing) receiving ``<stem><suffix>`` for every input file, flat;
with exactly one input file and an ``out`` that has an image suffix, ``out`` is the output file.
Nothing is written when an output would resolve to an input file (``out`` is the input folder and the
names are the same, or a link to it): the error says which file and asks for another ``out``; two
inputs with the same output name are refused the same way. Each output is written to a temporary name
and renamed, so an interrupted run never leaves a half-written image.

**The overwrite rule**: an existing file is replaced only if this command wrote it, in this run or an
earlier one, and it has not changed since. Every output folder holds a record of what the command
wrote there (:data:`OUTPUT_RECORD`, JSON: name -> size and modification time); an existing output
that is not in the record, or no longer matches it (a user's own ``x.png``, a file edited since, a
link), is left alone and reported as a failure of that input, naming the file; ``overwrite=True``
(``--overwrite``) replaces it anyway. A missing or unreadable record means nothing is replaced.

Hostile files
-------------
Every image goes through :func:`read_image`: regular files only (a FIFO, ``/dev/zero`` or a folder
named ``.png`` is refused before a byte is read, see :func:`rcl_dist.data.images.read_regular_file`),
at most :func:`rcl_dist.data.images.file_byte_limit` bytes, and at most the pixel budget
(:func:`rcl_dist.data.images.pixel_budget`: ``max_pixels``, ``--max-pixels``, ``$RCL_DIST_MAX_PIXELS``,
default 2**26) checked from the header before anything is decoded, for every format (PNG and TIFF
headers read here, the others through Pillow's lazy ``Image.open``; Pillow's own
``DecompressionBombError`` is reported the same way). The served model (:mod:`rcl_dist.registry`)
decodes requests with the same function.

Failures
--------
A file that cannot be read or decoded, or is refused by the rules above, is reported on stderr
(``denoise: [i/n] FILE: FAILED: reason``) and in the returned ``failed`` list; the other files are still
done. Errors about the whole command (model not found, ``out`` refused, bad tile/overlap/budget) raise
``ValueError`` / ``FileNotFoundError`` before any image is processed.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rcl_dist.data.images import (
    IMAGE_SUFFIXES,
    check_pixels,
    file_byte_limit,
    pixel_budget,
    read_regular_file,
    show_path,
)

__all__ = [
    "decode_image_bytes",
    "read_image",
    "encode_png",
    "write_image",
    "to_float",
    "from_float",
    "restore_array",
    "load_restorer",
    "output_suffix",
    "plan_outputs",
    "denoise_paths",
    "main_denoise",
    "OUTPUT_RECORD",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}
_KEEP_SUFFIX = {".png": ".png", ".tif": ".tif", ".tiff": ".tiff", ".bmp": ".bmp"}
OUTPUT_RECORD = ".rcl-denoise-outputs.json"  # in every output folder: the files this command wrote there
_MODEL_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/", "file:/", "s3://", "gs://", "wasbs://", "hdfs://", "dbfs:/")


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
        if png16:
            a = _decode_png16(data, budget)
        elif data[:4] in _TIFF_SIGNATURES:
            a = _tiff_to_array(io.BytesIO(data), budget)
        else:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                check_pixels(*im.size, budget)
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


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Read one image file as uint8/uint16 [H, W, C] keeping its bit depth (see :func:`decode_image_bytes`).

    Regular files only, size checked before reading, pixel budget checked from the header (see the
    module docstring, "Hostile files"). Raises ``ValueError`` naming the file when it cannot be read,
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


# ---------------------------------------------------------------------------------------------- restoring
def restore_array(model: Any, img: np.ndarray, *, tile: int = 256, overlap: int = 32) -> np.ndarray:
    """Restore one float image [H, W, C] (C 1-4, values in [0, 1]) with ``model`` (a Restorer), tiled.

    Returns float32 [s*H, s*W, C] clipped to [0, 1] (s: the model's output/input scale, 1 for
    denoisers). Alpha (C = 2 or 4) is passed through (repeated s x s when s > 1); grey/RGB
    mismatches with the model are handled as the module docstring says.
    """
    import torch

    from rcl_dist.evaluate import model_gray, model_scale, tiled_restore

    a = np.asarray(img, dtype=np.float32)
    if a.ndim != 3 or not 1 <= a.shape[-1] <= 4:
        raise ValueError(f"expected an image [H, W, C] with C in 1..4, got shape {a.shape}")
    if getattr(model, "raw", None) is not None:
        raise ValueError(f"a RAW-input model (raw={model.raw!r}) cannot restore RGB/grey images")
    c = a.shape[-1]
    colour = a[..., :3] if c >= 3 else a[..., :1]
    alpha = a[..., 3:] if c == 4 else (a[..., 1:] if c == 2 else None)
    x = torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)))[None]  # [1, c, H, W]
    gray_model = model_gray(model)
    scale = model_scale(model)
    if x.shape[1] == 1 and not gray_model:
        y = tiled_restore(model, x.expand(1, 3, *x.shape[-2:]), tile=tile, overlap=overlap, scale=scale)
        y = y.mean(dim=1, keepdim=True)
    elif x.shape[1] == 3 and gray_model:
        y = tiled_restore(model, x.transpose(0, 1), tile=tile, overlap=overlap, scale=scale).transpose(0, 1)
    else:
        y = tiled_restore(model, x, tile=tile, overlap=overlap, scale=scale)
    out = y[0].clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
    if alpha is not None:
        if scale > 1:
            alpha = np.repeat(np.repeat(alpha, scale, axis=0), scale, axis=1)
        out = np.concatenate([out, alpha], axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _is_model_uri(model: str) -> bool:
    s = str(model)
    if s.startswith(_MODEL_URI_PREFIXES):
        return True
    p = Path(s)
    return p.is_dir() and (p / "MLmodel").is_file()  # a local MLflow model folder


def load_restorer(model: str | os.PathLike, *, tracking_uri: str | None = None, device: str | None = None):
    """The torch Restorer behind ``model``: an MLflow model URI (the checkpoint inside the registered
    pyfunc model, see :func:`rcl_dist.registry.load_denoiser`) or a checkpoint file/folder.

    Raises ``ValueError`` for an unknown model URI or a RAW-input model, ``FileNotFoundError`` for a
    missing checkpoint path.
    """
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_model_uri(str(model)):
        from rcl_dist.registry import restorer_from_uri

        net = restorer_from_uri(str(model), tracking_uri=tracking_uri).to(dev)
    else:
        from rcl_dist.models.io import checkpoint_file, load_checkpoint

        checkpoint_file(model)  # FileNotFoundError naming the path
        net, _cfg, _state = load_checkpoint(model, map_location=dev)
    if getattr(net, "raw", None) is not None:
        raise ValueError(f"{model}: a RAW-input model (raw={net.raw!r}) cannot denoise image files")
    net.eval()
    return net


# ---------------------------------------------------------------------------------------------- planning
def output_suffix(input_path: str | os.PathLike) -> str:
    """The output suffix for an input file: .png/.tif/.tiff/.bmp kept (lower case), anything else .png."""
    return _KEEP_SUFFIX.get(Path(input_path).suffix.lower(), ".png")


def _expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]], bool]:
    """(files in order, [(input, reason)] for inputs that give no file, whether any input was a folder)."""
    from rcl_dist.data.images import list_images

    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    any_folder = False
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            any_folder = True
            found = list_images(p)
            if not found:
                missing.append((p, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"))
            files.extend(found)
        elif p.exists():  # a regular file, or a FIFO / device that read_image refuses with its reason
            files.append(p)
        else:
            missing.append((p, "no such file or folder"))
    return files, missing, any_folder


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def plan_outputs(files: Sequence[Path], out: str | os.PathLike, *, single_file: bool = False) -> list[tuple[Path, Path]]:
    """[(input, output)] for ``files`` into ``out`` (a folder, or the output file when ``single_file``).

    Raises ``ValueError`` when an output would overwrite an input file, when two inputs would get the
    same output, or when ``out`` is an existing file but a folder is needed.
    """
    out_p = Path(out)
    if single_file:
        pairs = [(files[0], out_p)]
    else:
        if out_p.exists() and not out_p.is_dir():
            raise ValueError(f"out {out_p}: exists and is not a folder (with several inputs, out is a folder)")
        pairs = [(f, out_p / (f.stem + output_suffix(f))) for f in files]
    resolved_inputs = {f.resolve(): f for f in files}
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        r = dst.resolve()
        clash = resolved_inputs.get(r)
        if clash is None:
            clash = next((f for f in files if _same_file(f, dst)), None) if dst.exists() else None
        if clash is not None:
            raise ValueError(
                f"refusing to overwrite input file {clash} with the output of {src}: "
                f"out ({out_p}) resolves to the input's own location; pass another output folder"
            )
        if r in seen:
            raise ValueError(f"inputs {seen[r]} and {src} would both be written to {dst}: denoise them into different folders")
        seen[r] = src
    return pairs


# ---------------------------------------------------------------------------------------------- the output record
def _read_record(folder: Path) -> dict[str, dict[str, int]]:
    """name -> {"size", "mtime_ns"} of the files this command wrote into ``folder`` ({} when there is no
    readable record: then nothing there counts as written by this command)."""
    try:
        raw = json.loads(read_regular_file(folder / OUTPUT_RECORD, max_bytes=64 << 20))
    except (OSError, ValueError):
        return {}
    files = raw.get("files") if isinstance(raw, dict) else None
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _write_record(folder: Path, record: dict[str, dict[str, int]]) -> None:
    tmp = folder / f".{OUTPUT_RECORD}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"written_by": "rcl-dist denoise", "files": record}, indent=1, sort_keys=True))
        os.replace(tmp, folder / OUTPUT_RECORD)
    finally:
        if tmp.exists():
            tmp.unlink()


def _not_ours(dst: Path, records: dict[Path, dict[str, dict[str, int]]]) -> str | None:
    """Why ``dst`` must not be replaced (None: it does not exist, or this command wrote it and it is
    unchanged since). ``lstat``: a link planted at ``dst`` is a file of its own, not ours."""
    try:
        st = os.lstat(dst)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{show_path(dst)}: cannot check the existing file ({e.strerror or e}); not replaced"
    folder = dst.parent
    if folder not in records:
        records[folder] = _read_record(folder)
    entry = records[folder].get(dst.name)
    if entry is not None and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return None
    why = "changed since rcl-dist denoise wrote it" if entry is not None else "not written by rcl-dist denoise"
    return (
        f"{show_path(dst)} already exists and was {why}; not replaced "
        "(pass --overwrite to replace it, or choose another output)"
    )


def _remember(dst: Path, records: dict[Path, dict[str, dict[str, int]]]) -> None:
    folder = dst.parent
    record = records.setdefault(folder, _read_record(folder))
    st = os.stat(dst)
    record[dst.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_record(folder, record)


# ---------------------------------------------------------------------------------------------- the command
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def denoise_paths(
    model_uri_or_checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    tile: int = 256,
    overlap: int = 32,
    progress: bool = True,
    tracking_uri: str | None = None,
    device: str | None = None,
    max_pixels: int | None = None,
    overwrite: bool = False,
) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Restore image files and folders ``inputs`` into ``out`` with a model (checkpoint or MLflow URI).

    Returns ``(done, failed)``: ``done`` = [(input, output written)], ``failed`` = [(input, reason)]
    for files that could not be read, decoded or written, or whose output exists and was not written
    by this command (the others are still done), and for inputs that do not exist or hold no images.
    ``progress``: one line per file on stderr (``[i/n] name -> output (HxW, 16-bit, seconds)``).
    ``max_pixels``: the pixel budget per image (None: ``$RCL_DIST_MAX_PIXELS`` or the default);
    ``overwrite``: replace existing outputs this command did not write. See the module docstring for
    formats, bit depth and the overwrite rule. Raises ``ValueError``/``FileNotFoundError`` for problems
    of the whole command (checked before any image is processed): bad tile/overlap/budget, an output
    that would overwrite an input, a model that cannot be loaded.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("denoise: no inputs given")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 8:
        raise ValueError(f"tile must be an integer >= 8, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an integer in [0, tile={tile}), got {overlap!r}")
    budget = pixel_budget(max_pixels)
    files, failed, any_folder = _expand_inputs(inputs)
    out_p = Path(out)
    single = (
        len(inputs) == 1 and not any_folder and len(files) == 1
        and out_p.suffix.lower() in IMAGE_SUFFIXES and not out_p.is_dir()
    )  # fmt: skip
    pairs = plan_outputs(files, out_p, single_file=single) if files else []
    records: dict[Path, dict[str, dict[str, int]]] = {}
    if not overwrite:  # refused before the model is loaded; checked again just before each write
        refused = {src: why for src, dst in pairs if (why := _not_ours(dst, records))}
        failed += list(refused.items())
        pairs = [(src, dst) for src, dst in pairs if src not in refused]
    for p, reason in failed:
        _say(f"denoise: {show_path(p)}: {reason}")
    if not pairs:
        return [], failed

    model = load_restorer(model_uri_or_checkpoint, tracking_uri=tracking_uri, device=device)
    done: list[tuple[Path, Path]] = []
    n = len(pairs)
    for i, (src, dst) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        try:
            img = read_image(src, max_pixels=budget)
            restored = from_float(restore_array(model, to_float(img), tile=tile, overlap=overlap), img.dtype)
            why = None if overwrite else _not_ours(dst, records)  # a file that appeared meanwhile
            if why:
                raise ValueError(why)
            write_image(dst, restored)
            _remember(dst, records)
        except (OSError, ValueError, MemoryError) as e:
            reason = str(e) if not isinstance(e, MemoryError) else "out of memory while restoring it (lower --max-pixels or --tile)"
            failed.append((src, reason))
            _say(f"denoise: [{i}/{n}] {show_path(src)}: FAILED: {reason}")
            continue
        done.append((src, dst))
        if progress:
            h, w = img.shape[:2]
            bits = 8 * img.dtype.itemsize
            _say(f"denoise: [{i}/{n}] {show_path(src.name)} -> {show_path(dst)} ({w}x{h}, {bits}-bit, {time.perf_counter() - t0:.1f} s)")
    return done, failed


def main_denoise(
    model: str,
    inputs: Sequence[str],
    out: str,
    tile: int = 256,
    overlap: int = 32,
    *,
    tracking_uri: str | None = None,
    device: str | None = None,
    progress: bool = True,
    max_pixels: int | None = None,
    overwrite: bool = False,
) -> int:
    """``rcl-dist denoise --model MODEL INPUT... OUT [--tile N] [--overlap N] [--max-pixels N] [--overwrite]``.

    Returns 0 when every input was restored, 1 when some (or all) files failed (each failure is
    printed on stderr with its reason; the others are written). Problems of the whole command raise
    ``ValueError``/``FileNotFoundError`` (the CLI prints them and exits with 2).
    """
    done, failed = denoise_paths(
        model, list(inputs), out, tile=tile, overlap=overlap, progress=progress, tracking_uri=tracking_uri, device=device,
        max_pixels=max_pixels, overwrite=overwrite,
    )  # fmt: skip
    print(f"denoised {len(done)} file(s) into {show_path(out)}" + (f"; {len(failed)} failed:" if failed else ""))
    for p, reason in failed:
        print(f"  {show_path(p)}: {reason}")
    return 0 if done and not failed else 1
