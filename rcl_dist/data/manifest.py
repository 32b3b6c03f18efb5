"""The image manifest: which files a data set is made of, and each image's own noise parameters.

``rcl-dist data index`` (:func:`index_images`) walks image folders, validates every file with an
image suffix, and writes one Parquet row per usable image (columns :data:`spec.MANIFEST_SCHEMA`)
plus a rejects table (:data:`spec.REJECTS_SCHEMA`) that says, for every file left out, why.
``rcl-dist data simulate`` (:func:`simulate`) materialises each image's fixed noisy realisation.

Why a manifest: the DALI pipelines read file lists, not folders, and the paper's one-to-one mapping
between images and noise parameters (Sec. 4) needs the parameters fixed per image, not per batch.
Every per-image value is a pure function of (base seed, content hash): re-indexing the same files,
in any order, on any machine, gives the same rows.

Validation (each failure is a rejects row, ``"<category>: <detail>"``; indexing goes on):

* ``unreadable``: the file (or a sub-folder) cannot be opened or listed, or is not a regular file
  (a FIFO or a dangling link with an image suffix: opening a FIFO would block forever);
* ``zero-byte``: the file is empty;
* ``not an image``: no decoder recognises the content (e.g. a text file named ``.png``);
* ``unsupported``: an image, but not one the pipelines read: a format other than PNG, JPEG, TIFF or
  BMP (e.g. a GIF named ``.png``), a multi-page TIFF, a 1-bit image, samples other than 8 or 16 bits
  (4-bit grey PNG, 32-bit integer or float TIFF), or an unknown colour mode; or a file whose path is
  not valid UTF-8 (the manifest stores paths as UTF-8 text): its rejects row shows the name with
  ``\\xNN`` escapes (:func:`rcl_dist.data.images.show_path`), and the other files are indexed;
* ``too large``: the header declares more than ``max_pixels`` pixels; checked from the header
  *before* decoding (Pillow's decompression-bomb error becomes this rejection too);
* ``too small``: a side is below ``min_side`` (default 2: the smallest image that has a full RGGB
  quad for RAW simulation). Images smaller than a pipeline's crop are *accepted* here: whether an
  image is big enough depends on the crop, so a pipeline leaves them out when it is built
  (see :mod:`rcl_dist.data.spec`);
* ``truncated``: the full decode fails (``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced off);
* ``duplicate``: same content (sha256) as another path; the first path in sorted order is kept.
  A duplicate would give one image two noise-parameter pairs and could leak across splits.

Recorded per image: Pillow's own ``mode``; ``channels`` after the conversions every loader applies
(alpha dropped: RGBA -> 3, LA -> 1; palette, CMYK, YCbCr, LAB -> RGB 3; grey L / I;16 -> 1);
``bit_depth`` of the file's samples (16 for I;16 and for 16-bit RGB/RGBA PNG and TIFF, which Pillow
itself decodes at 8 bits: the PNG header / TIFF BitsPerSample is read for that; palette images are 8).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import secrets
import stat
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rcl_dist.data.images import IMAGE_SUFFIXES, _to_chw_float, exif_orientation, load_image, read_regular_file, show_path
from rcl_dist.data.spec import MANIFEST_SCHEMA, NOISE_KINDS, REJECTS_SCHEMA, derived_seed, fixed_noisy_image, simulated_path

__all__ = [
    "IndexResult",
    "index_images",
    "read_manifest",
    "load_manifest",
    "check_manifest",
    "manifest_noise",
    "check_paths",
    "simulate",
    "rejects_path",
    "reason_category",
    "parse_folder",
    "SPLITS",
    "REASONS",
    "DEFAULT_MAX_PIXELS",
]

SPLITS = ("train", "val", "test")
DEFAULT_MAX_PIXELS = 2**28  # ~268 M pixels: larger than any photograph in the paper's data sets

# Rejection categories: every rejects row's reason starts with one of these and ": ".
UNREADABLE = "unreadable"
ZERO_BYTE = "zero-byte"
NOT_IMAGE = "not an image"
UNSUPPORTED = "unsupported"
TOO_LARGE = "too large"
TOO_SMALL = "too small"
TRUNCATED = "truncated"
DUPLICATE = "duplicate"
CLEAN_REFERENCE = "clean reference"
REASONS = (UNREADABLE, ZERO_BYTE, NOT_IMAGE, UNSUPPORTED, TOO_LARGE, TOO_SMALL, TRUNCATED, DUPLICATE, CLEAN_REFERENCE)

# Formats the DALI decoders and the reference loader both read (MPO: a camera JPEG with a preview).
_FORMATS = ("PNG", "JPEG", "MPO", "TIFF", "BMP")
# Pillow mode -> channels after conversion (alpha dropped; palette / CMYK / YCbCr / LAB -> RGB).
_CHANNELS: dict[str, int] = {
    "L": 1, "LA": 1, "La": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1,
    "RGB": 3, "RGBA": 3, "RGBa": 3, "RGBX": 3, "P": 3, "PA": 3, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
}  # fmt: skip
# Modes that imageio (hence load_image) returns unconverted: decoded through Pillow's RGB conversion.
_CONVERT_MODES = ("CMYK", "YCbCr", "LAB", "HSV")
_META_KEY = b"rcl_dist.index"
_MAX_LOGGED_REJECTS = 20

T = TypeVar("T")
R = TypeVar("R")


def rejects_path(out: str | os.PathLike) -> Path:
    """Where :func:`index_images` writes the rejects table of manifest ``out``: ``<stem>.rejects.parquet``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rejects.parquet")


