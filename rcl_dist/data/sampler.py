"""Training pairs drawn from images held in memory: the single-process path of the core demo, the
behaviour tests and the loss benchmark.

:class:`PairSampler` gives each image its own NLF noise parameters, drawn once (the paper's
one-to-one mapping, Sec. 4), and draws pre-training pairs as in Sec. 3.4 / Algorithm 1: a parent crop
per image, noise added once (Eq. 8), two overlapping crops of that one noisy realisation. The same
pairs read from a manifest on disk: :mod:`rcl_dist.data.reference`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rcl_dist.noise import NoiseParams, add_nlf_noise, sample_nlf

__all__ = ["PairSampler"]


class PairSampler:
    """Draws batches from a list of [C, H, W] images, each with its own noise parameters.

    ``kind``: "rcl" -> {"q", "k"} (two overlapping crops of one noisy realisation), "rcl+noise" -> the
    same with "q_noise", "k_noise" (the noise each crop holds: the residual an ideal denoiser gives), "n2n" ->
    {"noisy", "noisy2"} (two realisations of one crop), "clean" -> {"input", "target"} (noisy, clean).
    All randomness comes from ``generator``. ``noise="none"``: the images are real noisy photographs and
    nothing is added ("target" is then the same noisy pixels, "q_noise" zeros, "n2n" an error).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        crop: int,
        overlap: float = 0.5,
        params: NoiseParams | None = None,
        sampler: str = "uniform",
        sampler_options: dict | None = None,
        generator: torch.Generator | None = None,
        noise: str = "simulated",
    ) -> None:
        if noise not in ("simulated", "none"):
            raise ValueError(f"noise must be 'simulated' or 'none', got {noise!r}")
        self.noise = noise
        if not 0.0 < overlap <= 1.0:
            raise ValueError(f"overlap must be in (0, 1], got {overlap!r}")
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.crop = int(crop)
        # two crops share at least `overlap` of their side along each axis
        self.max_shift = int(round((1.0 - overlap) * self.crop))
        parent = self.crop + self.max_shift
        self.images = [torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images]
        small = [i for i, im in enumerate(self.images) if min(im.shape[-2:]) < parent]
        if small:
            raise ValueError(f"images {small[:5]} are smaller than the parent crop {parent}x{parent}")
        if len({im.shape[0] for im in self.images}) != 1:
            raise ValueError("all images must have the same number of channels")
        # one (shot, read) pair per image, drawn once: the paper's one-to-one mapping (Sec. 4)
        self.params = params or sample_nlf(sampler, len(self.images), generator=self.generator, **(sampler_options or {}))

    def __len__(self) -> int:
        return len(self.images)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator)) if high > 0 else 0

    def _crop(self, img: torch.Tensor, size: int) -> torch.Tensor:
        _, h, w = img.shape
        y, x = self._randint(h - size + 1), self._randint(w - size + 1)
        return img[:, y : y + size, x : x + size]

    def _params(self, idx: list[int]) -> NoiseParams:
        return NoiseParams(self.params.shot[idx], self.params.read[idx])

    def _noisy(self, clean: torch.Tensor, p: NoiseParams) -> torch.Tensor:
        return clean if self.noise == "none" else add_nlf_noise(clean, p, generator=self.generator)

    def sample(self, batch_size: int, kind: str = "rcl") -> dict[str, torch.Tensor]:
        if batch_size > len(self.images):
            raise ValueError(f"batch of {batch_size} distinct images requested from {len(self.images)} images")
        idx = torch.randperm(len(self.images), generator=self.generator)[:batch_size].tolist()
        p = self._params(idx)
        if kind in ("rcl", "rcl+noise"):
            s, c = self.max_shift, self.crop
            parents = torch.stack([self._crop(self.images[i], c + s) for i in idx])  # [B, C, c+s, c+s]
            noisy = self._noisy(parents, p)  # noise once per parent
            noise = noisy - parents
            out: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "q_noise": [], "k_noise": []}
            for n, e in zip(noisy, noise):
                (y1, x1), (y2, x2) = [(self._randint(s + 1), self._randint(s + 1)) for _ in range(2)]
                for key, src in (("q", n), ("q_noise", e)):
                    out[key].append(src[:, y1 : y1 + c, x1 : x1 + c])
                for key, src in (("k", n), ("k_noise", e)):
                    out[key].append(src[:, y2 : y2 + c, x2 : x2 + c])
            keys = ("q", "k", "q_noise", "k_noise") if kind == "rcl+noise" else ("q", "k")
            return {key: torch.stack(out[key]) for key in keys}
        clean = torch.stack([self._crop(self.images[i], self.crop) for i in idx])
        noisy = self._noisy(clean, p)
        if kind == "n2n":
            if self.noise == "none":
                raise ValueError("'n2n' batches need a second noisy realisation; noise='none' (real noisy photographs) has one")
            return {"noisy": noisy, "noisy2": add_nlf_noise(clean, p, generator=self.generator)}
        if kind == "clean":
            return {"input": noisy, "target": clean}
        raise ValueError(f"unknown batch kind {kind!r}; choose 'rcl', 'rcl+noise', 'n2n' or 'clean'")
