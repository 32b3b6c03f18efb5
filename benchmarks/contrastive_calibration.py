"""Does Eq. 3 tell a denoiser from the identity, and does its gradient reach the weights? Paper scale vs median scale.

    python benchmarks/contrastive_calibration.py --out benchmarks/results/contrastive_calibration_cpu [--checkpoint CKPT]

On pairs of overlapping 64x64 crops of 32 CBSD432 images (scikit-image's photographs where
``shared/data`` is absent), each with its own NLF noise (sigma in [0, 20]/255, App. C.1), so the true
noise n of every crop is known:

1. **Candidate residuals** (no network): the true noise n (an ideal denoiser), 2 n, 0.5 n, the high-pass
   of a 5x5 box blur of the noisy crop (a blurring "denoiser"), and a near-identity (1e-4 n). For each,
   Eq. 3's loss next to its uniform-guess value log K per anchor, and the logit gap, at the paper's
   fixed temperatures (logits -d/tau, tau on the [0, 1] value scale) and at median-scaled ones
   (logits -d/(tau m), m the median negative distance). A usable loss ranks the ideal residual
   lowest.
2. **Gradients** on the restored image (no network): alpha ||d L_contrast / d f(x)|| against
   ||d L_consistency / d f(x)|| (Eq. 5, EfficientNet-Lite0 ImageNet encoder, the product's default
   stage) at f(x) = the clean crop (the ideal denoiser), for each scale.
3. **Gradients on the body's parameters** of U-Nets (width 16, depth 3): random initialisation with
   and without the global input skip, and ``--checkpoint`` (a pre-trained model) when given, via
   :meth:`rcl_dist.losses.objectives.RCLObjective.gradient_diagnostics`; plus EMD(n_hat, n) and the
   RMSE of n_hat - n for those networks.

Writes ``<out>.md`` (tables, command, commit, machine) and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pairs(n_images: int, crop: int, seed: int):
    """(q, k, n_q, n_k, clean_q, clean_k): two overlapping crops of one noisy realisation per image."""
    import numpy as np
    import torch

    from rcl_dist.data.images import bundled_images, list_images, load_image, shared_data_dir, tile
    from rcl_dist.noise import add_nlf_noise, sample_nlf

    root = shared_data_dir()
    if root is not None and (root / "train" / "CBSD432").is_dir():
        paths = list_images(root / "train" / "CBSD432")[:n_images]
        images, source = [load_image(p, gray=False) for p in paths], "CBSD432"
    else:
        images, source = tile(bundled_images(), 128)[:n_images], "scikit-image photographs (128x128 tiles)"
    g = torch.Generator().manual_seed(seed)
    shift = crop // 2
    parents = []
    for im in images:
        t = torch.from_numpy(np.asarray(im, dtype=np.float32))
        _, h, w = t.shape
        y, x = int(torch.randint(h - crop - shift + 1, (1,), generator=g)), int(torch.randint(w - crop - shift + 1, (1,), generator=g))
        parents.append(t[:, y : y + crop + shift, x : x + crop + shift])
    clean = torch.stack(parents)
    params = sample_nlf("uniform", len(images), generator=g)
    noisy = add_nlf_noise(clean, params, generator=g)
    noise = noisy - clean
    out = {k: [] for k in ("q", "k", "n_q", "n_k", "c_q", "c_k")}
    for j in range(len(images)):
        (y1, x1), (y2, x2) = [(int(torch.randint(shift + 1, (1,), generator=g)), int(torch.randint(shift + 1, (1,), generator=g))) for _ in range(2)]
        for name, src in (("q", noisy), ("n_q", noise), ("c_q", clean)):
            out[name].append(src[j, :, y1 : y1 + crop, x1 : x1 + crop])
        for name, src in (("k", noisy), ("n_k", noise), ("c_k", clean)):
            out[name].append(src[j, :, y2 : y2 + crop, x2 : x2 + crop])
    return {k: torch.stack(v) for k, v in out.items()}, source


SCALES = [("fixed", 0.1), ("fixed", 0.01), ("fixed", 0.002), ("median", 1.0), ("median", 0.1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint", default=None, help="a pre-trained model (models/io checkpoint) to measure too")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=1e-3)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from rcl_dist.losses.consistency import ConsistencyLoss, build_encoder
    from rcl_dist.losses.contrastive import ResidualContrastiveLoss
    from rcl_dist.losses.diagnostics import logit_stats, residual_noise_distance
    from rcl_dist.losses.distances import get_distance
    from rcl_dist.losses.objectives import RCLObjective
    from rcl_dist.models import build_model

    t_start = time.perf_counter()
    torch.manual_seed(0)
    b, source = _pairs(args.images, args.crop, seed=0)
    n = b["q"].shape[0]

    def box_highpass(x):
        return x - F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)

    candidates = {
        "true noise n (ideal denoiser)": (b["n_q"], b["n_k"]),
        "2 n (removes more than the noise)": (2 * b["n_q"], 2 * b["n_k"]),
        "0.5 n": (0.5 * b["n_q"], 0.5 * b["n_k"]),
        "x - box5(x) (blur)": (box_highpass(b["q"]), box_highpass(b["k"])),
        "1e-4 n (near identity)": (1e-4 * b["n_q"], 1e-4 * b["n_k"]),
    }
    record: dict = {"source": source, "pairs": n, "crop": args.crop, "alpha": args.alpha}
    # 1. the loss on candidate residuals
    loss_rows = []
    for distance in ("emd", "bd"):
        for name, (rq, rk) in candidates.items():
            row = {"distance": distance, "residual": name}
            for scale, tau in SCALES:
                loss = ResidualContrastiveLoss(distance, tau, "mean", temperature_scale=scale)
                dist = loss.distance_matrix(loss.sketch(rq), loss.sketch(rk))
                st = logit_stats(dist, float(loss.effective_temperature(dist)), reduction="mean")
                row[f"{scale} {tau}"] = (float(loss.info_nce(dist)), st["logit_gap"])
            loss_rows.append(row)
    record["loss"] = loss_rows
    uniform = math.log(n)

    # 2. gradients on the restored image at the ideal denoiser
    encoder = build_encoder("efficientnet_lite0", weights="imagenet")
    consistency = ConsistencyLoss(encoder)
    x = torch.cat([b["q"], b["k"]])
    grad_rows = []
    for scale, tau in SCALES:
        restored = torch.cat([b["c_q"], b["c_k"]]).clone().requires_grad_()
        loss = ResidualContrastiveLoss("emd", tau, "sum", temperature_scale=scale)
        res = x - restored
        s = loss.sketch(res)
        l_c = args.alpha * loss.from_sketches(s[:n], s[n:])
        (g_c,) = torch.autograd.grad(l_c, restored)
        restored2 = restored.detach().clone().requires_grad_()
        (g_s,) = torch.autograd.grad(consistency(x, restored2), restored2)
        grad_rows.append({"scale": f"{scale} {tau}", "alpha_grad_contrast": float(g_c.norm()), "grad_consistency": float(g_s.norm()),
                          "ratio": float(g_c.norm() / g_s.norm())})  # fmt: skip
    record["image_gradients"] = grad_rows

    # 3. networks: gradients on the body's parameters, residual against the true noise
    nets = {"U-Net 16/3, random init, global_residual=true": build_model("unet", width=16, depth=3, global_residual=True),
            "U-Net 16/3, random init, global_residual=false": build_model("unet", width=16, depth=3, global_residual=False)}  # fmt: skip
    if args.checkpoint:
        from rcl_dist.models.io import load_checkpoint

        nets[f"checkpoint {Path(args.checkpoint).name}"] = load_checkpoint(args.checkpoint)[0]
    emd = get_distance("emd", quantiles=256)
    net_rows = [{"network": "identity f(x) = x (n_hat = 0), for reference", **residual_noise_distance(torch.zeros_like(b["n_q"]), b["n_q"], emd)}]
    batch = {"q": b["q"], "k": b["k"]}
    for name, model in nets.items():
        model.eval()
        with torch.no_grad():
            res_q = model.residual(b["q"])
        row = {"network": name, **residual_noise_distance(res_q, b["n_q"], emd)}
        for scale, tau in (("fixed", 0.1), ("median", 0.1)):
            obj = RCLObjective(ResidualContrastiveLoss("emd", tau, "sum", temperature_scale=scale), consistency, args.alpha)
            d = obj.gradient_diagnostics(model, batch)
            row[f"{scale} {tau}"] = d
        net_rows.append(row)
    record["networks"] = net_rows
    record["seconds"] = time.perf_counter() - t_start

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Eq. 3 calibration: paper-scale against median-scale temperature\n",
        f"- command: `python benchmarks/contrastive_calibration.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- commit `{commit}`{' (with uncommitted changes)' if dirty else ''}; {platform.platform()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; {record['seconds']:.0f} s",
        f"- data: {n} pairs of overlapping {args.crop}x{args.crop} crops of {source} (one image each, its own NLF noise, "
        f"sigma in [0, 20]/255); alpha {args.alpha}\n",
        f"## 1. Eq. 3 on candidate residuals (reduction mean: per anchor; uniform guess log K = {uniform:.3f})\n",
        "Each cell: loss / logit gap (mean negative logit below the positive one). Lower loss = the residual the "
        "objective prefers; it should prefer the true noise.\n",
        "| distance | residual | " + " | ".join(f"{s} tau {t}" for s, t in SCALES) + " |",
        "|---|---|" + "---|" * len(SCALES),
    ]
    for r in loss_rows:
        lines.append(f"| {r['distance']} | {r['residual']} | " + " | ".join(f"{r[f'{s} {t}'][0]:.3f} / {r[f'{s} {t}'][1]:.3g}" for s, t in SCALES) + " |")
    lines += ["", "## 2. Gradients on the restored image at f(x) = clean (EMD, reduction sum)\n",
              "| temperature | alpha ‖∇L_contrast‖ | ‖∇L_consistency‖ | ratio |", "|---|---|---|---|"]  # fmt: skip
    for r in grad_rows:
        lines.append(f"| {r['scale']} | {r['alpha_grad_contrast']:.3g} | {r['grad_consistency']:.3g} | {r['ratio']:.3g} |")
    lines += ["", "## 3. Networks: gradients on the body's parameters (EMD, reduction sum) and the residual against the true noise\n",
              "| network | EMD(n_hat, n) | RMSE(n_hat - n) | fixed 0.1: alpha‖∇Lc‖ / ‖∇Lcons‖ = ratio | median 0.1: alpha‖∇Lc‖ / ‖∇Lcons‖ = ratio |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in net_rows:
        cells = [f"{r[k]['grad_contrast']:.3g} / {r[k]['grad_consistency']:.3g} = {r[k]['grad_ratio']:.3g}" if k in r else "–"
                 for k in ("fixed 0.1", "median 0.1")]  # fmt: skip
        lines.append(f"| {r['network']} | {r['noise_distance']:.4g} | {r['noise_rmse']:.4g} | " + " | ".join(cells) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
