"""Whole-image evaluation of a restorer on a folder of test images (Sec. 4-5; metrics of App. C.3).

:func:`make_test_pair` builds the (input, target) pair of a task (denoise, gaussian, sr, jdensr, jdd,
real) for one clean image, every random draw seeded by the image's content hash, so every method and
every run sees exactly the same test inputs, independent of the training realisations and of the
evaluated checkpoint's configuration. :func:`evaluate_folder` restores each input with
:func:`rcl_dist.infer.tiled_restore` and gives one row per image (PSNR/SSIM of the restored image and
of the input or the classical baseline) as a ``pyarrow.Table``; :func:`summarise`,
:func:`write_results`, :func:`evaluate_checkpoint` and :func:`main_evaluate` (``rcl-dist evaluate``)
build on it. The inputs of each task and their seeds: ``docs/evaluation.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from rcl_dist.data.images import list_images, load_image
from rcl_dist.data.spec import derived_seed, fixed_noisy_image, is_real_noisy, real_partner
from rcl_dist.infer import WHOLE_IMAGE, model_gray, model_scale, tiled_restore
from rcl_dist.metrics import image_metrics
from rcl_dist.models.base import bicubic_up
from rcl_dist.noise import demosaic_bilinear, mosaic, pack_bayer, sample_nlf, unpack_bayer

__all__ = [
    "EVAL_TASKS",
    "RESULT_COLUMNS",
    "make_test_pair",
    "baseline_prediction",
    "file_image_id",
    "evaluate_folder",
    "skipped_files",
    "summarise",
    "write_results",
    "markdown_table",
    "evaluate_checkpoint",
    "main_evaluate",
]

EVAL_TASKS: tuple[str, ...] = ("denoise", "gaussian", "sr", "jdensr", "jdd", "real")
_NOISY_TASKS = ("denoise", "gaussian", "jdensr", "jdd")

# Columns of the table of evaluate_folder, in order (one row per image).
_SCHEMA = pa.schema(
    [
        ("image", pa.string()),  # file name
        ("task", pa.string()),  # denoise, gaussian, sr, jdensr, jdd, real
        ("dataset", pa.string()),  # name of the folder
        ("psnr", pa.float64()),  # of the restored image against the target (dB)
        ("ssim", pa.float64()),
        ("psnr_input", pa.float64()),  # of the input (denoise/gaussian/real) or the classical baseline (bicubic / bilinear demosaic)
        ("ssim_input", pa.float64()),
        ("height", pa.int32()),  # of the target
        ("width", pa.int32()),
        ("shot", pa.float64()),  # Eq. 8 parameters of the synthetic noise ([0, 1] scale); null for sr and real
        ("read", pa.float64()),
        ("sigma", pa.float64()),  # fixed sigma on 0-255 when given; null otherwise
    ]
)
RESULT_COLUMNS: tuple[str, ...] = tuple(_SCHEMA.names)


# ---------------------------------------------------------------------------------------------- test inputs
def _as_tensor(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img))
    t = t.detach().to("cpu", torch.float32)
    if t.dim() != 3:
        raise ValueError(f"expected a [C, H, W] image, got shape {tuple(t.shape)}")
    return t


def _noise_params(
    image_id: str, seed: int, sigma: float | None, sigma_min: float, sigma_max: float, sampler: str
) -> tuple[float, float]:
    """(shot, read) of one test image: fixed sigma (0-255 scale) -> (0, (sigma/255)^2), else drawn."""
    if sigma is not None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0 (0-255 scale), got {sigma!r}")
        return 0.0, float((sigma / 255.0) ** 2)
    g = torch.Generator().manual_seed(derived_seed(seed, image_id, "eval-nlf"))
    options = {"sigma_min": sigma_min, "sigma_max": sigma_max} if sampler in ("uniform", "gaussian") else {}
    p = sample_nlf(sampler, 1, generator=g, **options)
    return float(p.shot[0]), float(p.read[0])


def _noisy(clean: torch.Tensor, shot: float, read: float, image_id: str, seed: int) -> torch.Tensor:
    return torch.from_numpy(fixed_noisy_image(clean.numpy(), shot, read, derived_seed(seed, image_id, "eval-noise")))


def _even(img: torch.Tensor, what: str) -> torch.Tensor:
    h, w = img.shape[-2:]
    h2, w2 = h - h % 2, w - w % 2
    if h2 < 2 or w2 < 2:
        raise ValueError(f"{what} needs an image of at least 2x2 pixels, got {h}x{w}")
    return img[:, :h2, :w2].contiguous()


def _downscale2(hr: torch.Tensor) -> torch.Tensor:
    """Bicubic, antialiased x1/2 downscale [C, H, W] -> [C, H/2, W/2] (as the training pipelines; not clamped)."""
    h, w = hr.shape[-2:]
    return F.interpolate(hr[None], size=(h // 2, w // 2), mode="bicubic", antialias=True, align_corners=False)[0]


def _check_task_sigma(task: str, sigma: float | None) -> None:
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")
    if task == "gaussian" and sigma is None:
        raise ValueError("task 'gaussian' needs sigma (0-255 scale, e.g. 15, 25 or 50)")
    if sigma is not None and task not in _NOISY_TASKS:
        raise ValueError(f"sigma applies to tasks {_NOISY_TASKS}, not {task!r}")


def make_test_pair(
    clean: torch.Tensor | np.ndarray,
    task: str,
    *,
    image_id: str,
    seed: int = 0,
    sigma_min: float = 0.0,
    sigma_max: float = 20.0 / 255.0,
    sampler: str = "uniform",
    raw: str | None = "packed",
    sigma: float | None = None,
    noisy: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed test (input, target) of ``task`` for one clean image [C, H, W] in [0, 1] (float32 tensors).

    See ``docs/evaluation.md`` for what each task produces. The same (clean, task, image_id, seed and
    noise options) always give the same tensors; another ``image_id`` gives other noise.
    ``sigma`` (0-255 scale): fixed Gaussian noise for denoise/gaussian/jdensr/jdd (required for
    ``gaussian``). ``raw``: layout of the jdd input, ``"packed"`` [4, H/2, W/2] or ``"mosaic"`` [1, H, W].
    ``real``: ``clean`` is the clean ``*_mean`` image and ``noisy`` the real ``*_real`` photograph.
    SR and JDD targets are the clean image cropped to even height and width.
    """
    _check_task_sigma(task, sigma)
    clean_t = _as_tensor(clean)

    if task == "real":
        if noisy is None:
            raise ValueError("task 'real' needs the real noisy photograph (noisy=...)")
        noisy_t = _as_tensor(noisy)
        if noisy_t.shape != clean_t.shape:
            raise ValueError(
                f"real pair: noisy {tuple(noisy_t.shape)} and clean {tuple(clean_t.shape)} differ in shape"
            )
        return noisy_t, clean_t

    if task == "sr":
        hr = _even(clean_t, "task 'sr'")
        return _downscale2(hr), hr

    shot, read = _noise_params(image_id, seed, sigma, sigma_min, sigma_max, sampler)
    if task in ("denoise", "gaussian"):
        return _noisy(clean_t, shot, read, image_id, seed), clean_t
    if task == "jdensr":
        hr = _even(clean_t, "task 'jdensr'")
        return _noisy(_downscale2(hr), shot, read, image_id, seed), hr
    # jdd
    if raw not in ("packed", "mosaic"):
        raise ValueError(f"task 'jdd' needs raw='packed' or raw='mosaic', got {raw!r}")
    if clean_t.shape[0] != 3:
        raise ValueError(f"task 'jdd' needs an RGB image, got {clean_t.shape[0]} channel(s)")
    rgb = _even(clean_t, "task 'jdd'")
    noisy_raw = _noisy(mosaic(rgb[None])[0], shot, read, image_id, seed)  # [1, H, W], noise in the RAW domain
    if raw == "packed":
        noisy_raw = pack_bayer(noisy_raw[None])[0]  # [4, H/2, W/2]
    return noisy_raw, rgb


