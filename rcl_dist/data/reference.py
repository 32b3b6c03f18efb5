"""Plain PyTorch pairs from a manifest: the reference the DALI pipelines are compared with, and the
fallback where DALI is not installed.

:class:`ManifestPairs` (a map-style ``torch.utils.data.Dataset``), :class:`ShardSampler` and
:func:`make_loader` read the images of a manifest (``rcl-dist data index``) from disk and produce
exactly the pairs that :mod:`rcl_dist.data.spec` defines for the DALI pipelines, for every task, with
the noise model of :mod:`rcl_dist.noise` (Eq. 8). Pre-training pairs follow Sec. 3.4 / Algorithm 1:
for each of N+1 distinct images, a parent crop is cut, noise is added once with that image's own NLF
parameters, and two crops of size c whose offsets differ by at most ``max_shift`` pixels per axis are
taken from the same noisy realisation. In-memory images: :class:`rcl_dist.data.sampler.PairSampler`.
"""

from __future__ import annotations

import math
import numbers
import os
import random
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from rcl_dist.data.images import load_image
from rcl_dist.data.manifest import load_manifest
from rcl_dist.data.spec import (
    PairSpec,
    crop_geometry,
    derived_seed,
    fixed_noisy_image,
    pipeline_rows,
    real_partner,
    simulated_path,
)
from rcl_dist.noise import BAYER_PATTERN, NoiseParams, add_nlf_noise, pack_bayer

__all__ = ["ManifestPairs", "ShardSampler", "EpochLoader", "make_loader"]


# ---------------------------------------------------------------------------------------------------
# Manifest-driven pairs: the plain PyTorch twin of the DALI pipelines (rcl_dist.data.dali)
# ---------------------------------------------------------------------------------------------------

_REQUIRED_COLUMNS = ("path", "image_id", "width", "height", "split", "shot", "read", "noise_seed")


class _Unreadable(Exception):
    """An indexed file that cannot be used any more (vanished, replaced, undecodable)."""


