"""Baseline self-supervised objectives in the same form as RCL, so one harness can swap them (Sec. 5).

Each objective is an ``nn.Module`` called as ``objective(model, batch) -> dict`` where ``batch`` maps
names to [B, C, H, W] tensors (``required_keys`` lists them; the keys of
:data:`rcl_dist.data.spec.TASK_KEYS`) and the result holds ``"loss"`` (the scalar to minimise) and
detached per-term values for logging: Noise2Noise, Noise2Self, Neighbor2Neighbor, Blind2Unblind,
supervised (the paper's Oracle, L1 as in Sec. 4) and consistency-only (Eq. 5 alone, RCL with
alpha = 0). Objectives whose weight follows the training progress (Blind2Unblind) have
``set_progress(step, total)``; every trainer calls it before the step's forward pass, so the schedule
is explicit and nothing changes inside ``forward``. What each one trains on: ``docs/losses.md``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Noise2NoiseObjective",
    "Noise2SelfObjective",
    "Neighbor2NeighborObjective",
    "NeighborSubsampler",
    "Blind2UnblindObjective",
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


class NeighborSubsampler:
    """The random neighbour sub-sampler G = (g_1, g_2) of Neighbor2Neighbor (Huang et al., Sec. 3.2).

    The image is cut into 2x2 cells (positions 0 = top-left, 1 = top-right, 2 = bottom-left,
    3 = bottom-right); in every cell one of the 8 ordered pairs of edge-adjacent positions is drawn,
    its first pixel goes to g_1(y), its second to g_2(y): two [B, C, H/2, W/2] sub-images whose
    pixels are neighbours in y. One draw per cell serves every channel.
    """

    PAIRS = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3], [1, 0], [2, 0], [3, 1], [3, 2]])

    def draw(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """Pair index in [0, 8) per cell: int64 [B, H/2, W/2], from ``generator`` (CPU)."""
        b, _, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"Neighbor2Neighbor needs even image sides, got {h}x{w}")
        return torch.randint(len(self.PAIRS), (b, h // 2, w // 2), generator=generator)

    def apply(self, x: torch.Tensor, pair_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g_1(x), g_2(x) for the cells' drawn pairs ``pair_index`` ([B, H/2, W/2])."""
        b, c, h, w = x.shape
        cells = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)
        pairs = self.PAIRS.to(x.device)[pair_index.to(x.device)]  # [B, H/2, W/2, 2]
        idx = pairs.unsqueeze(1).expand(b, c, h // 2, w // 2, 2)  # same positions in every channel
        picked = torch.gather(cells, -1, idx)  # [B, C, H/2, W/2, 2]
        return picked[..., 0], picked[..., 1]


class Neighbor2NeighborObjective(nn.Module):
    """Huang et al. (CVPR 2021), Sec. 3: the reconstruction loss with its regulariser,

        L = || f(g_1(y)) - g_2(y) ||^2 + gamma || f(g_1(y)) - g_2(y) - (g_1(f(y)) - g_2(f(y))) ||^2

    with f(y) computed without gradient (the paper's stop-gradient) and both norms as means over
    elements. ``gamma`` = 2 is the paper's choice (deepinv's too); the authors' code ramps it from 0 to
    2 over training, the paper's text and deepinv keep it constant, as here. Inference is the plain
    f(y). Needs even crop sides, and a network that accepts half-size inputs (crop / 2 a multiple of
    the U-Net's 2^depth).
    """

    required_keys = ("input",)

    def __init__(self, gamma: float = 2.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not (isinstance(gamma, (int, float)) and gamma >= 0 and gamma < float("inf")):
            raise ValueError(f"neighbor2neighbor gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.subsampler = NeighborSubsampler()
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = batch["input"]  # [B, C, H, W]
        pair_index = self.subsampler.draw(y.shape, self.generator)
        y1, y2 = self.subsampler.apply(y, pair_index)  # [B, C, H/2, W/2] each
        with torch.no_grad():
            f1, f2 = self.subsampler.apply(model.restore(y), pair_index)
        diff = model.restore(y1) - y2
        rec = (diff**2).mean()
        reg = ((diff - (f1 - f2)) ** 2).mean()
        loss = rec + self.gamma * reg
        return {"loss": loss, "nb2nb_rec": rec.detach(), "nb2nb_reg": reg.detach()}


class Blind2UnblindObjective(nn.Module):
    """Wang et al. (CVPR 2022), Sec. 3: the global masker Omega, the mask mapper h, the re-visible loss.

    The input y gives g*g masked copies Omega_y (copy i hides the pixels of phase i of a g x g grid,
    each replaced by the mean of its neighbours, the Noise2Self masker); the global mask mapper h keeps,
    from f's output on copy i, only the pixels copy i hid, and adds the g*g results: h(f(Omega_y)) is a
    blind-spot denoising of every pixel. With f(y) the plain ("visible") output under stop-gradient,

        L_rev = || h(f(Omega_y)) + lambda f(y) - (lambda + 1) y ||^2
        L_reg = || h(f(Omega_y)) - y ||^2
        L = L_rev + eta L_reg

    (means over elements). lambda follows the authors' schedule: ``lambda_start`` until
    ``ramp_from`` of training, then linearly to ``lambda_end`` at the end (their defaults 2, 20, 0.4;
    the trainer sets the progress with :meth:`set_progress`). Inference is the plain f(y). A step
    costs g*g forward passes of the batch (the paper's g = 4: 16).
    """

    required_keys = ("input",)

    def __init__(self, grid: int = 4, eta: float = 1.0, lambda_start: float = 2.0, lambda_end: float = 20.0,
                 ramp_from: float = 0.4) -> None:  # fmt: skip
        super().__init__()
        for name, v in (("eta", eta), ("lambda_start", lambda_start), ("lambda_end", lambda_end)):
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                raise ValueError(f"blind2unblind {name} must be a finite number >= 0, got {v!r}")
        if not 0 <= ramp_from <= 1:
            raise ValueError(f"blind2unblind ramp_from must be in [0, 1], got {ramp_from!r}")
        self.masker = Noise2SelfMasker(grid)
        self.eta, self.lambda_start, self.lambda_end, self.ramp_from = float(eta), float(lambda_start), float(lambda_end), float(ramp_from)
        self.progress = 0.0

    def set_progress(self, step: int, total: int) -> None:
        """Training progress step / total (1-based step), which sets lambda."""
        self.progress = min(max(step / max(total, 1), 0.0), 1.0)

    @property
    def lam(self) -> float:
        if self.progress <= self.ramp_from or self.ramp_from >= 1:
            return self.lambda_start
        t = (self.progress - self.ramp_from) / (1 - self.ramp_from)
        return self.lambda_start + t * (self.lambda_end - self.lambda_start)

    def blind(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """h(f(Omega_y)): every pixel predicted from the copy that hid it. [B, C, H, W]."""
        phases = self.masker.phases
        copies, masks = zip(*(self.masker.apply(y, p) for p in range(phases)))
        out = model.restore(torch.cat(copies))  # [g*g*B, C, H, W], copy-major
        out = out.reshape(phases, *y.shape)
        return (out * torch.stack(masks)).sum(0)  # masks [g*g, 1, 1, H, W] partition the pixels

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        y = batch["input"]
        with torch.no_grad():  # first: under DDP the one forward with gradients is the last before backward
            visible = model.restore(y)
        diff = self.blind(model, y) - y
        lam = self.lam
        rev = ((diff + lam * (visible - y)) ** 2).mean()
        reg = (diff**2).mean()
        loss = rev + self.eta * reg
        return {"loss": loss, "b2u_rev": rev.detach(), "b2u_reg": reg.detach(), "b2u_lambda": torch.tensor(lam)}


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