def baseline_prediction(inp: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """What ``psnr_input`` measures: the input itself (denoise/gaussian/real), its bicubic x2 upsampling
    (sr/jdensr) or the bilinear demosaic of the RAW input (jdd), [C, H, W] like ``target``."""
    if task in ("sr", "jdensr"):
        return bicubic_up(inp[None], tuple(target.shape[-2:]))[0]
    if task == "jdd":
        raw = unpack_bayer(inp[None]) if inp.shape[0] == 4 else inp[None]
        return demosaic_bilinear(raw)[0]
    return inp


# ---------------------------------------------------------------------------------------------- folders
def file_image_id(path: str | os.PathLike) -> str:
    """The image id of a file: the first 16 hex digits of its sha256 (the manifest's ``image_id``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _check_task_model(model: nn.Module, task: str) -> None:
    s, raw = model_scale(model), getattr(model, "raw", None)
    if task in ("sr", "jdensr"):
        if s != 2 or raw is not None:
            raise ValueError(f"task {task!r} needs an x2 SR model (head 'sr2'), got scale {s} and raw={raw!r}")
    elif task == "jdd":
        if raw not in ("packed", "mosaic"):
            raise ValueError(f"task 'jdd' needs a RAW-input model (raw='packed' or 'mosaic'), got raw={raw!r}")
    elif s != 1 or raw is not None:
        raise ValueError(f"task {task!r} needs a same-size RGB/grey model, got scale {s} and raw={raw!r}")


def _files_to_evaluate(folder: Path, task: str, limit: int | None) -> list[Path]:
    """The images of ``folder`` in sorted order (``real``: the ``*_real`` ones), the first ``limit`` of them."""
    files = list_images(folder)
    if task == "real":
        files = [p for p in files if is_real_noisy(p)]
    if not files:
        what = "*_real.* images (with *_mean.* partners)" if task == "real" else "images"
        raise ValueError(f"{folder}: no {what} to evaluate")
    if limit is not None:
        files = files[:limit]
    return files


def _read_pair(path: Path, task: str, gray: bool, raw: str | None, **noise: Any) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(image id, model input, target) of one file; OSError/ValueError when it cannot be used."""
    if task == "real":
        noisy_img = load_image(path, gray=gray)
        partner = Path(real_partner(path))
        if not partner.is_file():
            raise ValueError(f"{partner}: clean partner of {path.name} is missing")
        clean = load_image(partner, gray=gray)
        image_id = path.stem
        inp, target = make_test_pair(clean, "real", image_id=image_id, noisy=noisy_img)
    else:
        image_id = file_image_id(path)
        clean = load_image(path, gray=gray)
        inp, target = make_test_pair(clean, task, image_id=image_id, raw=raw or "packed", **noise)
    return image_id, inp, target


def _results_table(rows: list[dict[str, Any]], skipped: list[dict[str, str]], settings: dict[str, Any]) -> pa.Table:
    """The per-image rows as a table, with the skipped files and the settings in its schema metadata."""
    meta = {
        b"skipped": str(len(skipped)).encode(),
        b"skipped_files": json.dumps(skipped).encode(),
        b"settings": json.dumps(settings).encode(),
    }
    return pa.Table.from_pylist(rows, schema=_SCHEMA).replace_schema_metadata(meta)


def evaluate_folder(
    model: nn.Module,
    folder: str | os.PathLike,
    task: str,
    *,
    seed: int = 0,
    limit: int | None = None,
    tile: int = 256,
    overlap: int = 32,
    gray: bool | None = None,
    sigma: float | None = None,
    sigma_min: float = 0.0,
    sigma_max: float = 20.0 / 255.0,
    sampler: str = "uniform",
    device: str | torch.device | None = None,
    progress: Callable[[str], Any] | None = print,
) -> pa.Table:
    """Restore every image of ``folder`` with ``model`` and measure it: a table with one row per image.

    Columns :data:`RESULT_COLUMNS`. Images are taken in sorted file-name order (``limit``: the first
    ``limit`` of them); for ``real`` only the ``*_real.*`` files, each with its ``*_mean.*`` partner.
    Images are converted to the model's channels (``gray=None``: grey for a 1-channel model, RGB
    otherwise). ``denoise`` with ``sigma`` is reported as ``gaussian``. ``device``: where the model runs
    (it is moved there; default: where its weights are). ``progress``: called with one line per image (``None``: silent).

    A file that cannot be read (or an image too small for the task, or a ``*_real`` file without its
    partner) is skipped with a ``UserWarning`` naming it; the rest is still evaluated. The skipped files
    are in the table's schema metadata (``skipped_files(table)``; count under ``b"skipped"``), with the
    evaluation settings (``b"settings"``, JSON).
    """
    if task == "denoise" and sigma is not None:
        task = "gaussian"
    _check_task_sigma(task, sigma)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such data folder")
    _check_task_model(model, task)
    if device is not None:
        model = model.to(device)
    raw = getattr(model, "raw", None)
    gray_images = model_gray(model) if gray is None else bool(gray)
    if task == "jdd" and gray_images:
        raise ValueError("task 'jdd' needs RGB images (gray=True was given)")
    scale = model_scale(model)
    say = progress or (lambda _msg: None)
    files = _files_to_evaluate(folder, task, limit)

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for i, path in enumerate(files, 1):
        try:
            image_id, inp, target = _read_pair(
                path, task, gray_images, raw, seed=seed, sigma_min=sigma_min, sigma_max=sigma_max, sampler=sampler, sigma=sigma
            )
        except (OSError, ValueError) as e:
            warnings.warn(f"evaluate: skipping {path}: {e}", stacklevel=2)
            skipped.append({"path": str(path), "reason": str(e)})
            continue
        pred = tiled_restore(model, inp[None], tile=tile, overlap=overlap, scale=scale)[0]
        m = image_metrics(pred, target)
        m_in = image_metrics(baseline_prediction(inp, target, task), target)
        noisy_task = task in _NOISY_TASKS
        shot, read = _noise_params(image_id, seed, sigma, sigma_min, sigma_max, sampler) if noisy_task else (None, None)
        rows.append({
            "image": path.name, "task": task, "dataset": folder.name, "psnr": m["psnr"], "ssim": m["ssim"],
            "psnr_input": m_in["psnr"], "ssim_input": m_in["ssim"], "height": int(target.shape[-2]),
            "width": int(target.shape[-1]), "shot": shot, "read": read, "sigma": None if sigma is None else float(sigma),
        })  # fmt: skip
        say(f"[{i}/{len(files)}] {path.name}: PSNR {m['psnr']:.2f} dB (input {m_in['psnr']:.2f}), SSIM {m['ssim']:.4f}")
    if skipped:
        say(f"skipped {len(skipped)} unreadable file(s): {', '.join(Path(s['path']).name for s in skipped)}")
    settings = {
        "task": task, "dataset": folder.name, "folder": str(folder), "seed": seed, "limit": limit, "tile": tile,
        "overlap": overlap, "gray": gray_images, "sigma": sigma, "sigma_min": sigma_min, "sigma_max": sigma_max,
        "sampler": sampler,
    }  # fmt: skip
    return _results_table(rows, skipped, settings)


def skipped_files(table: pa.Table) -> list[dict[str, str]]:
    """The files :func:`evaluate_folder` skipped: ``[{"path", "reason"}]`` from the table's metadata."""
    meta = table.schema.metadata or {}
    return json.loads(meta.get(b"skipped_files", b"[]"))


# ---------------------------------------------------------------------------------------------- summaries
def summarise(table: pa.Table) -> dict[str, Any]:
    """Means over the images of an :func:`evaluate_folder` table.

    Keys: ``task``, ``dataset``, ``n``, ``psnr_mean``, ``psnr_std`` (population std, ddof=0),
    ``ssim_mean``, ``psnr_input_mean``, ``ssim_input_mean``, ``skipped``. Means of an empty table are NaN.
    """
    rows = table.to_pylist()

    def stat(col: str, fn: Callable[[np.ndarray], Any]) -> float:
        v = np.array([r[col] for r in rows if r.get(col) is not None], dtype=np.float64)
        return float(fn(v)) if v.size else float("nan")

    meta = table.schema.metadata or {}
    settings = json.loads(meta.get(b"settings", b"{}"))
    first = rows[0] if rows else {}
    return {
        "task": first.get("task", settings.get("task")),
        "dataset": first.get("dataset", settings.get("dataset")),
        "n": len(rows),
        "psnr_mean": stat("psnr", np.mean),
        "psnr_std": stat("psnr", np.std),
        "ssim_mean": stat("ssim", np.mean),
        "psnr_input_mean": stat("psnr_input", np.mean),
        "ssim_input_mean": stat("ssim_input", np.mean),
        "skipped": int(meta.get(b"skipped", b"0")),
    }


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if "ssim" in key:
            return f"{v:.4f}"
        if "psnr" in key:
            return f"{v:.2f}"
        return f"{v:.4g}"
    return str(v)


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (columns: the keys in first-seen order); PSNR to 0.01 dB,
    SSIM to 4 decimals, other floats to 4 significant digits, None as an empty cell."""
    cols = list(columns) if columns is not None else _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return _json_safe(v.item())
    return v


def write_results(rows: Sequence[dict[str, Any]], out_stem: str | os.PathLike) -> dict[str, Path]:
    """Write ``rows`` to ``out_stem.parquet``, ``out_stem.json`` (a list of row objects; non-finite
    floats become null) and ``out_stem.md`` (:func:`markdown_table`). Returns ``{"parquet", "json", "md"}``
    paths. Parent folders are created."""
    import pyarrow.parquet as pq

    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    paths = {ext: stem.with_name(stem.name + "." + ext) for ext in ("parquet", "json", "md")}
    cols = _columns(rows)
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    pq.write_table(table.select(cols) if cols else table, paths["parquet"])
    paths["json"].write_text(json.dumps([{k: _json_safe(r.get(k)) for k in cols} for r in rows], indent=1) + "\n")
    paths["md"].write_text(markdown_table(rows, cols))
    return paths


# ---------------------------------------------------------------------------------------------- checkpoints / CLI
def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike, data_dir: str | os.PathLike, task: str, **kw: Any
) -> pa.Table:
    """:func:`rcl_dist.models.io.load_checkpoint` then :func:`evaluate_folder` (``kw`` go to it)."""
    from rcl_dist.models.io import load_checkpoint

    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data folder")
    model, _cfg, _state = load_checkpoint(checkpoint_path)
    return evaluate_folder(model, data_dir, task, **kw)


def _out_stem(out: str | os.PathLike, dataset: str, task: str) -> Path:
    p = Path(out)
    if p.is_dir() or str(out).endswith(("/", os.sep)):
        return p / f"{dataset}_{task}"
    return p.with_suffix("") if p.suffix in (".parquet", ".json", ".md") else p


def main_evaluate(
    model: str,
    data: str,
    task: str,
    out: str | None = None,
    seed: int = 0,
    limit: int | None = None,
    sigma: float | None = None,
    *,
    tile: int = 256,
    overlap: int = 32,
    device: str | None = None,
) -> int:
    """``rcl-dist evaluate``: evaluate checkpoint ``model`` on the images of folder ``data`` for ``task``.

    ``model`` ``classical:nlm`` / ``classical:wavelet`` / ``classical:bm3d``: the classical denoiser
    (:mod:`rcl_dist.classical`, noise level estimated from each image), on whole images (no tiles).

    Prints the per-image markdown table and a summary line; with ``out`` writes the per-image rows to
    ``out.{parquet,json,md}`` and the summary to ``out_summary.{parquet,json,md}`` (``out`` an existing
    folder or ending in '/': ``out/<dataset>_<task>``). ``sigma``: fixed Gaussian noise on the 0-255
    scale. ``device``: default cuda when available, else cpu. Returns 0, or 1 when no image could be
    evaluated. A missing checkpoint or data folder raises FileNotFoundError naming the path; a bad task
    or option raises ValueError.
    """
    from rcl_dist.classical import parse_classical
    from rcl_dist.models.io import checkpoint_file, load_checkpoint

    if not Path(data).is_dir():
        raise FileNotFoundError(f"{data}: no such data folder")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = parse_classical(model)
    if net is not None:
        tile = WHOLE_IMAGE  # one noise estimate per image, as a user would run it
    else:
        checkpoint_file(model)  # FileNotFoundError naming the path
        net, _cfg, _state = load_checkpoint(model, map_location=dev)
    table = evaluate_folder(
        net, data, task, seed=seed, limit=limit, tile=tile, overlap=overlap, sigma=sigma, device=dev,
        progress=lambda msg: print(msg, file=sys.stderr),
    )  # fmt: skip
    rows = table.to_pylist()
    summary = summarise(table)
    print(markdown_table(rows, [c for c in RESULT_COLUMNS if c not in ("shot", "read", "sigma")]))
    print(markdown_table([summary]))
    if out is not None:
        stem = _out_stem(out, summary["dataset"] or Path(data).name, summary["task"] or task)
        paths = write_results(rows, stem)
        write_results([summary], stem.with_name(stem.name + "_summary"))
        print(f"results: {paths['parquet']}, {paths['json']}, {paths['md']}")
    return 0 if rows else 1
