"""The pictures a training run stores: sample grids and the paper's Fig. 2.

Fig. 2 of the RCL paper is the density of EMD(negative pair) - EMD(positive pair) per anchor, before
and after training: RCL (Eq. 3) should move it to the right. This module computes those gaps from a
loss distance matrix, their histogram, Gaussian KDE (Silverman bandwidth) and summary statistics, and
draws the figures on matplotlib's Agg canvas without pyplot (no global backend, safe in worker
threads). :class:`rcl_dist.tracking.RunTracker` stores what it returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["pos_neg_from_distance_matrix", "image_grid", "emd_gap_density"]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def pos_neg_from_distance_matrix(dist: Any, positive_index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Split a ``[B_q, K]`` distance matrix (``ResidualContrastiveLoss.distance_matrix``) into the
    per-anchor positive distance ``[B_q]`` and the negatives ``[B_q, K-1]`` (all other columns).
    ``positive_index[j]`` is the positive column of row j (default j, keys aligned with queries)."""
    d = _to_numpy(dist)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"need a [B_q, K>=2] distance matrix, got shape {d.shape}")
    b, k = d.shape
    idx = np.arange(b) if positive_index is None else _to_numpy(positive_index).astype(np.int64)
    if idx.shape != (b,) or (idx < 0).any() or (idx >= k).any():
        raise ValueError(f"positive_index must hold {b} column indices in [0, {k})")
    mask = np.zeros_like(d, dtype=bool)
    mask[np.arange(b), idx] = True
    return d[mask], d[~mask].reshape(b, k - 1)


def _gaps(pos: Any, neg: Any, what: str) -> np.ndarray:
    """EMD(negative) - EMD(positive) for every (anchor, negative) pair, flattened."""
    p, n = _to_numpy(pos).reshape(-1), _to_numpy(neg)
    if n.ndim == 1 and n.shape[0] == p.shape[0]:
        d = n - p
    elif n.ndim == 2 and n.shape[0] == p.shape[0]:
        d = n - p[:, None]
    else:
        raise ValueError(
            f"{what}: positives must be [B] (one per anchor) and negatives [B] or [B, K] with the same B; "
            f"got {tuple(p.shape)} and {tuple(n.shape)}"
        )
    return d.reshape(-1)


def _bandwidth(x: np.ndarray) -> float:
    """Silverman's rule (robust to outliers via the IQR), floored so constant data still plot."""
    n = x.size
    std = float(np.std(x, ddof=1)) if n > 1 else 0.0
    q75, q25 = np.percentile(x, [75, 25]) if n else (0.0, 0.0)
    spread = min(std, (q75 - q25) / 1.349) if q75 > q25 else std
    h = 0.9 * spread * n ** (-0.2) if n else 0.0
    floor = 1e-3 * max(float(np.max(np.abs(x))) if n else 0.0, 1e-6)
    return max(h, floor)


def _kde(x: np.ndarray, grid: np.ndarray, h: float) -> np.ndarray:
    """Gaussian kernel density estimate on ``grid`` (chunked: memory O(chunk * grid))."""
    out = np.zeros_like(grid)
    if x.size == 0:
        return out
    for start in range(0, x.size, 4096):
        z = (grid[None, :] - x[start : start + 4096, None]) / h
        out += np.exp(-0.5 * z * z).sum(axis=0)
    return out / (x.size * h * math.sqrt(2 * math.pi))


def _summary(x: np.ndarray, n_nonfinite: int, h: float, max_values: int) -> dict[str, Any]:
    if x.size == 0:
        return {"n": 0, "n_nonfinite": n_nonfinite}
    q = np.percentile(x, [5, 25, 50, 75, 95])
    return {
        "n": int(x.size),
        "n_nonfinite": n_nonfinite,
        "mean": float(x.mean()),
        "std": float(x.std()),
        "q05": float(q[0]),
        "q25": float(q[1]),
        "median": float(q[2]),
        "q75": float(q[3]),
        "q95": float(q[4]),
        "frac_positive": float((x > 0).mean()),
        "kde_bandwidth": h,
        "values": x.tolist() if x.size <= max_values else None,
    }


def _new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas, without pyplot: no global backend switch, no figure
    registry to leak into, safe in worker threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")  # room for titles and colour bars
    FigureCanvasAgg(fig)
    return fig


def _display_image(chw: np.ndarray) -> tuple[np.ndarray, str | None]:
    """[C, H, W] in [0, 1] -> something imshow takes: grey, RGB, or RGGB-packed RAW shown as RGB."""
    c = chw.shape[0]
    if c == 1:
        return np.clip(chw[0], 0, 1), "gray"
    if c == 3:
        return np.clip(chw.transpose(1, 2, 0), 0, 1), None
    if c == 4:  # packed RGGB: R, mean of the two greens, B
        rgb = np.stack([chw[0], 0.5 * (chw[1] + chw[2]), chw[3]], axis=-1)
        return np.clip(rgb, 0, 1), None
    return np.clip(chw[0], 0, 1), "gray"