def reason_category(reason: str) -> str:
    """The category of a rejects row's reason (the text before the first ': ')."""
    return reason.split(": ", 1)[0]


def parse_folder(spec: str | os.PathLike | tuple[str | os.PathLike, str | None]) -> tuple[str, str | None]:
    """``"DIR"`` -> (DIR, None): split drawn per image; ``"DIR:SPLIT"`` or ``(DIR, SPLIT)`` -> whole folder one split.

    The ``:SPLIT`` suffix is taken only when it is ``train``, ``val`` or ``test``, so a path that
    itself contains ':' (``C:\\data``, ``a:b``) is still read as a path.
    """
    if isinstance(spec, tuple):
        folder, split = spec
        if split is not None and split not in SPLITS:
            raise ValueError(f"{folder}: split must be one of {SPLITS} or None, got {split!r}")
        return os.fspath(folder), split
    text = os.fspath(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head and tail in SPLITS:
        return head, tail
    return text, None


# ---------------------------------------------------------------------------------------------- results


@dataclass
class IndexResult:
    """What one :func:`index_images` run did.

    ``accepted``: rows in the manifest; of them ``reused`` came unchanged from the previous manifest
    (same path, size and mtime: not decoded again) and ``validated`` were decoded in this run.
    ``rejected``: count per reason category. ``removed``: previous rows dropped because their file is
    gone; ``outside``: previous rows dropped because their file is no longer under the given folders.
    """

    manifest: Path
    rejects: Path
    accepted: int = 0
    reused: int = 0
    validated: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    removed: int = 0
    outside: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> str:
        """A small text table: accepted (per split, reused / decoded), removed, rejected per reason."""
        split_text = ", ".join(f"{s} {self.splits.get(s, 0)}" for s in SPLITS)
        lines = [
            f"manifest   {self.manifest}",
            f"accepted   {self.accepted:>8}   ({split_text})",
            f"  reused   {self.reused:>8}   (unchanged since the last index: not decoded)",
            f"  decoded  {self.validated:>8}   (new or changed files)",
            f"removed    {self.removed:>8}   (files gone since the last index)",
        ]
        if self.outside:
            lines.append(f"dropped    {self.outside:>8}   (files no longer under the given folders)")
        lines.append(f"rejected   {self.rejected_total:>8}   ({self.rejects})")
        for reason in sorted(self.rejected, key=lambda r: (-self.rejected[r], r)):
            lines.append(f"  {reason:<12} {self.rejected[reason]:>6}")
        lines.append(f"time       {self.seconds:>8.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- listing


@dataclass
class _Entry:
    """A file found under a folder: its stat (taken before reading) or why it cannot be used."""

    path: str
    split: str | None  # fixed split of its folder, or None (drawn from the hash)
    size: int = 0
    mtime_ns: int = 0
    error: str | None = None


def _list_files(folders: Sequence[tuple[str, str | None]], rejects: dict[str, str]) -> dict[str, _Entry]:
    """Every file with an image suffix under the folders (recursively), keyed by absolute path.

    A file under two given folders takes the split of the deeper one (``data`` and ``data/val:val``).
    Symbolic links to files are followed (a link to an indexed file then shows up as its duplicate);
    links to folders are not descended into, so a cycle cannot make the walk endless.
    """
    roots: dict[str, str | None] = {}
    for folder, split in folders:
        root = os.path.abspath(folder)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{folder}: image folder not found (or not a folder)")
        if root in roots and roots[root] != split:
            raise ValueError(f"{folder}: folder given twice with different splits ({roots[root]!r} and {split!r})")
        roots[root] = split
    found: dict[str, tuple[int, _Entry]] = {}
    for root, split in roots.items():
        depth = len(Path(root).parts)

        def on_error(e: OSError, root: str = root) -> None:
            why = f"{type(e).__name__}: {e.strerror or e}"
            rejects[os.path.abspath(e.filename or root)] = f"{UNREADABLE}: cannot list folder ({why})"

        for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
            dirnames.sort()
            for name in sorted(filenames):
                if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    path.encode("utf-8")
                except UnicodeEncodeError:  # undecodable bytes, held as surrogates: Parquet cannot store it
                    rejects[show_path(path)] = (
                        f"{UNSUPPORTED}: the file name is not valid UTF-8 (shown here with \\x escapes); "
                        "rename it to index it"
                    )
                    continue
                if path in found and found[path][0] > depth:
                    continue
                entry = _Entry(path, split)
                try:
                    st = os.stat(path)
                except OSError as e:
                    entry.error = f"{UNREADABLE}: cannot stat ({type(e).__name__}: {e.strerror or e}; a dangling link?)"
                else:
                    if not stat.S_ISREG(st.st_mode):
                        entry.error = f"{UNREADABLE}: not a regular file"
                    entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                found[path] = (depth, entry)
    return {p: found[p][1] for p in sorted(found)}


# ---------------------------------------------------------------------------------------------- validation


def _read_file(path: str) -> bytes:
    """The file's bytes (one read: hashed and decoded from memory), regular files only, checked on the
    open descriptor: a file swapped for a FIFO after the listing cannot block the run
    (:func:`rcl_dist.data.images.read_regular_file`). Tests patch this to simulate EACCES."""
    return read_regular_file(path)


def _bit_depth(im: Any, data: bytes) -> int:
    """Bits per sample of the file (not of Pillow's decoded copy, which is 8-bit for 16-bit RGB PNG/TIFF)."""
    if im.mode.startswith("I;16"):
        return 16
    if im.mode in ("P", "PA"):  # palette entries are 8-bit colours whatever the index depth
        return 8
    if im.format == "PNG" and data[12:16] == b"IHDR":
        return data[24]
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 1)
        bits = set(bits) if isinstance(bits, (tuple, list)) else {bits}
        return bits.pop() if len(bits) == 1 else 0
    if im.mode in ("I", "F"):
        return 32
    return 8


def _inspect_file(path: str, max_pixels: int, min_side: int) -> dict[str, Any] | str:
    """Validate one file: the manifest's file-level fields, or the rejects reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = _read_file(path)
    except OSError as e:
        return f"{UNREADABLE}: cannot open ({type(e).__name__}: {e.strerror or e})"
    except ValueError as e:  # not a regular file
        return f"{UNREADABLE}: {e}"
    if not data:
        return f"{ZERO_BYTE}: the file is empty (0 bytes)"
    sha = hashlib.sha256(data).hexdigest()
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return f"{TOO_LARGE}: over max_pixels = {max_pixels} ({e})"
    except UnidentifiedImageError:
        return f"{NOT_IMAGE}: no decoder recognises the content (it starts with {data[:16]!r})"
    except Exception as e:  # a plugin that accepted the magic bytes but choked on the header
        return f"{NOT_IMAGE}: cannot read the image header ({type(e).__name__}: {e})"
    with im:
        w, h = im.size
        fmt, mode = im.format, im.mode
        if fmt not in _FORMATS:
            return f"{UNSUPPORTED}: {fmt} image; the pipelines read PNG, JPEG, TIFF and BMP"
        if w * h > max_pixels:
            return f"{TOO_LARGE}: header declares {w}x{h} = {w * h} pixels, over max_pixels = {max_pixels}"
        if min(w, h) < min_side:
            return f"{TOO_SMALL}: {w}x{h} pixels, both sides must be at least {min_side}"
        if fmt == "TIFF" and getattr(im, "n_frames", 1) > 1:
            return f"{UNSUPPORTED}: multi-page TIFF ({im.n_frames} pages); store one image per file"
        if getattr(im, "n_frames", 1) > 1:  # APNG: the readers would disagree on which frame is the image
            return f"{UNSUPPORTED}: animated {fmt} ({im.n_frames} frames); store one image per file"
        # every decoder turns a camera's orientation upright: record the sizes they see
        turned = exif_orientation(im) in (5, 6, 7, 8)
        if mode == "1":
            return f"{UNSUPPORTED}: 1-bit (bilevel) image; only 8- and 16-bit samples are supported"
        if mode not in _CHANNELS and mode not in ("I", "F"):
            return f"{UNSUPPORTED}: colour mode {mode!r}"
        depth = _bit_depth(im, data)
        if depth not in (8, 16):
            what = f"{depth}-bit samples" if depth else "mixed sample sizes"
            return f"{UNSUPPORTED}: {what} (mode {mode}); only 8- and 16-bit samples are supported"
        channels = _CHANNELS.get(mode, 1 if mode == "I" and depth == 16 else 0)  # "I": 16-bit grey, older Pillow
        if not channels:
            return f"{UNSUPPORTED}: colour mode {mode!r}"
        try:
            im.load()
        except Image.DecompressionBombError as e:
            return f"{TOO_LARGE}: {e}"
        except Exception as e:  # decoders raise OSError, SyntaxError, zlib.error, ...
            why = f"{type(e).__name__}: {e}"
            return f"{TRUNCATED}: the image data cannot be decoded in full, the file is truncated or corrupt ({why})"
        if im.size != (w, h):
            return f"{TRUNCATED}: decoded size {im.size[0]}x{im.size[1]} differs from the header's {w}x{h}"
    return {
        "sha256": sha,
        "width": h if turned else w,
        "height": w if turned else h,
        "channels": channels,
        "bit_depth": depth,
        "mode": mode,
    }


@contextlib.contextmanager
def _pil_limits(max_pixels: int) -> Iterator[None]:
    """Pillow's global decoder settings for one index run, restored afterwards.

    Pillow's own decompression-bomb limit is lifted: :func:`_inspect_file` checks the header's size
    against ``max_pixels`` itself, right after ``Image.open`` has read the header and before anything
    is decoded, so that the reason can name the declared size (a bomb error that still occurs is a
    rejection too). Truncated files are never silently padded (``LOAD_TRUNCATED_IMAGES`` off).
    Global state: do not decode with Pillow in other threads of this process meanwhile.
    """
    from PIL import Image, ImageFile

    old = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map`` over a thread pool, results in input order, at most ``4 * workers`` in flight.

    Pillow's decoders and hashlib release the GIL, so threads overlap I/O and decoding. Pending work
    is cancelled when the consumer stops early (an error or Ctrl-C).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    ex = ThreadPoolExecutor(workers, thread_name_prefix="rcl-index")
    try:
        it = iter(items)
        pending = deque(ex.submit(fn, x) for x in itertools.islice(it, 4 * workers))
        while pending:
            res = pending.popleft().result()
            for x in it:
                pending.append(ex.submit(fn, x))
                break
            yield res
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- writing


def _temp_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (created with ``open(..., "x")``: the usual umask
    permissions, unlike ``mkstemp``'s 0600, so other users' pipeline workers can read the result)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file through a temporary file in the same folder and ``os.replace``.

    A reader (or an interrupted run) sees the old file or the new one, never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Derived:
    """Per-image values that are pure functions of (base seed, sha256): split draw, NLF, noise seed."""

    def __init__(self, seed: int, sampler: str, options: dict[str, float], val_fraction: float, test_fraction: float):
        self.seed, self.sampler, self.options = seed, sampler, options
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._cache: dict[str, tuple[float, float, float, int]] = {}

    def __call__(self, sha: str) -> tuple[float, float, float, int]:
        """(u in [0, 1) for the split, shot, read, noise_seed)."""
        got = self._cache.get(sha)
        if got is None:
            import torch

            from rcl_dist.noise import sample_nlf

            u = derived_seed(self.seed, sha, "split") / float(1 << 63)
            gen = torch.Generator().manual_seed(derived_seed(self.seed, sha, "nlf"))
            p = sample_nlf(self.sampler, 1, generator=gen, **self.options)
            got = (u, float(p.shot[0]), float(p.read[0]), derived_seed(self.seed, sha, "noise"))
            self._cache[sha] = got
        return got

    def split(self, u: float, fixed: str | None) -> str:
        if fixed is not None:
            return fixed
        if u < self.val_fraction:
            return "val"
        if u < self.val_fraction + self.test_fraction:
            return "test"
        return "train"


_FILE_FIELDS = ("sha256", "width", "height", "channels", "bit_depth", "mode")


def _assemble(
    records: dict[str, tuple[dict[str, Any], str | None, int, int]], derived: _Derived
) -> tuple[pa.Table, dict[str, str]]:
    """Manifest table (sorted by path, duplicates resolved) from path -> (file fields, split, size, mtime)."""
    cols: dict[str, list[Any]] = {f.name: [] for f in MANIFEST_SCHEMA}
    kept_sha: dict[str, str] = {}
    kept_id: dict[str, str] = {}
    dups: dict[str, str] = {}
    for path in sorted(records):
        rec, fixed, size, mtime = records[path]
        sha = rec["sha256"]
        if sha in kept_sha:
            dups[path] = (
                f"{DUPLICATE}: duplicate of {kept_sha[sha]} "
                f"(same sha256 {sha[:16]}; the first path in sorted order is kept)"
            )
            continue
        image_id = sha[:16]
        if image_id in kept_id:  # a 64-bit prefix collision: never seen, but the id must stay unique
            dups[path] = f"{DUPLICATE}: image_id {image_id} already used by {kept_id[image_id]} (sha256 prefix collision)"
            continue
        kept_sha[sha], kept_id[image_id] = path, path
        u, shot, read, noise_seed = derived(sha)
        row = {
            **{k: rec[k] for k in _FILE_FIELDS},
            "path": path,
            "image_id": image_id,
            "split": derived.split(u, fixed),
            "shot": shot,
            "read": read,
            "noise_seed": noise_seed,
            "size_bytes": size,
            "mtime_ns": mtime,
        }
        for k, v in row.items():
            cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA), dups


def _with_metadata(table: pa.Table, settings: dict[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({_META_KEY: json.dumps(settings, sort_keys=True).encode()})


# ---------------------------------------------------------------------------------------------- index


def index_images(
    dirs: Sequence[str | os.PathLike | tuple[str | os.PathLike, str | None]] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    sampler: str = "uniform",
    sampler_options: dict[str, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 2,
    workers: int | None = None,
    checkpoint_s: float = 60.0,
    noise: str = "simulated",
    replace: bool = False,
    log: Callable[[str], Any] = print,
) -> IndexResult:
    """Index the images under ``dirs`` into the manifest ``out`` (Parquet) and its rejects table.

    ``dirs``: folders, searched recursively for files with an image suffix (.png .jpg .jpeg .tif
    .tiff .bmp, any case). ``"DIR"``: each image's split is drawn from (seed, sha256): ``val`` with
    probability ``val_fraction``, ``test`` with ``test_fraction``, else ``train``; ``"DIR:SPLIT"`` or
    ``(DIR, SPLIT)``: the whole folder is one split. Noise parameters: one draw of ``sampler``
    (``"uniform"``, App. C.1, or ``"brooks"``, Eq. 12-13; ``sampler_options`` are its keywords) from
    ``torch.Generator().manual_seed(derived_seed(seed, sha256, "nlf"))``; ``noise_seed`` =
    ``derived_seed(seed, sha256, "noise")``; ``image_id`` = sha256[:16].

    Incremental: when ``out`` exists, a file whose (path, size, mtime) matches a row is not read
    again (its size limits are re-checked from the row); new and changed files are validated; rows
    whose files are gone are dropped. Split and noise columns are always recomputed from the hash,
    so a run with other settings never keeps stale values, and the same files and settings always
    give an equal table. Both files are replaced atomically; every ``checkpoint_s`` seconds, and on
    Ctrl-C, the manifest is also written with what is done so far (rows of files not reached yet are
    kept from the previous manifest), so an interrupted run loses nothing already indexed.

    ``noise``: what the folder holds, recorded in the manifest's metadata (:func:`manifest_noise`):
    ``"simulated"`` (images taken as clean, noise added in training) or ``"none"`` (real noisy
    photographs, used as they are; the ``*_mean`` clean references of a real pair folder are then
    rejected with that reason, so the noisy ``*_real`` halves are the unlabelled set).

    ``workers``: threads reading and decoding (default: up to 4); each holds one decoded image.
    ``log`` receives a line per rejected file (the first 20), progress lines, and the summary.
    ``replace``: an existing ``out`` that holds files still on disk but outside the folders given now
    (indexed from other folders) is refused unless ``replace``, before anything is written: a second
    index of another folder to the same ``out`` would otherwise drop the first silently.

    Raises FileNotFoundError for a missing folder, ValueError for bad settings, when ``out`` exists
    but is not a manifest, or (without ``replace``) when it indexes files outside the given folders.
    """
    from rcl_dist.noise import sample_nlf

    t0 = time.monotonic()
    out = Path(out)
    rej_out = rejects_path(out)
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    folders = [parse_folder(d) for d in dirs]
    if not folders:
        raise ValueError("index_images: no image folder given")
    if not (0.0 <= val_fraction <= 1.0 and 0.0 <= test_fraction <= 1.0 and val_fraction + test_fraction <= 1.0):
        raise ValueError(
            "need 0 <= val_fraction, test_fraction and val_fraction + test_fraction <= 1, "
            f"got {val_fraction}, {test_fraction}"
        )
    if min_side < 1 or max_pixels < 1:
        raise ValueError(f"min_side and max_pixels must be >= 1, got {min_side}, {max_pixels}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    options = dict(sampler_options or {})
    sample_nlf(sampler, 1, **options)  # unknown sampler or bad options: fail before any work
    workers = max(1, min(4, os.cpu_count() or 1) if workers is None else int(workers))
    derived = _Derived(int(seed), sampler, options, float(val_fraction), float(test_fraction))
    settings = {
        "seed": int(seed),
        "sampler": sampler,
        "sampler_options": options,
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "max_pixels": int(max_pixels),
        "min_side": int(min_side),
        "folders": [[os.path.abspath(f), s] for f, s in folders],
        "noise": noise,
    }

    old: dict[str, dict[str, Any]] = {}
    if out.exists():
        try:
            old = {r["path"]: r for r in read_manifest(out).to_pylist()}
        except (ValueError, OSError) as e:
            raise ValueError(
                f"{out}: exists but is not a manifest this run can update ({e}); delete it or choose another output"
            ) from None

    rejects: dict[str, str] = {}
    entries = _list_files(folders, rejects)
    result = IndexResult(manifest=out, rejects=rej_out)
    for path in old.keys() - entries.keys():
        if os.path.exists(path):
            result.outside += 1
        else:
            result.removed += 1
    if result.outside and not replace:
        try:
            before = [f for f, _s in json.loads((pq.read_schema(out).metadata or {}).get(_META_KEY, b"{}")).get("folders", [])]
        except (ValueError, AttributeError, TypeError):
            before = []
        example = sorted(p for p in old.keys() - entries.keys() if os.path.exists(p))[0]
        raise ValueError(
            f"{out}: already indexes {result.outside} file(s) outside the folder(s) given now"
            + (f" (it was indexed from {', '.join(before)})" if before else "") + f", e.g. {example}; this run "
            "would drop them: pass --replace to index only the given folders, or choose another --out"
        )  # fmt: skip

    records: dict[str, tuple[dict[str, Any], str | None, int, int]] = {}
    reused: set[str] = set()
    todo: list[_Entry] = []
    for path, e in entries.items():
        row = old.get(path)
        if e.error is not None:
            rejects[path] = e.error
        elif noise == "none" and Path(path).stem.endswith("_mean"):
            rejects[path] = f"{CLEAN_REFERENCE}: the clean *_mean reference of a real pair, not a noisy photograph (noise='none')"
        elif e.size == 0:
            rejects[path] = f"{ZERO_BYTE}: the file is empty (0 bytes)"
        elif row is not None and row["size_bytes"] == e.size and row["mtime_ns"] == e.mtime_ns:
            w, h = row["width"], row["height"]
            if w * h > max_pixels:
                rejects[path] = f"{TOO_LARGE}: {w}x{h} = {w * h} pixels, over max_pixels = {max_pixels}"
            elif min(w, h) < min_side:
                rejects[path] = f"{TOO_SMALL}: {w}x{h} pixels, both sides must be at least {min_side}"
            else:
                records[path] = ({k: row[k] for k in _FILE_FIELDS}, e.split, e.size, e.mtime_ns)
                reused.add(path)
        else:
            todo.append(e)

    def checkpoint(done: int) -> None:
        pending = {e.path: old[e.path] for e in todo[done:] if e.path in old}
        merged = dict(records)
        for path, row in pending.items():
            merged[path] = ({k: row[k] for k in _FILE_FIELDS}, entries[path].split, row["size_bytes"], row["mtime_ns"])
        _write_atomic(_with_metadata(_assemble(merged, derived)[0], settings), out)

    if todo:
        log(f"index: {len(entries)} files, {len(reused)} unchanged, {len(todo)} to validate ({workers} threads)")
    done, last_save, last_log = 0, time.monotonic(), time.monotonic()
    with _pil_limits(max_pixels), contextlib.closing(
        _ordered_map(lambda e: _inspect_file(e.path, max_pixels, min_side), todo, workers)
    ) as results:
        try:
            for e, got in zip(todo, results):
                done += 1
                if isinstance(got, str):
                    rejects[e.path] = got
                else:
                    records[e.path] = (got, e.split, e.size, e.mtime_ns)
                now = time.monotonic()
                if now - last_log >= 10.0:
                    log(f"index: {done}/{len(todo)} validated, {len(rejects)} rejected so far")
                    last_log = now
                if now - last_save >= checkpoint_s and done < len(todo):
                    checkpoint(done)
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            checkpoint(done)
            log(f"index: interrupted after {done}/{len(todo)} files; {out} keeps what is done, run again to go on")
            raise

    table, dups = _assemble(records, derived)
    rejects.update(dups)
    result.reused = len(reused - dups.keys())
    result.validated = table.num_rows - result.reused
    rej_table = pa.Table.from_pydict(
        {"path": sorted(rejects), "reason": [rejects[p] for p in sorted(rejects)]}, schema=REJECTS_SCHEMA
    )
    _write_atomic(_with_metadata(rej_table, settings), rej_out)
    _write_atomic(_with_metadata(table, settings), out)

    result.accepted = table.num_rows
    result.rejected = dict(Counter(reason_category(r) for r in rejects.values()))
    counts = Counter(table.column("split").to_pylist())
    result.splits = {s: counts.get(s, 0) for s in SPLITS}
    result.seconds = time.monotonic() - t0
    for path in sorted(rejects)[:_MAX_LOGGED_REJECTS]:
        log(f"rejected {path}: {rejects[path]}")
    if len(rejects) > _MAX_LOGGED_REJECTS:
        log(f"... and {len(rejects) - _MAX_LOGGED_REJECTS} more rejected files: see {rej_out}")
    if not result.accepted:
        log(f"warning: no usable image under {', '.join(f for f, _ in folders)}; {out} is empty")
    log(result.summary())
    return result


# ---------------------------------------------------------------------------------------------- reading


def manifest_noise(path: str | os.PathLike) -> str:
    """What a manifest's images are: ``"simulated"`` (clean, noise added in training) or ``"none"``
    (real noisy photographs), as ``index_images(noise=...)`` recorded it; ``"simulated"`` for a
    manifest written before the setting existed."""
    meta = pq.read_schema(path).metadata or {}
    try:
        return json.loads(meta.get(_META_KEY, b"{}")).get("noise", "simulated")
    except (ValueError, AttributeError):
        return "simulated"


def read_manifest(path: str | os.PathLike, split: str | None = None) -> pa.Table:
    """Read and check a manifest; rows of one ``split`` when given.

    Checks every column of :data:`MANIFEST_SCHEMA` is there with its type, none is null, splits are
    known, and paths and image ids are unique (the one-to-one image/noise mapping). Errors name the
    file and what is wrong; extra columns are dropped.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (create it with `rcl-dist data index`)")
    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid and friends
        raise ValueError(f"{path}: not a readable Parquet manifest ({type(e).__name__}: {e})") from None
    return check_manifest(table, str(path), split)


def load_manifest(manifest: pa.Table | str | os.PathLike, split: str | None = None) -> pa.Table:
    """A manifest file (:func:`read_manifest`) or an in-memory table (:func:`check_manifest`): what every
    input pipeline (DALI, the reference DataLoader) reads, checked one way."""
    if isinstance(manifest, pa.Table):
        return check_manifest(manifest, "manifest table", split)
    return read_manifest(manifest, split)


def check_manifest(table: pa.Table, where: str = "manifest table", split: str | None = None) -> pa.Table:
    """The checks of :func:`read_manifest` on a table already in memory; errors start with ``where``."""
    path = where
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    missing = [f for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        cols = ", ".join(f"'{f.name}' ({f.type})" for f in missing)
        raise ValueError(f"{path}: manifest lacks column(s) {cols}; re-create it with `rcl-dist data index`")
    for f in MANIFEST_SCHEMA:
        got = table.schema.field(f.name).type
        if got != f.type:
            raise ValueError(f"{path}: column '{f.name}' has type {got}, expected {f.type}")
        nulls = table.column(f.name).null_count
        if nulls:
            raise ValueError(f"{path}: column '{f.name}' has {nulls} null value(s)")
    table = table.select(MANIFEST_SCHEMA.names)
    bad = set(pc.unique(table.column("split")).to_pylist()) - set(SPLITS)
    if bad:
        raise ValueError(f"{path}: column 'split' has unknown value(s) {sorted(bad)}; expected {SPLITS}")
    for col in ("path", "image_id"):
        if pc.count_distinct(table.column(col)).as_py() != table.num_rows:
            raise ValueError(f"{path}: column '{col}' has repeated values; each image must appear once")
    if split is not None:
        table = table.filter(pc.equal(table.column("split"), split))
    return table


def check_paths(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """(rows whose file exists, paths that are gone): run before building a pipeline or simulating."""
    paths = table.column("path").to_pylist()
    present = [os.path.isfile(p) for p in paths]
    missing = [p for p, ok in zip(paths, present) if not ok]
    return (table.filter(pa.array(present, type=pa.bool_())) if missing else table), missing


# ---------------------------------------------------------------------------------------------- simulate


def _load_clean(path: str, mode: str, gray: bool | None) -> np.ndarray:
    """The clean image as [C, H, W] float32 in [0, 1], as the reference loader reads it.

    ``load_image`` (imageio) returns CMYK / YCbCr / LAB samples unconverted; those go through
    Pillow's RGB conversion instead, as their ``channels`` = 3 in the manifest promises.
    """
    if mode in _CONVERT_MODES:
        from PIL import Image

        with Image.open(path) as im:
            return _to_chw_float(np.asarray(im.convert("RGB")), gray)
    return load_image(path, gray)


def _npy_ok(path: Path, shape: tuple[int, ...]) -> bool:
    """An existing realisation of the expected shape and dtype (a torn or stale file is rewritten)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.float32


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def simulate(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    raw: bool = False,
    pairs: bool = False,
    split: str | None = None,
    gray: bool | None = None,
    force: bool = False,
    workers: int | None = None,
    log: Callable[[str], Any] = print,
) -> int:
    """Materialise each image's fixed noisy realisation (``realisation="fixed"``); returns files written.

    For every manifest row (of ``split``, if given): ``spec.fixed_noisy_image(clean, shot, read,
    noise_seed)`` saved as float32 .npy, HWC, at ``spec.simulated_path(out_dir, image_id, raw, 0)``;
    with ``pairs`` also realisation 1 (seed ``noise_seed + 1``, Noise2Noise's second image).

    ``gray``: as :func:`load_image`: None keeps each image's own channels (1 or 3), False makes grey
    images RGB before the noise (independent noise per channel, what an RGB pipeline needs), True
    makes RGB images grey. ``raw``: the clean RGB image is cropped to even height and width (the last
    row / column of an odd side is dropped, so the RGGB quads are whole), mosaicked RGGB, and noise is
    added in the RAW domain: [H, W, 1]; grey images are made RGB first.

    Idempotent: a realisation already on disk with the expected shape and dtype is kept (``force``
    rewrites all: needed after re-indexing with another seed, since file names hold only the image id).
    Files are written atomically. An image whose file is gone, or has changed since indexing (size or
    mtime differ), is skipped with a warning naming it, and counted in the last log line.
    """
    import torch

    from rcl_dist.noise import mosaic

    if raw and gray:
        raise ValueError("simulate: raw=True needs RGB images (a Bayer mosaic), not gray=True")
    table = read_manifest(manifest, split)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = (0, 1) if pairs else (0,)
    workers = max(1, min(4, os.cpu_count() or 1) if workers is None else int(workers))
    lock = threading.Lock()
    counts: Counter[str] = Counter()

    def one(row: dict[str, Any]) -> None:
        path, h, w = row["path"], row["height"], row["width"]
        if raw:
            shape: tuple[int, ...] = (h - h % 2, w - w % 2, 1)
        else:
            shape = (h, w, {None: row["channels"], False: 3, True: 1}[gray])
        targets = [(i, simulated_path(out_dir, row["image_id"], raw, i)) for i in indices]
        targets = [(i, p) for i, p in targets if force or not _npy_ok(p, shape)]
        if not targets:
            with lock:
                counts["present"] += len(indices)
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            with lock:
                counts["missing"] += 1
                log(f"warning: {path} (image {row['image_id']}) is gone; its realisation is skipped")
            return
        if st.st_size != row["size_bytes"] or st.st_mtime_ns != row["mtime_ns"]:
            with lock:
                counts["changed"] += 1
                log(f"warning: {path} (image {row['image_id']}) changed since indexing; skipped (index again)")
            return
        clean = _load_clean(path, row["mode"], False if raw else gray)
        if clean.shape[1:] != (h, w):
            with lock:
                counts["changed"] += 1
                log(f"warning: {path} decodes to {clean.shape[2]}x{clean.shape[1]}, the manifest says {w}x{h}; skipped")
            return
        if raw:
            rgb = torch.from_numpy(clean[:, : shape[0], : shape[1]])[None]
            clean = mosaic(rgb)[0].numpy()  # [1, H, W]
        for i, target in targets:
            noisy = fixed_noisy_image(clean, row["shot"], row["read"], row["noise_seed"] + i)
            _save_npy_atomic(target, np.ascontiguousarray(noisy.transpose(1, 2, 0), dtype=np.float32))
        with lock:
            counts["written"] += len(targets)
            counts["present"] += len(indices) - len(targets)

    rows = table.to_pylist()
    with contextlib.closing(_ordered_map(one, rows, workers)) as it:
        for _ in it:
            pass
    log(
        f"simulate: {counts['written']} realisations written, {counts['present']} already present, "
        f"{counts['missing']} images gone, {counts['changed']} changed since indexing -> {out_dir}"
    )
    return counts["written"]
