"""Denoise image files with a fine-tuned model: ``rcl-dist denoise``.

:func:`denoise_paths` (CLI: :func:`main_denoise`) restores image files and folders with a model given as
a checkpoint (file or folder holding ``state.pt``) or an MLflow model URI (``models:/NAME@alias``,
``models:/NAME/3``, ``runs:/RUN/denoiser``, or a local MLflow model folder; see
:func:`rcl_dist.serving.load_denoiser`). Inference is tiled (:func:`rcl_dist.infer.tiled_restore`),
so the network's memory is bounded by the tile size, not the image size. Outputs keep the input's bit
depth and channels (JPEG in, PNG out); every file is read under the pixel budget and the regular-file
rule of :mod:`rcl_dist.data.images`; an existing file is replaced only if this command wrote it and
it has not changed since (:data:`OUTPUT_RECORD`), and a bad file fails alone. Formats, where outputs
go, the overwrite rule and failures: ``docs/denoise.md``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rcl_dist.data.codec import from_float, read_image, to_float, write_image
from rcl_dist.data.images import IMAGE_SUFFIXES, pixel_budget, read_regular_file, show_path
from rcl_dist.infer import restore_array

__all__ = [
    "load_restorer",
    "output_suffix",
    "plan_outputs",
    "denoise_paths",
    "main_denoise",
    "OUTPUT_RECORD",
]

_KEEP_SUFFIX = {".png": ".png", ".tif": ".tif", ".tiff": ".tiff", ".bmp": ".bmp"}
OUTPUT_RECORD = ".rcl-denoise-outputs.json"  # in every output folder: the files this command wrote there
_MODEL_URI_PREFIXES = ("models:/", "runs:/", "mlflow-artifacts:/", "file:/", "s3://", "gs://", "wasbs://", "hdfs://", "dbfs:/")


def _is_model_uri(model: str) -> bool:
    s = str(model)
    if s.startswith(_MODEL_URI_PREFIXES):
        return True
    p = Path(s)
    return p.is_dir() and (p / "MLmodel").is_file()  # a local MLflow model folder


def load_restorer(model: str | os.PathLike, *, tracking_uri: str | None = None, device: str | None = None):
    """The torch Restorer behind ``model``: an MLflow model URI (the checkpoint inside the registered
    pyfunc model, see :func:`rcl_dist.serving.load_denoiser`) or a checkpoint file/folder.

    Raises ``ValueError`` for an unknown model URI or a RAW-input model, ``FileNotFoundError`` for a
    missing checkpoint path.
    """
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_model_uri(str(model)):
        from rcl_dist.serving import restorer_from_uri

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
    ``overwrite``: replace existing outputs this command did not write. See ``docs/denoise.md`` for
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