def image_grid(
    name: str,
    tensors: Mapping[str, Any],
    step: int,
    *,
    max_samples: int = 4,
    residual_keys: Iterable[str] | None = None,
):
    """A grid of samples as a Figure: one row per sample (the first ``max_samples``), one column per
    entry of ``tensors`` (each ``[B, C, H, W]``; sizes may differ between columns, e.g. a x2 SR output).

    Images are shown clipped to [0, 1] (1 channel grey, 3 RGB, 4 packed RGGB as RGB). Residual
    columns (names containing "resid", or listed in ``residual_keys``) are signed: they are shown
    as the channel mean with a diverging colour map on a symmetric scale ``[-m, m]``, m the
    largest magnitude in that column, with a colour bar, so 0 is always the same neutral colour
    and positive/negative residuals are comparable across samples.
    """
    if not tensors:
        raise ValueError("log_image_grid needs at least one tensor")
    signed = set(residual_keys or ()) | {k for k in tensors if "resid" in k.lower()}
    arrays: dict[str, np.ndarray] = {}
    for key, t in tensors.items():
        a = _to_numpy(t)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise ValueError(f"{key}: expected [B, C, H, W], got shape {a.shape}")
        arrays[key] = a[:max_samples]
    rows = min(a.shape[0] for a in arrays.values())
    cols = len(arrays)
    fig = _new_figure((2.4 * cols + 0.6 * len(signed & set(arrays)), 2.4 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, (key, a) in enumerate(arrays.items()):
        if key in signed:
            mean = a[:rows].mean(axis=1)
            m = float(np.nanmax(np.abs(mean))) if mean.size else 0.0
            m = m if m > 0 and math.isfinite(m) else 1e-6
            for i in range(rows):
                im = axes[i, j].imshow(mean[i], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
            fig.colorbar(im, ax=list(axes[:, j]), shrink=0.6, location="right")
        else:
            for i in range(rows):
                img, cmap = _display_image(a[i])
                axes[i, j].imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        axes[0, j].set_title(f"{key} [{a.shape[1]}x{a.shape[2]}x{a.shape[3]}]", fontsize=9)
        for i in range(rows):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    fig.suptitle(f"{name}, step {int(step)}", fontsize=10)
    return fig


def emd_gap_density(
    init: tuple[Any, Any],
    final: tuple[Any, Any],
    *,
    reference: tuple[Any, Any] | None = None,
    noise_distance: dict[str, Any] | None = None,
    bins: int = 60,
    max_values: int = 50_000,
) -> tuple[Any, dict[str, Any]]:
    """The paper's Fig. 2 and its numbers: ``(figure, summary)``. ``init``, ``final`` and ``reference``
    are (positive, negative) distance pairs; see :meth:`rcl_dist.tracking.RunTracker.log_emd_density_plot`."""
    raw = {"init": _gaps(init[0], init[1], "init"), "final": _gaps(final[0], final[1], "final")}
    if reference is not None:
        raw["noise"] = _gaps(reference[0], reference[1], "noise")
    finite = {k: v[np.isfinite(v)] for k, v in raw.items()}
    allv = np.concatenate(list(finite.values()))
    if allv.size == 0:
        raise ValueError("no finite EMD differences to plot")
    h = {k: _bandwidth(v) for k, v in finite.items()}
    lo, hi = float(allv.min()), float(allv.max())
    pad = 3 * max(h.values())
    grid = np.linspace(lo - pad, hi + pad, 512)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    dens = {k: _kde(v, grid, h[k]) for k, v in finite.items()}
    hist = {
        k: np.histogram(v, bins=edges, density=True)[0] if v.size else np.zeros(bins) for k, v in finite.items()
    }

    labels = {"init": "initialisation (random weights)", "final": "after training",
              "noise": "true noise as the residual (ideal denoiser)"}  # fmt: skip
    colours = {"init": "tab:gray", "final": "tab:blue", "noise": "tab:green"}
    panels = 2 if noise_distance is not None else 1
    fig = _new_figure((6.4 * panels, 4.0))
    ax = fig.add_subplot(1, panels, 1)
    for k, v in finite.items():
        if v.size == 0:
            continue
        ax.hist(v, bins=edges, density=True, alpha=0.25, color=colours[k])
        ax.plot(grid, dens[k], color=colours[k], lw=2,
                label=f"{labels[k]}: mean {v.mean():.3g}, {(v > 0).mean():.0%} > 0 (n={v.size})")
    ax.axvline(0.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("EMD(negative pair) - EMD(positive pair)")
    ax.set_ylabel("density")
    ax.set_title("Residual contrastive loss before and after training (cf. RCL Fig. 2)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")

    result = {
        "description": "per (anchor, negative) pair: EMD(negative) - EMD(positive); "
        "'init' at random initialisation, 'final' after training (RCL paper, Fig. 2)"
        + ("; 'noise' with the true simulated noise as the residual" if reference is not None else ""),
        **{k: _summary(finite[k], int(raw[k].size - finite[k].size), h[k], max_values) for k in raw},
        "kde": {"grid": grid.tolist(), **{k: dens[k].tolist() for k in raw}},
        "histogram": {"edges": edges.tolist(), **{k: hist[k].tolist() for k in raw}},
    }
    if noise_distance is not None:
        nd = {k: _to_numpy(noise_distance[k]).reshape(-1) for k in ("init", "final")}
        nd = {k: v[np.isfinite(v)] for k, v in nd.items()}
        ax2 = fig.add_subplot(1, panels, 2)
        both = np.concatenate(list(nd.values()))
        if both.size:
            e2 = np.linspace(float(both.min()), float(both.max()) + 1e-9, bins + 1)
            for k, v in nd.items():
                ax2.hist(v, bins=e2, alpha=0.5, color=colours[k], label=f"{labels[k]}: median {np.median(v):.3g}")
        ax2.set_xlabel("d(residual x - f(x), true noise n) per crop")
        ax2.set_ylabel("crops")
        ax2.set_title("Distance of the residual to the true noise", fontsize=10)
        ax2.legend(fontsize=8)
        result["noise_distance"] = {k: _summary(v, 0, _bandwidth(v), max_values) for k, v in nd.items()}
    return fig, result