def _randint(g: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high) (0 when high <= 1, without drawing)."""
    return int(torch.randint(high, (1,), generator=g)) if high > 1 else 0


def _randpos(g: torch.Generator, hi: int, even: bool) -> int:
    """Uniform position in [0, hi]; with ``even`` uniform over the even positions of that range."""
    return 2 * _randint(g, hi // 2 + 1) if even else _randint(g, hi + 1)


def _mosaic_chw(rgb: torch.Tensor) -> torch.Tensor:
    """RGGB mosaic of one [3, H, W] image of any size -> [1, H, W] (the colour of a pixel depends on the
    parity of its absolute position; equal to :func:`rcl_dist.noise.mosaic` for even sides)."""
    raw = torch.empty_like(rgb[:1])
    for dy in (0, 1):
        for dx in (0, 1):
            raw[0, dy::2, dx::2] = rgb[BAYER_PATTERN[dy][dx], dy::2, dx::2]
    return raw


def _downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic, antialiased 1/scale downscale of [C, H, W] (H, W multiples of scale); not clamped (like
    DALI's cubic resize of float images, it may overshoot [0, 1] slightly at edges)."""
    h, w = hr.shape[-2:]
    lr = F.interpolate(hr[None], size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return lr[0]


class _LRU:
    """Per-process cache of arrays with a byte budget (the fixed realisations computed on the fly)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.items: OrderedDict = OrderedDict()
        self.bytes = 0

    def get(self, key, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        if value.nbytes <= self.max_bytes:
            self.items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.bytes -= old.nbytes
        return value


def _read_manifest(manifest) -> dict[str, list]:
    table = load_manifest(manifest)
    return {c: table.column(c).to_pylist() for c in _REQUIRED_COLUMNS}


class ManifestPairs(Dataset):
    """Training pairs of one task (``spec.task``) from the images of a manifest, read from disk.

    ``ds[i]`` is a dict ``{key: float32 tensor [C, H, W]}`` with the keys ``spec.keys``, exactly as
    :mod:`rcl_dist.data.spec` defines them for the DALI pipelines:

    * ``pretrain`` -> q, k: a random parent crop of side c + s (:func:`crop_geometry`), noise added once
      (Eq. 8, the row's shot/read), two crops of side c at offsets in [0, s] per axis of that one noisy
      parent. With ``spec.raw`` the parent is mosaicked (RGGB) before the noise, every position (parent
      and offsets) is even, and the crops are the mosaic [1, c, c] or its packed form [4, c/2, c/2].
    * ``n2n`` -> noisy, noisy2: two realisations of one clean crop.
    * ``denoise`` -> input (noisy crop), target (clean crop).
    * ``sr`` -> input: bicubic antialiased 1/scale downscale of the HR crop (``F.interpolate``, not
      clamped), target: the clean HR crop.
    * ``jdensr`` -> input: that LR with noise added to the LR, target: the clean HR crop.
    * ``jdd`` -> input: noisy RAW (mosaic of the clean crop at an even position, then noise; mosaic or
      packed), target: the clean RGB crop.
    * ``real`` -> input: a crop of a ``*_real.*`` photograph, target: the same crop of its ``*_mean.*``
      partner (:func:`real_partner`); no synthetic noise. Rows that are not ``*_real`` files (the
      ``*_mean`` partners themselves) are not samples.

    Realisations (``spec.realisation``):

    * ``fresh``: new noise for every sample, from a per-sample generator seeded with
      ``derived_seed(spec.seed, "reference", shard_id, epoch, index)``: reproducible, independent of
      the number of workers and of the order of the samples, different in every epoch. Crop positions
      come from the same generator, so they change with the epoch too.
    * ``fixed``: crops are cut from the image's one noisy realisation ``fixed_noisy_image(clean, shot,
      read, noise_seed)`` (Noise2Noise's second realisation: ``noise_seed + 1``; RAW: the realisation of
      the mosaic of the whole image). It is read from ``simulated_dir`` (``rcl-dist data simulate``,
      :func:`simulated_path`, float32 HWC .npy, memory-mapped so that only the crop is read) when given
      and the file exists; otherwise it is computed on the fly, which gives the same values, and kept in
      a per-process LRU cache of ``cache_bytes`` (each DataLoader worker has its own). Only the crop
      positions change with the epoch. ``sr`` and ``real`` have no synthetic noise and ignore the
      realisation; ``jdensr`` with ``fixed`` is an error, as in the DALI pipeline (the noise is added to
      the LR image, and a stored realisation is of the full-size image).

    Images are loaded with :func:`load_image` (8/16-bit, grey, RGBA), as 1 channel with ``spec.gray``
    and as RGB otherwise. Rows of another split than ``spec.split`` are not used.

    Construction drops (with one warning each that counts them) images smaller than ``spec.min_side``
    (manifest sizes) and files that vanished since indexing (named in the warning; their number is
    ``skipped``, their paths ``skipped_paths``); it fails if no image is left, naming the crop and the
    largest image. A file that cannot be read later (vanished, replaced by a smaller image, undecodable)
    does not end the epoch: ``ds[i]`` then returns the sample of the next readable index
    (i + 1, i + 2, ... modulo len), drawn with the generator of (epoch, i), so the substitution is
    deterministic; each event warns once per file and process and is counted in ``substituted``, a
    counter in shared memory that DataLoader workers add to (increments are not locked: a count, not
    an audit log).

    ``ds[i]`` uses the epoch of :meth:`set_epoch`; ``ds[(epoch, i)]`` gives it explicitly, which is what
    :class:`ShardSampler` with ``with_epoch=True`` yields so that persistent workers see the epoch.
    """

    def __init__(
        self,
        manifest_table_or_path,
        spec: PairSpec,
        simulated_dir: str | os.PathLike | None = None,
        *,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.spec = spec
        self.simulated_dir = Path(simulated_dir) if simulated_dir is not None else None
        self.cache_bytes = int(cache_bytes)
        self.epoch = 0
        if spec.realisation == "fixed" and spec.task == "jdensr":
            raise ValueError(
                "task 'jdensr' adds noise to the LR image; a stored realisation is of the full-size image, and "
                "downscaling it would change the noise level: use realisation='fresh'"
            )
        table = pipeline_rows(load_manifest(manifest_table_or_path), spec)  # split, *_real, small-image rule
        rows = [dict(zip(_REQUIRED_COLUMNS, vals)) for vals in zip(*(table.column(c).to_pylist() for c in _REQUIRED_COLUMNS))]

        # files that vanished since indexing
        def present(r: dict) -> bool:
            return os.path.isfile(r["path"]) and (spec.task != "real" or os.path.isfile(real_partner(r["path"])))

        gone = [r["path"] for r in rows if not present(r)]
        self.skipped_paths: list[str] = gone
        if gone:
            rows = [r for r in rows if present(r)]
            shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
            warnings.warn(
                f"{len(gone)} indexed files no longer exist (or lack their *_mean partner) and are left out: {shown}",
                stacklevel=2,
            )
            if not rows:
                raise ValueError(f"none of the indexed images of split {spec.split!r} exists any more")
        self.rows = rows

        if self.simulated_dir is not None and spec.realisation == "fixed" and spec.task not in ("sr", "real"):
            missing = sum(not p.is_file() for i in range(len(rows)) for p in self._simulated_paths(i))
            if missing:
                warnings.warn(
                    f"{missing} fixed realisations are missing from {self.simulated_dir}; they are computed on the fly "
                    f"(same values; run 'rcl-dist data simulate' to store them)",
                    stacklevel=2,
                )
        self._substituted = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._init_process_state()

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _init_process_state(self) -> None:
        self._cache = _LRU(self.cache_bytes)
        self._warned: set[str] = set()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_cache", None)
        state.pop("_warned", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    @property
    def skipped(self) -> int:
        """Number of indexed files left out at construction because they no longer existed."""
        return len(self.skipped_paths)

    @property
    def substituted(self) -> int:
        """Number of samples replaced by another image because their file could not be read."""
        return int(self._substituted[0])

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.rows]

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``ds[i]`` uses (fresh noise and crop positions differ per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def sample_seed(self, epoch: int, index: int) -> int:
        s = self.spec
        return derived_seed(s.seed, "reference", str(s.shard_id), str(int(epoch)), str(int(index)))

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index, n = int(index), len(self.rows)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        seed = self.sample_seed(epoch, index)
        for k in range(n):
            j = (index + k) % n
            try:
                out = self._sample(j, torch.Generator().manual_seed(seed))
            except _Unreadable as e:
                if str(e) not in self._warned:
                    self._warned.add(str(e))
                    warnings.warn(f"{e}; its samples are replaced by other images", stacklevel=2)
                continue
            if k:
                self._substituted += 1
            return out
        raise RuntimeError(f"none of the {n} indexed images can be read any more")

    # -- reading -------------------------------------------------------------------------------------

    def _load(self, path: str, min_side: int) -> torch.Tensor:
        try:
            img = load_image(path, gray=self.spec.gray)
        except (ValueError, OSError) as e:
            reason = "vanished" if not os.path.exists(path) else f"cannot be read ({e})"
            raise _Unreadable(f"{path} {reason}") from None
        if min(img.shape[-2:]) < min_side:
            raise _Unreadable(f"{path} is now {img.shape[2]}x{img.shape[1]}, smaller than {min_side}x{min_side}")
        return torch.from_numpy(img)

    def _clean(self, i: int) -> torch.Tensor:
        return self._load(self.rows[i]["path"], self.spec.min_side)

    def _params(self, i: int) -> NoiseParams:
        r = self.rows[i]
        return NoiseParams(torch.tensor([r["shot"]], dtype=torch.float32), torch.tensor([r["read"]], dtype=torch.float32))

    def _raw_fixed(self) -> bool:
        return self.spec.raw is not None

    def _simulated_paths(self, i: int) -> list[Path]:
        n = 2 if self.spec.task == "n2n" else 1
        return [simulated_path(self.simulated_dir, self.rows[i]["image_id"], raw=self._raw_fixed(), index=k) for k in range(n)]

    def _fixed_crop(self, i: int, y: int, x: int, size: int, index: int = 0) -> torch.Tensor:
        """[C, size, size] crop at (y, x) of the image's fixed realisation ``index`` (RAW: of its mosaic)."""
        r, raw = self.rows[i], self._raw_fixed()
        if self.simulated_dir is not None:
            path = simulated_path(self.simulated_dir, r["image_id"], raw=raw, index=index)
            if path.is_file():
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                channels = 1 if raw or self.spec.gray else 3
                if arr.ndim != 3 or arr.shape != (r["height"], r["width"], channels) or arr.dtype != np.float32:
                    raise ValueError(
                        f"{path}: expected float32 [{r['height']}, {r['width']}, {channels}], got {arr.dtype} "
                        f"{list(arr.shape)}; rerun 'rcl-dist data simulate' for this manifest"
                    )
                crop = np.array(arr[y : y + size, x : x + size, :], dtype=np.float32)
                return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))

        def make() -> np.ndarray:
            clean = self._clean(i)
            if raw:
                clean = _mosaic_chw(clean)
            return fixed_noisy_image(clean.numpy(), r["shot"], r["read"], r["noise_seed"] + index)

        full = self._cache.get((i, raw, index), make)
        return torch.from_numpy(np.ascontiguousarray(full[:, y : y + size, x : x + size]))

    # -- the pairs -----------------------------------------------------------------------------------

    def _noisy(self, clean: torch.Tensor, i: int, g: torch.Generator) -> torch.Tensor:
        """Eq. 8 with image i's own parameters; ``noise="none"``: the file's pixels, already noisy."""
        return clean if self.spec.noise == "none" else add_nlf_noise(clean, self._params(i), generator=g)

    def _sample(self, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        spec, c = self.spec, self.spec.crop
        task, fixed = spec.task, spec.realisation == "fixed"
        r = self.rows[i]
        h, w = r["height"], r["width"]
        a, b = spec.keys

        if task == "pretrain":
            even = spec.raw is not None
            s, parent = crop_geometry(c, spec.overlap, even=even)
            py, px = _randpos(g, h - parent, even), _randpos(g, w - parent, even)
            if fixed:
                noisy = self._fixed_crop(i, py, px, parent)
            else:
                clean = self._clean(i)[:, py : py + parent, px : px + parent]
                if even:
                    clean = _mosaic_chw(clean)
                noisy = self._noisy(clean, i, g)  # once, for both crops
            (qy, qx), (ky, kx) = [(_randpos(g, s, even), _randpos(g, s, even)) for _ in range(2)]
            q, k = noisy[:, qy : qy + c, qx : qx + c], noisy[:, ky : ky + c, kx : kx + c]
            if spec.raw == "packed":
                q, k = pack_bayer(q[None])[0], pack_bayer(k[None])[0]
            return {a: q.contiguous(), b: k.contiguous()}

        if task == "real":
            y, x = _randpos(g, h - c, False), _randpos(g, w - c, False)
            noisy = self._clean(i)
            mean = self._load(real_partner(r["path"]), c)
            if mean.shape != noisy.shape:
                raise _Unreadable(f"{real_partner(r['path'])} has shape {list(mean.shape)}, its *_real partner {list(noisy.shape)}")
            return {a: noisy[:, y : y + c, x : x + c].contiguous(), b: mean[:, y : y + c, x : x + c].contiguous()}

        if task == "jdd":
            y, x = _randpos(g, h - c, True), _randpos(g, w - c, True)
            target = self._clean(i)[:, y : y + c, x : x + c]
            if fixed:
                noisy = self._fixed_crop(i, y, x, c)
            else:
                noisy = add_nlf_noise(_mosaic_chw(target), self._params(i), generator=g)
            if spec.raw == "packed":
                noisy = pack_bayer(noisy[None])[0]
            return {a: noisy.contiguous(), b: target.contiguous()}

        if task in ("sr", "jdensr"):
            y, x = _randpos(g, h - c, False), _randpos(g, w - c, False)
            target = self._clean(i)[:, y : y + c, x : x + c].contiguous()
            lr = _downscale(target, spec.scale)
            if task == "jdensr":
                lr = add_nlf_noise(lr, self._params(i), generator=g)
            return {a: lr.contiguous(), b: target}

        # n2n, denoise
        y, x = _randpos(g, h - c, False), _randpos(g, w - c, False)
        if fixed:
            first = self._fixed_crop(i, y, x, c, 0)
            second = self._fixed_crop(i, y, x, c, 1) if task == "n2n" else self._clean(i)[:, y : y + c, x : x + c]
        else:
            clean = self._clean(i)[:, y : y + c, x : x + c]
            first = self._noisy(clean, i, g)
            second = add_nlf_noise(clean, self._params(i), generator=g) if task == "n2n" else clean
        return {a: first.contiguous(), b: second.contiguous()}


class ShardSampler(Sampler):
    """The indices of one shard (``shard_id`` = rank, ``num_shards`` = world size) for one epoch.

    Each epoch, the indices 0..n-1 are shuffled with ``torch.Generator().manual_seed(seed + epoch)``
    (the same permutation on every rank: ``seed`` must be the common base seed, not seed + rank), padded
    to a multiple of ``num_shards`` by repeating the first indices of the permutation, and dealt out
    round-robin: shard r gets positions r, r + num_shards, ... So every image appears once per epoch
    across the shards (plus the few padding repeats), the shards are disjoint apart from the padding,
    and every shard has ``ceil(n / num_shards)`` samples. With ``drop_last=True`` batching (as in
    :func:`make_loader`), every rank then has the same number of batches: the counterpart of DALI's
    ``pad_last_batch=True`` with ``LastBatchPolicy.DROP``. (DALI's reader pads the last batch of a
    shard by repeating that shard's last sample and cuts contiguous shards of the file list; the set of
    images per epoch is the same, their order and the shard each lands in are not.)

    ``set_epoch(e)`` chooses the epoch of the next iteration; without it, each iteration uses the
    epoch after the previous one (starting at 0), so a loop over a loader reshuffles by itself.
    ``with_epoch=True`` yields ``(epoch, index)`` pairs, which :class:`ManifestPairs` understands, so
    that DataLoader workers (also persistent ones) see the epoch of the batch they produce.
    """

    def __init__(
        self,
        data_source_or_len,
        num_shards: int = 1,
        shard_id: int = 0,
        *,
        seed: int = 0,
        shuffle: bool = True,
        with_epoch: bool = False,
    ) -> None:
        n = int(data_source_or_len) if isinstance(data_source_or_len, numbers.Integral) else len(data_source_or_len)
        if n < 1:
            raise ValueError("ShardSampler needs at least one sample")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got {shard_id}, {num_shards}")
        self.n, self.num_shards, self.shard_id = int(n), int(num_shards), int(shard_id)
        self.seed, self.shuffle, self.with_epoch = int(seed), bool(shuffle), bool(with_epoch)
        self.epoch = 0  # the epoch of the latest (or, before any, the first) iteration
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_shards)

    def indices(self, epoch: int) -> list[int]:
        """This shard's indices for ``epoch`` (no state change)."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + int(epoch))).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.num_shards
        order = (order * math.ceil(total / self.n))[:total]  # pad with the first indices
        return order[self.shard_id :: self.num_shards]

    def __iter__(self) -> Iterator:
        epoch = self.epoch = self._next_epoch
        self._next_epoch = epoch + 1
        idx = self.indices(epoch)
        return iter([(epoch, i) for i in idx] if self.with_epoch else idx)


class EpochLoader(DataLoader):
    """A DataLoader over :class:`ManifestPairs` with a :class:`ShardSampler`; ``set_epoch`` sets both."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)


