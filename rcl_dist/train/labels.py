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

__all__ = ["LabelSet", "LabelBatches", "label_pair_spec", "build_label_set"]


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
