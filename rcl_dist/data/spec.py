"""What every input pipeline produces: one definition shared by the DALI pipelines (``dali.py``), the
plain PyTorch reference (``reference.py``) and the manifest (``manifest.py``, ``index.py``).

Each manifest image carries its own NLF parameters (shot, read) and ``noise_seed``, a pure function
of (base seed, content hash): the paper's one-to-one mapping between images and noise parameters
(Sec. 4). Pre-training pairs (Sec. 3.4, Algorithm 1 lines 1-2) are two crops of size c whose corners
differ by at most ``s = round((1 - overlap) * c)`` pixels per axis, cut from one parent crop of size
c + s to which Eq. 8 noise is added once (mosaicked first for RAW, every position even).
Realisations are ``fresh`` (new noise every time) or ``fixed`` (one stored noisy image per image);
``noise="none"`` takes the files as real noisy photographs. Images smaller than the crop are left
out with a warning. Details: ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

__all__ = [
    "MANIFEST_SCHEMA",
    "REJECTS_SCHEMA",
    "TASKS",
    "NOISE_KINDS",
    "TASK_KEYS",
    "PairSpec",
    "crop_geometry",
    "fixed_noisy_image",
    "simulated_path",
    "derived_seed",
    "is_real_noisy",
    "real_partner",
    "pipeline_rows",
]

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # absolute path of the file
        ("image_id", pa.string()),  # first 16 hex digits of sha256: stable across moves and re-indexing
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("channels", pa.int8()),  # after conversion: 1 (grey) or 3 (RGB); RGBA/palette become RGB
        ("bit_depth", pa.int8()),  # 8 or 16
        ("mode", pa.string()),  # the file's own colour mode (PIL), e.g. "RGB", "L", "I;16", "P", "RGBA"
        ("split", pa.string()),  # "train", "val" or "test" (seeded from the hash, or given per folder)
        ("shot", pa.float64()),  # lambda_shot of Eq. 8 on the [0, 1] scale
        ("read", pa.float64()),  # lambda_read of Eq. 8
        ("noise_seed", pa.int64()),  # seed of this image's fixed realisation
        ("sha256", pa.string()),  # content hash
        ("size_bytes", pa.int64()),
        ("mtime_ns", pa.int64()),  # with size_bytes: lets re-indexing skip unchanged files
    ]
)

REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])

TASKS = ("pretrain", "n2n", "denoise", "sr", "jdensr", "jdd", "real")
NOISE_KINDS = ("simulated", "none")

# The keys of a batch for each task ([B, C, H, W] float32 tensors in [0, 1], noise unclipped).
TASK_KEYS: dict[str, tuple[str, str]] = {
    "pretrain": ("q", "k"),  # two overlapping crops of one noisy realisation
    "n2n": ("noisy", "noisy2"),  # two noisy realisations (same parameters) of one crop
    "denoise": ("input", "target"),  # noisy crop, clean crop
    "sr": ("input", "target"),  # bicubic x2 LR of the clean crop, clean HR crop
    "jdensr": ("input", "target"),  # noisy LR (noise added to the LR), clean HR
    "jdd": ("input", "target"),  # noisy Bayer RAW (mosaic, then noise), clean RGB
    "real": ("input", "target"),  # a real noisy photograph (*_real), its clean mean (*_mean)
}


@dataclass(frozen=True)
class PairSpec:
    """What a pipeline produces; the same object configures the DALI and the reference pipeline."""

    task: str = "pretrain"
    crop: int = 64  # c: side of every output crop (HR side for sr/jdensr)
    overlap: float = 0.5  # pretrain: minimum shared fraction of the side per axis
    raw: str | None = None  # None, "mosaic" ([B,1,H,W]) or "packed" ([B,4,H/2,W/2]): pretrain / jdd input
    realisation: str = "fresh"  # "fresh" or "fixed"
    batch_size: int = 16  # per worker
    seed: int = 0  # base seed; a worker uses seed + shard_id
    shard_id: int = 0  # = world rank
    num_shards: int = 1  # = world size
    split: str | None = "train"  # manifest rows of this split (None: all)
    gray: bool = False  # 1-channel images (grey data sets); else RGB
    scale: int = 2  # sr / jdensr factor
    noise: str = "simulated"  # "simulated" (Eq. 8 on images taken as clean) or "none" (real noisy photographs)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.crop < 8:
            raise ValueError(f"crop must be >= 8, got {self.crop}")
        if not 0.0 < self.overlap <= 1.0:
            raise ValueError(f"overlap must be in (0, 1], got {self.overlap!r}")
        if self.raw not in (None, "mosaic", "packed"):
            raise ValueError(f"raw must be None, 'mosaic' or 'packed', got {self.raw!r}")
        if self.raw is not None and (self.task not in ("pretrain", "jdd") or self.gray):
            raise ValueError(f"raw={self.raw!r} applies to RGB data and tasks 'pretrain' and 'jdd', not {self.task!r}")
        if self.task == "jdd" and self.raw is None:
            raise ValueError("task 'jdd' needs raw='mosaic' or raw='packed'")
        if self.realisation not in ("fresh", "fixed"):
            raise ValueError(f"realisation must be 'fresh' or 'fixed', got {self.realisation!r}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if self.noise == "none":
            if self.task in ("n2n", "jdd", "jdensr"):
                raise ValueError(f"task {self.task!r} corrupts a clean image; with noise='none' (real noisy photographs) "
                                 "there is none: use a task that reads the noisy image itself (pretrain, denoise's input)")  # fmt: skip
            if self.realisation == "fixed":
                raise ValueError("realisation='fixed' reads stored simulated noise; with noise='none' the files are the noisy images")
            if self.raw is not None:
                raise ValueError("raw input is mosaicked from a clean RGB image before the noise; noise='none' has no clean image")
        if self.raw is not None and self.crop % 2:
            raise ValueError(f"RAW crops must have an even side, got {self.crop}")
        if self.task in ("sr", "jdensr") and self.crop % self.scale:
            raise ValueError(f"crop {self.crop} must be a multiple of scale {self.scale}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got {self.shard_id}, {self.num_shards}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def keys(self) -> tuple[str, str]:
        return TASK_KEYS[self.task]

    @property
    def min_side(self) -> int:
        """Smallest image side this spec can use (the parent crop for pre-training)."""
        return crop_geometry(self.crop, self.overlap, even=self.raw is not None)[1] if self.task == "pretrain" else self.crop


def crop_geometry(crop: int, overlap: float, even: bool = False) -> tuple[int, int]:
    """(max_shift s, parent side c + s) for two crops sharing >= ``overlap`` of their side per axis.

    ``even``: RAW crops keep the RGGB phase, so s is rounded down to an even number.
    """
    s = int(round((1.0 - overlap) * crop))
    if even:
        s -= s % 2
    return s, crop + s


def derived_seed(base_seed: int, *parts: str) -> int:
    """A 63-bit seed from a base seed and strings (e.g. a content hash): stable across runs and machines."""
    h = hashlib.sha256(("|".join([str(base_seed), *parts])).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def fixed_noisy_image(clean: np.ndarray, shot: float, read: float, noise_seed: int) -> np.ndarray:
    """The fixed realisation of Eq. 8 for one image: [C, H, W] float32 in, same shape out (unclipped).

    Noise for the whole image from ``torch.Generator().manual_seed(noise_seed)``, so the noisy image
    is a pure function of (clean image, shot, read, noise_seed) on every machine.
    """
    from rcl_dist.noise import NoiseParams, add_nlf_noise

    y = torch.from_numpy(np.ascontiguousarray(clean, dtype=np.float32))
    params = NoiseParams(torch.tensor([shot], dtype=torch.float32), torch.tensor([read], dtype=torch.float32))
    x = add_nlf_noise(y[None], params, generator=torch.Generator().manual_seed(int(noise_seed)))[0]
    return x.numpy()


def simulated_path(root: str | Path, image_id: str, raw: bool = False, index: int = 0) -> Path:
    """Where ``rcl-dist data simulate`` stores an image's fixed noisy realisation (float32 .npy, HWC).

    ``raw``: the realisation of the RGGB mosaic ([H, W, 1]), noise added in the RAW domain.
    ``index``: 0 for the realisation every task uses; 1 for Noise2Noise's second one. Realisation i
    uses seed ``noise_seed + i``.
    """
    return Path(root) / f"{image_id}{'_raw' if raw else ''}{f'_{index}' if index else ''}.npy"


def is_real_noisy(path: str | Path) -> bool:
    """A real noisy photograph of a pair folder (``*_real.*``, as in ``shared/data/real``)."""
    return Path(path).stem.endswith("_real")


def real_partner(path: str | Path) -> str:
    """The clean partner of a real noisy photograph: ``x/0001_real.png`` -> ``x/0001_mean.png``."""
    p = Path(path)
    if not is_real_noisy(p):
        raise ValueError(f"{p}: task 'real' needs files named *_real.* (clean partner *_mean.*)")
    return str(p.with_name(p.stem[: -len("_real")] + "_mean" + p.suffix))


def pipeline_rows(table: pa.Table, spec: PairSpec, stacklevel: int = 3) -> pa.Table:
    """The manifest rows a pipeline of ``spec`` draws from (the DALI and the reference pipeline alike):
    the rows of ``spec.split``, for task ``real`` only the ``*_real`` photographs, then the small-image
    rule of this module's docstring on the recorded sizes: images with a side below ``spec.min_side``
    are left out with a warning that counts them; none left is an error naming the crop, the size
    needed and the largest image."""
    import warnings

    import pyarrow.compute as pc

    what = f"split {spec.split!r}" if spec.split is not None else "manifest"
    if spec.split is not None:
        table = table.filter(pc.equal(table["split"], spec.split))
    if spec.task == "real":  # a pair folder's manifest lists both files of a pair: the *_real ones are the samples
        table = table.filter(pa.array([is_real_noisy(p) for p in table["path"].to_pylist()], type=pa.bool_()))
        what = f"*_real images of the {what}"
    if table.num_rows == 0:
        raise ValueError(f"no images in the {what}")
    need = spec.min_side
    w, h = table["width"].to_pylist(), table["height"].to_pylist()
    big = [min(a, b) >= need for a, b in zip(w, h)]
    if not any(big):
        i = max(range(len(w)), key=lambda j: (min(w[j], h[j]), w[j] * h[j]))
        raise ValueError(
            f"no image of the {what} is at least {need}x{need} (task {spec.task!r}, crop {spec.crop}"
            f"{f', parent crop {need}' if spec.task == 'pretrain' else ''}); the largest is {w[i]}x{h[i]}: "
            f"{table['path'][i].as_py()}"
        )
    if not all(big):
        warnings.warn(f"{len(big) - sum(big)} of {len(big)} images of the {what} are smaller than {need}x{need} "
                      f"(task {spec.task!r}, crop {spec.crop}) and are left out", stacklevel=stacklevel)  # fmt: skip
        table = table.filter(pa.array(big, type=pa.bool_()))
    return table