def _worker_init(worker_id: int) -> None:
    """Seed the global RNGs of a worker from its DataLoader seed (the pairs use per-sample generators;
    this only keeps any other random call reproducible) and keep each worker on one thread."""
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.set_num_threads(1)


def make_loader(
    manifest,
    spec: PairSpec,
    *,
    num_workers: int = 0,
    simulated_dir: str | os.PathLike | None = None,
    pin_memory: bool = False,
) -> EpochLoader:
    """The reference pipeline of ``spec``: batches ``{key: [B, C, H, W]}`` of ``spec.batch_size`` pairs.

    ``manifest``: a pyarrow Table, the path of a manifest parquet, or a :class:`ManifestPairs`.
    Rank ``spec.shard_id`` of ``spec.num_shards`` (:class:`ShardSampler`, shuffled with ``spec.seed`` +
    epoch); the last partial batch is dropped so all ranks have ``len(loader)`` batches. The batches
    are the same for any ``num_workers`` (per-sample generators; the epoch travels with the index);
    workers are persistent when ``num_workers > 0``. Call ``loader.set_epoch(e)`` before each epoch,
    or let each new iteration advance the epoch by one.
    """
    if isinstance(manifest, ManifestPairs):
        ds = manifest
        if ds.spec != spec:
            raise ValueError(f"the dataset was built for {ds.spec}, not for {spec}")
    else:
        ds = ManifestPairs(manifest, spec, simulated_dir)
    sampler = ShardSampler(len(ds), spec.num_shards, spec.shard_id, seed=spec.seed, with_epoch=True)
    if len(sampler) < spec.batch_size:
        raise ValueError(
            f"shard {spec.shard_id} of {spec.num_shards} has {len(sampler)} images per epoch ({len(ds)} in all), "
            f"fewer than one batch of {spec.batch_size}"
        )
    return EpochLoader(
        ds,
        batch_size=spec.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(derived_seed(spec.seed, "loader", str(spec.shard_id))),
    )
