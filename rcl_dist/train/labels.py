"""The labelled set of a fine-tuning run: exactly ``spec.labels`` (input, target) crops, held in memory.

The set is a pure function of (manifest, split, task, crop, seed, realisation, the model's input
layout), not of the method, mode or number of workers: every method compared at one N sees the same
crops, and the labels of a smaller N are the first N of a larger one (nested label sets, as in
Table 3). Rank ``r`` of ``w`` builds only labels ``r, r + w, ...``. In memory, not DALI: the set is
tiny and fixed (the point of the study is few labels), while DALI draws fresh crops and noise every
epoch. How labels and batches are drawn: ``docs/finetune.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rcl_dist.train.finetune_spec import FinetuneSpec

__all__ = ["LabelSet", "LabelBatches", "label_pair_spec", "build_label_set", "augmentation", "augment_pairs"]


@dataclass
class LabelSet:
    """Labelled crops held in memory: ``input`` [n, C, h, w], ``target`` [n, C', H, W], ``index`` [n]
    (each crop's label number in 0..N-1)."""

    input: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device | str) -> LabelSet:
        return LabelSet(self.input.to(device), self.target.to(device), self.index)


def augmentation(spec: FinetuneSpec, channels: int) -> str:
    """The augmentation a run uses: ``spec.augment`` with "auto" resolved (see FinetuneSpec.augment).
    Channel permutation only where input and target are both RGB (``channels`` = 3, not packed RAW)."""
    if spec.augment != "auto":
        return spec.augment if channels == 3 or spec.augment != "dihedral+channels" else "dihedral"
    if spec.task == "jdd":
        return "none"
    return "dihedral+channels" if channels == 3 else "dihedral"


def augment_pairs(x: torch.Tensor, y: torch.Tensor, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair (x[i], y[i]) under its own random symmetry: the same rotation by k*90 degrees, transpose
    and (``"dihedral+channels"``) RGB permutation on input and target, so a pair stays a pair.

    Why: the noise of Eq. 8 is independent per pixel and channel with a variance set by the pixel's own
    value, so a rotated, flipped or channel-permuted pair is a pair of the same task. With few labels
    (10 crops) a network without the input skip otherwise fits the crops' own colours: measured, a
    pre-trained direct U-Net fine-tuned on 10 CBSD432 crops returned 0.35 for a saturated red of 0.95
    (McMaster 22.4 dB against its 31.4 dB input; docs/finetune.md). Square crops only (rot90 and
    transpose keep the side); ``generator`` is a CPU generator (drawn per pair: reproducible).
    """
    if kind == "none":
        return x, y
    if x.shape[-1] != x.shape[-2] or y.shape[-1] != y.shape[-2]:
        raise ValueError(f"augment {kind!r} needs square crops, got input {tuple(x.shape)} and target {tuple(y.shape)}")
    b = x.shape[0]
    k = torch.randint(4, (b,), generator=generator).tolist()
    t = torch.randint(2, (b,), generator=generator).tolist()
    perms = [torch.randperm(3, generator=generator) for _ in range(b)] if kind == "dihedral+channels" else None
    xs, ys = [], []
    for i in range(b):
        xi, yi = x[i], y[i]
        if t[i]:
            xi, yi = xi.transpose(-1, -2), yi.transpose(-1, -2)
        xi, yi = torch.rot90(xi, k[i], (-2, -1)), torch.rot90(yi, k[i], (-2, -1))
        if perms is not None:
            p = perms[i].to(x.device)
            xi, yi = xi[p], yi[p]
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs).contiguous(), torch.stack(ys).contiguous()


def label_pair_spec(spec: FinetuneSpec, raw: str | None, gray: bool):
    """The :class:`PairSpec` whose samples are the labels (one shard: labels do not depend on workers)."""
    from rcl_dist.data.spec import PairSpec

    return PairSpec(
        task=spec.task,
        crop=spec.crop,
        raw=raw if spec.task == "jdd" else None,
        realisation=spec.realisation,
        batch_size=1,
        seed=spec.seed,
        shard_id=0,
        num_shards=1,
        split=spec.split,
        gray=gray,
    )


def _label_keys(n_images: int, labels: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, image index) of every label: label i -> epoch i // n, image perm_epoch[i % n]."""
    from rcl_dist.data.spec import derived_seed

    keys, perms = [], {}
    for i in range(labels):
        e, j = divmod(i, n_images)
        if e not in perms:
            g = torch.Generator().manual_seed(derived_seed(seed, "finetune-labels", str(e)) % (1 << 62))
            perms[e] = torch.randperm(n_images, generator=g).tolist()
        keys.append((e, perms[e][j]))
    return keys


def build_label_set(
    spec: FinetuneSpec,
    raw: str | None,
    gray: bool,
    rank: int = 0,
    world: int = 1,
    threads: int | None = None,
) -> LabelSet:
    """Labels ``rank, rank + world, ...`` of the ``spec.labels`` labels (see the module docstring and
    ``docs/finetune.md``).

    ``raw``/``gray``: the model's input layout (``model.raw``, ``in_channels == 1``).
    """
    from torch.utils.data import DataLoader

    from rcl_dist.data.reference import ManifestPairs

    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got {rank}, {world}")
    if not Path(spec.manifest).is_file():
        raise FileNotFoundError(f"manifest: {spec.manifest} does not exist (create it with `rcl-dist data index`)")
    ds = ManifestPairs(spec.manifest, label_pair_spec(spec, raw, gray), spec.simulated_dir)
    keys = _label_keys(len(ds), spec.labels, spec.seed)
    mine = list(range(rank, spec.labels, world))
    threads = spec.label_threads if threads is None else threads
    loader = DataLoader(ds, batch_size=None, sampler=[keys[i] for i in mine], num_workers=threads)
    samples = list(loader)
    a, b = ds.spec.keys
    return LabelSet(
        torch.stack([s[a] for s in samples]),
        torch.stack([s[b] for s in samples]),
        torch.tensor(mine, dtype=torch.int64),
    )


class LabelBatches:
    """Batches of ``batch`` distinct local label indices from seeded permutations (drop-last)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int) -> None:
        from rcl_dist.data.spec import derived_seed

        if not 1 <= batch <= n:
            raise ValueError(f"batch {batch} must be in 1..{n} (the labels of this worker)")
        self.n, self.batch = n, batch
        self.g = torch.Generator().manual_seed(derived_seed(seed, "finetune-batches", str(rank)) % (1 << 62))
        self.order: list[int] = []
        self.epoch = -1

    def next(self) -> torch.Tensor:
        if len(self.order) < self.batch:
            self.order = torch.randperm(self.n, generator=self.g).tolist()
            self.epoch += 1
        out, self.order = self.order[: self.batch], self.order[self.batch :]
        return torch.tensor(out, dtype=torch.int64)
