"""Baseline self-supervised objectives in the same form as RCL, so one harness can swap them.

Each objective is an ``nn.Module`` called as ``objective(model, batch) -> dict`` where ``batch`` maps
names to [B, C, H, W] tensors (``required_keys`` lists them) and the result holds ``"loss"`` (the
scalar to minimise) and detached per-term values for logging.

* Noise2Noise (Lehtinen et al., 2018): ``noisy`` -> ``noisy2``, a second realisation of the same clean
  image with the same noise parameters; MSE.
* Noise2Self (Batson & Royer, 2019): ``input`` (noisy) only; J-invariant masking on a grid; MSE on
  masked pixels only.
* Supervised (the paper's Oracle): ``input`` -> ``target``, L1 as in the paper's fine-tuning (Sec. 4).

Batch keys are those of :data:`rcl_dist.data.spec.TASK_KEYS`.
* Consistency-only: Eq. 5 alone (RCL with alpha = 0), the ablation of the contrastive term.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Noise2NoiseObjective",
    "Noise2SelfObjective",
    "SupervisedObjective",
    "ConsistencyOnlyObjective",
    "Noise2SelfMasker",
]


class Noise2NoiseObjective(nn.Module):
    """L = || f(x_1) - x_2 ||^2 with x_1, x_2 two independent noisy realisations of one crop."""

    required_keys = ("noisy", "noisy2")

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x1, x2 = batch["noisy"], batch["noisy2"]
        loss = F.mse_loss(model.restore(x1), x2)
        return {"loss": loss, "n2n": loss.detach()}


class Noise2SelfMasker:
    """Grid masking of Noise2Self: pixels with (i % g, j % g) == phase are hidden.

    Hidden pixels are replaced by the mean of their 8 neighbours (weights 1 on the cross, 1/2 on the
    diagonals, centre excluded), so the prediction at a hidden pixel cannot depend on its own noise:
    the function restricted to the mask is J-invariant.
    """

    _KERNEL = torch.tensor([[0.5, 1.0, 0.5], [1.0, 0.0, 1.0], [0.5, 1.0, 0.5]]) / 6.0

    def __init__(self, grid: int = 4) -> None:
        if not isinstance(grid, int) or grid < 2:
            raise ValueError(f"noise2self grid must be an int >= 2, got {grid!r}")
        self.grid = grid

    @property
    def phases(self) -> int:
        return self.grid * self.grid

    def mask(self, shape: torch.Size, phase: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, H, W] mask, 1 where hidden."""
        h, w = shape[-2:]
        m = torch.zeros(1, 1, h, w, device=device, dtype=dtype)
        m[..., (phase // self.grid) :: self.grid, (phase % self.grid) :: self.grid] = 1.0
        return m

    def apply(self, x: torch.Tensor, phase: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked input [B, C, H, W] and the mask [1, 1, H, W]."""
        m = self.mask(x.shape, phase, x.device, x.dtype)
        k = self._KERNEL.to(x.device, x.dtype).expand(x.shape[1], 1, 3, 3)
        interp = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])
        return x * (1 - m) + interp * m, m


class Noise2SelfObjective(nn.Module):
    """L = || (f(J_mask(x)) - x) * m ||^2 / |m|: predict hidden pixels from their surroundings.

    The phase, one of the grid's g*g offsets, is drawn from ``generator`` (seeded: reproducible) at
    every call. At inference the plain f(x) is used, as in Batson & Royer.
    """

    required_keys = ("input",)

    def __init__(self, grid: int = 4, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.masker = Noise2SelfMasker(grid)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["input"]
        phase = int(torch.randint(self.masker.phases, (1,), generator=self.generator))
        x_masked, m = self.masker.apply(x, phase)
        out = model.restore(x_masked)
        loss = (((out - x) * m) ** 2).sum() / (m.sum() * x.shape[0] * x.shape[1])
        return {"loss": loss, "n2s": loss.detach()}


class SupervisedObjective(nn.Module):
    """The Oracle: L1 between f(x) and the clean target (any head: denoise, SR, RAW -> RGB)."""

    required_keys = ("input", "target")

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = F.l1_loss(model.restore(batch["input"]), batch["target"])
        return {"loss": loss, "l1": loss.detach()}


class ConsistencyOnlyObjective(nn.Module):
    """Eq. 5 alone on both crops of a pre-training pair: RCL's objective with alpha = 0."""

    required_keys = ("q", "k")

    def __init__(self, consistency: nn.Module) -> None:
        super().__init__()
        self.consistency = consistency

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.cat([batch["q"], batch["k"]])  # [2B, C, H, W]
        out = model(x)
        loss = self.consistency(x, model.restore(x, out))
        return {"loss": loss, "consistency": loss.detach()}
