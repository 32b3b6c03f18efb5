"""Indexing image folders into a manifest (``rcl-dist data index``): every file validated, every rejection explained.

:func:`index_images` walks image folders, validates every file with an image suffix, and writes the
manifest (:mod:`rcl_dist.data.manifest`) plus a rejects table (:data:`spec.REJECTS_SCHEMA`) that
says, for every file left out, why (``"<category>: <detail>"``, categories :data:`REASONS`).
Every per-image value (split, Eq. 8 noise parameters, noise seed) is a pure function of (base seed,
content hash): re-indexing the same files, in any order, on any machine, gives the same rows; an
unchanged file is not decoded again. The validation rules and what each row records:
``docs/manifest.md``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import stat
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from rcl_dist.data.files import ordered_map, write_parquet_atomic
from rcl_dist.data.images import IMAGE_SUFFIXES, exif_orientation, read_regular_file, show_path
from rcl_dist.data.index_rows import DUPLICATE, FILE_FIELDS, Derived, assemble, with_metadata
from rcl_dist.data.manifest import META_KEY, SPLITS, read_manifest
from rcl_dist.data.spec import NOISE_KINDS, REJECTS_SCHEMA

__all__ = ["IndexResult", "index_images", "rejects_path", "reason_category", "parse_folder", "REASONS", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 2**28  # ~268 M pixels: larger than any photograph in the paper's data sets

# Rejection categories: every rejects row's reason starts with one of these and ": " (DUPLICATE: index_rows.py).
UNREADABLE = "unreadable"
ZERO_BYTE = "zero-byte"
NOT_IMAGE = "not an image"
UNSUPPORTED = "unsupported"
TOO_LARGE = "too large"
TOO_SMALL = "too small"
TRUNCATED = "truncated"
CLEAN_REFERENCE = "clean reference"
REASONS = (UNREADABLE, ZERO_BYTE, NOT_IMAGE, UNSUPPORTED, TOO_LARGE, TOO_SMALL, TRUNCATED, DUPLICATE, CLEAN_REFERENCE)

# Formats the DALI decoders and the reference loader both read (MPO: a camera JPEG with a preview).
_FORMATS = ("PNG", "JPEG", "MPO", "TIFF", "BMP")
# Pillow mode -> channels after conversion (alpha dropped; palette / CMYK / YCbCr / LAB -> RGB).
_CHANNELS: dict[str, int] = {
    "L": 1, "LA": 1, "La": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1,
    "RGB": 3, "RGBA": 3, "RGBa": 3, "RGBX": 3, "P": 3, "PA": 3, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
}  # fmt: skip
_MAX_LOGGED_REJECTS = 20


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


# ---------------------------------------------------------------------------------------------- derived values


# ---------------------------------------------------------------------------------------------- index


def _check_settings(dirs, *, seed, val_fraction, test_fraction, sampler, sampler_options, max_pixels, min_side,
                    workers, noise) -> tuple[list[tuple[str, str | None]], int, Derived, dict[str, Any]]:  # fmt: skip
    """Settings checked before any work: (folders, threads, per-image values, manifest metadata)."""
    from rcl_dist.noise import sample_nlf

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
    derived = Derived(int(seed), sampler, options, float(val_fraction), float(test_fraction))
    settings = {
        "seed": int(seed), "sampler": sampler, "sampler_options": options, "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction), "max_pixels": int(max_pixels), "min_side": int(min_side),
        "folders": [[os.path.abspath(f), s] for f, s in folders], "noise": noise,
    }  # fmt: skip
    return folders, workers, derived, settings


def _read_previous(out: Path) -> dict[str, dict[str, Any]]:
    """The rows of an existing manifest ``out`` by path (none when it does not exist); refuses a non-manifest."""
    if not out.exists():
        return {}
    try:
        return {r["path"]: r for r in read_manifest(out).to_pylist()}
    except (ValueError, OSError) as e:
        raise ValueError(
            f"{out}: exists but is not a manifest this run can update ({e}); delete it or choose another output"
        ) from None


def _count_dropped(out: Path, old: dict[str, dict[str, Any]], entries: dict[str, _Entry], result: IndexResult, replace: bool) -> None:
    """Count previous rows whose file is gone or outside the folders; refuse the latter without ``replace``."""
    for path in old.keys() - entries.keys():
        if os.path.exists(path):
            result.outside += 1
        else:
            result.removed += 1
    if result.outside and not replace:
        try:
            before = [f for f, _s in json.loads((pq.read_schema(out).metadata or {}).get(META_KEY, b"{}")).get("folders", [])]
        except (ValueError, AttributeError, TypeError):
            before = []
        example = sorted(p for p in old.keys() - entries.keys() if os.path.exists(p))[0]
        raise ValueError(
            f"{out}: already indexes {result.outside} file(s) outside the folder(s) given now"
            + (f" (it was indexed from {', '.join(before)})" if before else "") + f", e.g. {example}; this run "
            "would drop them: pass --replace to index only the given folders, or choose another --out"
        )  # fmt: skip


def _triage(entries, old, rejects, noise: str, max_pixels: int, min_side: int) -> tuple[dict, set[str], list[_Entry]]:
    """Sort the files without decoding: (records reused from ``old``, their paths, files to inspect); rejects the rest."""
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
                records[path] = ({k: row[k] for k in FILE_FIELDS}, e.split, e.size, e.mtime_ns)
                reused.add(path)
        else:
            todo.append(e)
    return records, reused, todo


def _save_progress(out: Path, records, old, todo: list[_Entry], entries: dict[str, _Entry], derived: Derived,
                   settings: dict[str, Any], done: int) -> None:
    """Write the manifest with the first ``done`` files inspected; rows of files not reached yet kept from ``old``."""
    pending = {e.path: old[e.path] for e in todo[done:] if e.path in old}
    merged = dict(records)
    for path, row in pending.items():
        merged[path] = ({k: row[k] for k in FILE_FIELDS}, entries[path].split, row["size_bytes"], row["mtime_ns"])
    write_parquet_atomic(with_metadata(assemble(merged, derived)[0], settings), out)


def _inspect_all(todo, records, rejects, checkpoint, out, *, max_pixels, min_side, workers, checkpoint_s, log) -> None:
    """Decode the files to inspect on ``workers`` threads into records or rejects; saves progress as it goes."""
    done, last_save, last_log = 0, time.monotonic(), time.monotonic()
    with _pil_limits(max_pixels), contextlib.closing(
        ordered_map(lambda e: _inspect_file(e.path, max_pixels, min_side), todo, workers)
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


def _write(result: IndexResult, records, reused, rejects, derived: Derived, settings: dict[str, Any]) -> pa.Table:
    """Write the manifest and rejects tables (duplicates resolved) and count them into ``result``."""
    table, dups = assemble(records, derived)
    rejects.update(dups)
    result.reused = len(reused - dups.keys())
    result.validated = table.num_rows - result.reused
    rej_table = pa.Table.from_pydict(
        {"path": sorted(rejects), "reason": [rejects[p] for p in sorted(rejects)]}, schema=REJECTS_SCHEMA
    )
    write_parquet_atomic(with_metadata(rej_table, settings), result.rejects)
    write_parquet_atomic(with_metadata(table, settings), result.manifest)
    result.accepted = table.num_rows
    result.rejected = dict(Counter(reason_category(r) for r in rejects.values()))
    counts = Counter(table.column("split").to_pylist())
    result.splits = {s: counts.get(s, 0) for s in SPLITS}
    return table

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
    t0 = time.monotonic()
    out = Path(out)
    folders, workers, derived, settings = _check_settings(
        dirs, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, sampler=sampler,
        sampler_options=sampler_options, max_pixels=max_pixels, min_side=min_side, workers=workers, noise=noise,
    )  # fmt: skip
    old = _read_previous(out)
    rejects: dict[str, str] = {}
    entries = _list_files(folders, rejects)
    result = IndexResult(manifest=out, rejects=rejects_path(out))
    _count_dropped(out, old, entries, result, replace)
    records, reused, todo = _triage(entries, old, rejects, noise, max_pixels, min_side)

    checkpoint = functools.partial(_save_progress, out, records, old, todo, entries, derived, settings)
    if todo:
        log(f"index: {len(entries)} files, {len(reused)} unchanged, {len(todo)} to validate ({workers} threads)")
    _inspect_all(todo, records, rejects, checkpoint, out, max_pixels=max_pixels, min_side=min_side, workers=workers,
                 checkpoint_s=checkpoint_s, log=log)  # fmt: skip
    _write(result, records, reused, rejects, derived, settings)
    result.seconds = time.monotonic() - t0
    for path in sorted(rejects)[:_MAX_LOGGED_REJECTS]:
        log(f"rejected {path}: {rejects[path]}")
    if len(rejects) > _MAX_LOGGED_REJECTS:
        log(f"... and {len(rejects) - _MAX_LOGGED_REJECTS} more rejected files: see {result.rejects}")
    if not result.accepted:
        log(f"warning: no usable image under {', '.join(f for f, _ in folders)}; {out} is empty")
    log(result.summary())
    return result
