"""Fidelity harness: the paper's method matrix (Sec. 5, App. D) through one pipeline at one budget.

    python benchmarks/fidelity.py --preset smoke --out benchmarks/results/fidelity_smoke
    python benchmarks/fidelity.py --preset cpu   --out benchmarks/results/fidelity_cpu
    python benchmarks/fidelity.py --preset gpu   --out benchmarks/results/fidelity_gpu
    python benchmarks/fidelity.py --preset cpu --out ... --dry-run        # print the plan, run nothing
    python benchmarks/fidelity.py --preset cpu --out ... --only 'RCL-EMD|0|'   # only matching cells (+ deps)
    python benchmarks/fidelity.py --preset cpu --out B --set augment=auto --pretrain-from A   # A's pre-trainings

Writes ``<out>.md`` (tables in the paper's layout, the command, commit and machine), ``<out>.json``
(a list of rows: ``method, task, dataset, psnr_mean, psnr_std, ssim_mean, seeds, labels`` plus
``study, sigma, ssim_std, n_images, psnr_input_mean, ssim_input_mean, seed_list``), ``<out>.parquet``
(the same rows) and ``<out>_fig2.png`` (the paper's Fig. 2). Scratch state lives in ``<out>_work/``:
``cache.jsonl`` (the results cache), ``home/`` (``$RCL_DIST_HOME`` unless it is set: the MLflow store,
Ray results, pre-training checkpoints), ``checkpoints/`` (fine-tuned models), ``data/`` (manifests,
the PolyU split). Every training run, and every evaluation, is an MLflow run in experiment
``rcl-fidelity-<preset>`` (``--experiment``), tagged ``fidelity.cell``.

The matrix (every pre-training on CBSD432, ``train/CBSD432``, with one manifest; noisy images only
except the Oracle; same backbone, crop, batch and step budget for every method):

* pre-training methods: RCL-EMD (the paper's alpha 1e-3, tau 0.1), RCL-EMD (calibrated: alpha 1.28e-3,
  tau 0.0101, the joint sweep's winner), RCL-BD, RCL-MMD (Eq. 6 with each distance), N2N, N2S, Nb2Nb
  (Neighbor2Neighbor), B2U (Blind2Unblind, masker grid ``b2u_grid``),
  Consistency (Eq. 5 only), Oracle (``loss.method=supervised``: supervised denoising on clean pairs),
  and RCL-EMD on packed RAW (``model.raw=packed``, App. B.2) for JDD; "No pre-training" is a randomly
  initialised network of the same architecture (fine-tuning ``source="none"``).
* proxy evaluation (Sec. 4: everything frozen but a fresh last layer, fitted on ``proxy_labels``
  labelled crops of CBSD432 (PolyU-train for ``real``) by ``rcl_dist.train.probe`` with the preset's
  ``proxy_fit``: closed-form least squares on the cached features, then IRLS towards L1 until the
  label L1 settles; ``adam`` is the replaced ``proxy_steps`` Adam steps, for comparison): denoise (CBSD68, Kodak24, McMaster;
  Table 1), SR x2 and JDenSR (Set5 HR, Set14, CBSD68; Table 2), JDD from RAW (CBSD68, Kodak24,
  McMaster mosaicked and noised in RAW; Table 4) and real noise (PolyU test split). Test inputs come
  from :func:`rcl_dist.evaluate.make_test_pair` with evaluation seed 0 for every method and seed.
* "SL (Den)" (Table 2): the Oracle's supervised *denoising* network, proxy-fine-tuned to SR, JDenSR
  and real noise like the unsupervised methods.
* "Oracle" per task: for denoise, the supervised-denoising pre-training followed by the same proxy
  fine-tuning (Table 1's Oracle), and "Oracle (own head)": that network applied as it is, whose last
  layer lies in the proxy's hypothesis class, so the proxy row must come close to it. For SR, JDenSR, JDD and real noise, where a denoising network is not
  the task's supervised model, the Oracle is supervised training *on that task* (full fine-tuning from
  random initialisation) with the pre-training budget: ``pretrain_steps`` steps at the pre-training
  batch, on ``oracle_labels`` labelled crops (Table 2/4's Oracle: "supervised pre-training" on the task).
* data regime (``realisation``, default ``fixed``): every pre-training reads one stored noisy image per
  training image (``rcl-dist data simulate`` beside the manifest, as the paper's one-to-one mapping and
  as a real unlabelled set); N2N's second image is a second stored realisation with the same
  parameters. ``--set realisation=fresh`` draws new noise every epoch (the rows committed before
  2026-12-04 ran so).
* the floor: BM3D (optional ``bm3d`` package), NLM and wavelet denoising (``rcl_dist.classical``),
  no training, the noise level estimated from each test image, on the denoise and PolyU sets.
* seeds: RCL-EMD, RCL-EMD (calibrated), N2N, N2S, Nb2Nb, Consistency, No pre-training and Oracle on denoise
  run with every seed of ``seeds``
  (pre-training seed = fine-tuning seed: model init, batches, label set and fresh head); the table
  gives the mean over seeds and their standard deviation (ddof=1; null with one seed). Other rows: the
  first seed.
* label efficiency (Table 3): full fine-tuning on 10, 100, 1000 labelled crops (nested label sets,
  same seed for both arms) of the RCL-EMD network ("RCL-EMD + SL") and of a random initialisation
  ("SL (scratch)"), plus the zero-label row: the pre-trained RCL-EMD network applied as it is.
* context: "Oracle (Gaussian)", one blind supervised U-Net trained on CBSD432 with plain Gaussian
  noise (shot 0, sigma ~ U(0, ``gaussian_sigma_max``) per image, the ``gaussian`` sampler), evaluated
  with its own last layer on *all* 68 CBSD68 images at sigma 15/25/50 (evaluation task ``gaussian``),
  beside the published CBM3D / CDnCNN / FFDNet figures, with its budget stated.
* Fig. 2: for the trained RCL-EMD network (first seed), the density of EMD(neg) - EMD(pos) on pairs of
  overlapping crops of CBSD68 images (one noisy realisation per image, its own NLF parameters),
  before training (a fresh initialisation from the run's config and seed) and after.
* real noise: PolyU_cropped pairs (``*_real`` / ``*_mean``) split by pair name: pairs are ordered by
  sha256("polyu-split|0|<name>") and the first 30 % are the test split, the rest the labelled
  training split (70/30, listed in the md).

Resume: every finished cell (method, seed, task, labels) is one JSON line in ``cache.jsonl``, with a
fingerprint of the preset; a rerun skips cells whose line is there with the same fingerprint (and, for
cells whose checkpoint a later cell needs, whose checkpoint file still exists). An interrupted
pre-training resumes from its last Ray checkpoint (``dist.checkpoint_every``). Failed cells are listed
in the md and the exit status is 1; rerun to retry them.

Presets (the budget is the same for every method within a preset):

* ``smoke``: U-Net width 8 depth 2, 32^2 crops, batch 8, 4 pre-training / 4 fine-tuning steps, 1 seed,
  2 test images per set: the whole matrix (57 cells) end to end in 5 minutes on this 2-core machine
  (9 pre-trainings ~19 s each, almost all Ray start-up; 44 fine-tunings ~3 s each). Its numbers are
  meaningless.
* ``cpu``: U-Net width 16 depth 3 (``model.global_residual`` by the product's auto rule: the input
  skip for supervised / N2N / N2S, direct prediction for RCL / consistency and for the networks from
  random initialisation, whose base config is RCL's; the rows committed on 2026-12-02 ran with
  ``--set global_residual=true``, the skip everywhere, as each row says), 64^2 crops, batch 16,
  lr 2e-3 with cosine decay and 50 warm-up steps (the best of five recipes,
  ``benchmarks/results/recipe_cpu.md``), 1000 pre-training steps, proxy heads solved on 200 labels
  (``lstsq+l1``), 1000 full fine-tuning steps, seeds 0/1/2 (denoising rows; label efficiency: seed
  0), 12 test images per set, 2 Ray workers, fine-tuning in this process (``finetune_local``: a
  Ray Train run costs ~20 s to start). Timed here (the 17 cells that do not depend on the
  contrastive objective, 39 min on 2026-12-02, ``benchmarks/results/fidelity_cpu.md``; RCL-EMD and
  N2N seed 0 alone on 2026-12-03): a pre-training with the EfficientNet-Lite0 consistency term
  (RCL-*, Consistency) 480 s (33 samples/s on the 2 workers), N2N 176 s, a supervised Oracle
  ~270-320 s; a proxy cell (features, solve, IRLS, 3 test sets) ~21 s, of which the fit ~2 s; a
  label-efficiency run (1000 full steps) ~100 s. The whole matrix (77 cells: 17 pre-trainings, 54
  fine-tunings of which 44 proxies, 6 others) is estimated at ~2 h alone here, ~75 % of it
  pre-training: over the 90 minutes the preset aims for, a matter of step throughput. Blind2Unblind
  runs with ``b2u_grid=2`` here (4 masked copies per step; the paper's 4 costs 16 forward passes).
* ``gpu``: the paper's settings: U-Net width 32 depth 4, 128^2 crops, batch 64, ``dist.use_gpu``,
  20000 pre-training steps, 5 seeds (denoising rows), 3 seeds for label efficiency, every test image.
  Not timed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """One budget for the whole matrix. Every method is pre-trained and fine-tuned with these numbers."""

    name: str
    width: int  # U-Net width (channels of the first level)
    depth: int  # U-Net depth (2x downsamplings)
    crop: int  # pre-training and fine-tuning crop side (HR side for SR)
    batch_size: int  # global batch: pre-training, fine-tuning (at most the labels) and the task Oracles
    pretrain_steps: int  # pre-training steps; also the task Oracles' supervised steps
    proxy_steps: int  # proxy fine-tuning steps (last layer only)
    proxy_labels: int  # labelled crops for proxy fine-tuning
    full_steps: int  # label-efficiency full fine-tuning steps
    label_counts: tuple[int, ...]  # label-efficiency study: labelled crops
    oracle_labels: int  # task Oracles (sr, jdensr, jdd, real): labelled crops of their supervised training
    seeds: tuple[int, ...]  # denoising rows of the MULTI_SEED methods
    label_seeds: tuple[int, ...]  # label-efficiency seeds (a subset of `seeds`)
    eval_limit: int | None  # test images per set (None: all)
    fig2_images: int  # CBSD68 images (anchors) of the Fig. 2 batch
    workers: int  # Ray Train workers (pre-training; and fine-tuning with the ray engine)
    use_gpu: bool
    threads: int  # DALI threads per worker
    finetune_engine: str  # "local" (finetune_local in this process, tracked here) or "ray" (run_finetune)
    log_every: int
    checkpoint_every: int
    label_threads: int = 0  # DataLoader workers that read label crops
    sigmas: tuple[float, ...] = (15.0, 25.0, 50.0)  # Gaussian context rows
    lr: float = 1e-3  # Adam, Sec. 4 (pre-training and fine-tuning)
    global_residual: bool | None = None  # model.global_residual of every network; None: the product's auto rule (per method, labelled in every row)
    schedule: str = "constant"  # learning rate of pre-training and full fine-tuning: "constant" | "cosine"
    warmup: int = 0  # linear warm-up steps (pre-training and full fine-tuning)
    proxy_fit: str = "lstsq+l1"  # how proxy cells fit their fresh last layer (rcl_dist.train.probe)
    gaussian_sigma_max: float = 55.0  # the blind Gaussian Oracle of the context rows trains on sigma in [0, this]
    # pre-training noise: "fixed" (one stored noisy image per training image, as the paper and as a real
    # unlabelled set; N2N's second image a second stored realisation with the same parameters) or "fresh"
    realisation: str = "fixed"
    b2u_grid: int = 4  # Blind2Unblind's masker grid (the paper's 4: 16 forward passes per step)
    # full fine-tuning: LP-FT (the probe's head on the frozen body first, then Adam on every layer), and
    # the learning rate of pre-trained sources (None: lr; a pre-trained direct-prediction U-Net over-fits
    # a few labels at 2e-3 and keeps its features at 2e-4, benchmarks/results/finetune_recipe_cpu.md)
    probe_first: bool = False
    pretrained_lr: float | None = None
    # full fine-tuning's label augmentation (FinetuneSpec.augment; the product's default is "auto"):
    # "none", the harness's behaviour before the option existed, keeps earlier records current
    augment: str = "none"
    # full fine-tuning's gradient-norm clip (FinetuneSpec.grad_clip; the product's default is 1.0): None,
    # the harness's behaviour before the option existed, keeps earlier records current
    grad_clip: float | None = None
    # SR / JDenSR heads (FinetuneSpec.sr_skip; the product's default is "bicubic"): "none", the harness's
    # behaviour before the option existed (every SR proxy below bicubic), keeps earlier records current
    sr_skip: str = "none"
    # seeds of the real-noise and cross-camera studies (pre-training and every cell built on it); empty:
    # the first of `seeds`. It only adds cells (a cell's content depends on its own seed), so it is left
    # out of the fingerprint and the cells of seed 0 stay cached when seeds are added
    real_seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.finetune_engine not in ("local", "ray"):
            raise ValueError(f"preset {self.name}: finetune_engine must be 'local' or 'ray', got {self.finetune_engine!r}")
        for k in ("width", "depth", "batch_size", "pretrain_steps", "proxy_steps", "proxy_labels", "full_steps",
                  "oracle_labels", "fig2_images", "workers", "log_every", "checkpoint_every"):  # fmt: skip
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"preset {self.name}: {k} must be a positive integer, got {getattr(self, k)!r}")
        if self.crop % 2 or self.crop < 8:
            raise ValueError(f"preset {self.name}: crop must be even and >= 8 (SR, RAW), got {self.crop}")
        if not self.seeds or not self.label_counts:
            raise ValueError(f"preset {self.name}: seeds and label_counts must not be empty")
        from rcl_dist.train.probe import PROBE_FITS
        from rcl_dist.train.schedule import SCHEDULES

        if self.proxy_fit not in PROBE_FITS:
            raise ValueError(f"preset {self.name}: proxy_fit must be one of {list(PROBE_FITS)}, got {self.proxy_fit!r}")
        from rcl_dist.train.finetune_spec import AUGMENTS

        if self.augment not in AUGMENTS:
            raise ValueError(f"preset {self.name}: augment must be one of {list(AUGMENTS)}, got {self.augment!r}")
        if self.realisation not in ("fixed", "fresh"):
            raise ValueError(f"preset {self.name}: realisation must be 'fixed' or 'fresh', got {self.realisation!r}")
        from rcl_dist.models.heads import SR_SKIPS

        if self.sr_skip not in SR_SKIPS:
            raise ValueError(f"preset {self.name}: sr_skip must be one of {list(SR_SKIPS)}, got {self.sr_skip!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, float) and 0 < self.grad_clip < float("inf")):
            raise ValueError(f"preset {self.name}: grad_clip must be a number > 0 or null, got {self.grad_clip!r}")
        if self.pretrained_lr is not None and not (isinstance(self.pretrained_lr, float) and 0 < self.pretrained_lr < 1):
            raise ValueError(f"preset {self.name}: pretrained_lr must be a number in (0, 1) or null, got {self.pretrained_lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"preset {self.name}: schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        # fields added after records were made count only when set, so those records stay current
        d = {k: v for k, v in self.as_dict().items()
             if k not in _PLAN_ONLY_FIELDS and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        if self.name in PRESETS:  # plan-only fields that fingerprints held before: the preset's own value
            d.update({k: list(getattr(PRESETS[self.name], k)) for k in _PLAN_ONLY_AS_BUILT})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


_LATER_FIELDS: dict[str, Any] = {"probe_first": False, "pretrained_lr": None, "augment": "none", "grad_clip": None,
                                 "sr_skip": "none"}
_PLAN_ONLY_FIELDS = frozenset({"real_seeds", "label_seeds"})  # which cells run, never what a cell computes
# label_seeds only adds cells too, but fingerprints held it before that was seen: they keep holding the
# preset's built-in value, so the records made before stay current and setting it changes nothing cached
_PLAN_ONLY_AS_BUILT = frozenset({"label_seeds"})
# fields that change fine-tuning and evaluation cells only, never a pre-training: a pre-training of a
# preset that differs from this one in these alone is this preset's pre-training (--pretrain-from)
FINETUNE_ONLY_FIELDS = frozenset({"augment", "grad_clip", "sr_skip", "probe_first", "pretrained_lr", "proxy_steps", "proxy_labels",
                                  "full_steps", "label_counts", "proxy_fit", "eval_limit", "label_seeds"})


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke", width=8, depth=2, crop=32, batch_size=8, pretrain_steps=4, proxy_steps=4, proxy_labels=8,
        full_steps=4, label_counts=(10, 100, 1000), oracle_labels=16, seeds=(0,), label_seeds=(0,), eval_limit=2,
        fig2_images=8, workers=2, use_gpu=False, threads=1, finetune_engine="local", log_every=2, checkpoint_every=50,
        b2u_grid=2,
    ),
    "cpu": Preset(
        name="cpu", width=16, depth=3, crop=64, batch_size=16, pretrain_steps=1000, proxy_steps=300, proxy_labels=200,
        full_steps=1000, label_counts=(10, 100, 1000), oracle_labels=2000, seeds=(0, 1, 2), label_seeds=(0,),
        eval_limit=12, fig2_images=32, workers=2, use_gpu=False, threads=1, finetune_engine="local", log_every=50,
        checkpoint_every=250, lr=2e-3, schedule="cosine", warmup=50, b2u_grid=2,
    ),
    "gpu": Preset(
        name="gpu", width=32, depth=4, crop=128, batch_size=64, pretrain_steps=20000, proxy_steps=2000,
        proxy_labels=1000, full_steps=5000, label_counts=(10, 100, 1000), oracle_labels=20000, seeds=(0, 1, 2, 3, 4),
        label_seeds=(0, 1, 2), eval_limit=None, fig2_images=64, workers=1, use_gpu=True, threads=4,
        finetune_engine="ray", log_every=100, checkpoint_every=1000, label_threads=8,
    ),
}  # fmt: skip

RCL_CAL = "RCL-EMD (calibrated)"
RCL_CAL_ALPHA = 0.001284591880490175  # sweep_rcl_joint_cpu_best_config.yaml (trial c7053469)
RCL_CAL_TAU = 0.010058713023197057
# Pre-training methods: display name -> config overrides (on top of the preset's base overrides).
PRETRAIN_METHODS: dict[str, list[str]] = {
    "RCL-EMD": ["loss.method=rcl", "loss.distance=emd"],
    # Issue 12's calibrated RCL: the winner of the joint alpha x tau x overlap x crop/batch sweep on the
    # converged proxy (tune_spaces/cpu-rcl-joint.yaml, benchmarks/results/sweep_rcl_joint_cpu.md; its crop 64,
    # batch 16 and overlap 0.5 are the cpu preset's and the product's defaults). "RCL-EMD" keeps the paper's
    # alpha 1e-3, tau 0.1
    RCL_CAL: ["loss.method=rcl", "loss.distance=emd", f"loss.alpha={RCL_CAL_ALPHA!r}",
              f"loss.temperature={RCL_CAL_TAU!r}", "data.overlap=0.5"],
    "RCL-BD": ["loss.method=rcl", "loss.distance=bd"],
    "RCL-MMD": ["loss.method=rcl", "loss.distance=mmd"],
    "N2N": ["loss.method=n2n"],
    "N2S": ["loss.method=n2s"],
    "Nb2Nb": ["loss.method=nb2nb"],
    "B2U": ["loss.method=b2u"],
    "Consistency": ["loss.method=consistency"],
    "Oracle": ["loss.method=supervised"],
    "RCL-EMD (RAW)": ["loss.method=rcl", "loss.distance=emd", "model.raw=packed"],
    # the real-noise study: pre-trained on the noisy halves of the PolyU training split only, nothing simulated
    "RCL-EMD (real)": ["loss.method=rcl", "loss.distance=emd", "data.noise=none", "data.realisation=fresh"],
    "N2S (real)": ["loss.method=n2s", "data.noise=none", "data.realisation=fresh"],
    "Nb2Nb (real)": ["loss.method=nb2nb", "data.noise=none", "data.realisation=fresh"],
    # the cross-camera study: the same, pre-trained on the noisy halves of the other cameras' pairs only
    "RCL-EMD (real, xcam)": ["loss.method=rcl", "loss.distance=emd", "data.noise=none", "data.realisation=fresh"],
    "N2S (real, xcam)": ["loss.method=n2s", "data.noise=none", "data.realisation=fresh"],
    "Nb2Nb (real, xcam)": ["loss.method=nb2nb", "data.noise=none", "data.realisation=fresh"],
    # the context rows' blind Gaussian denoiser: supervised, shot 0, sigma ~ U(0, gaussian_sigma_max) per image
    "Oracle (Gaussian)": ["loss.method=supervised", "data.sampler=gaussian", "data.sigma_min=0.0"],
}
RANDOM_INIT = "No pre-training"
SL_DEN = "SL (Den)"
RCL_SL = "RCL-EMD + SL"
SL_SCRATCH = "SL (scratch)"
RCL_ZERO = "RCL-EMD (no fine-tuning)"
ORACLE_OWN = "Oracle (own head)"  # the supervised denoiser applied as it is: the proxy's reference
ORACLE_GAUSS = "Oracle (Gaussian)"
# classical denoisers with no training (rcl_dist.classical; noise level estimated per image): display -> name
CLASSICAL = {"BM3D": "bm3d", "NLM": "nlm", "Wavelet": "wavelet"}
REAL_PRETRAINED = ("RCL-EMD (real)", "N2S (real)", "Nb2Nb (real)")
REAL_LABELS = (10, 100)  # real pairs' crops of the real-noise study
# cross-camera: test on the pairs of these camera models (file-name prefix), train and fine-tune on the others
POLYU_XCAM_TEST = ("NikonD800", "Sony")
XCAM_PRETRAINED = ("RCL-EMD (real, xcam)", "N2S (real, xcam)", "Nb2Nb (real, xcam)")
SL_SCRATCH_XCAM = "SL (scratch, xcam)"
XCAM_EVALS = [("PolyU " + " and ".join(POLYU_XCAM_TEST), "@polyu_xcam_test", "real", None)]  # MLflow: no "+" in names
MULTI_SEED = ("RCL-EMD", RCL_CAL, "RCL-BD", "RCL-MMD", "N2N", "N2S", "Nb2Nb", "B2U", "Consistency", RANDOM_INIT,
              "Oracle")  # every seed
PROXY_RGB = ("RCL-EMD", RCL_CAL, "RCL-BD", "RCL-MMD", "N2N", "N2S", "Nb2Nb", "B2U", "Consistency", RANDOM_INIT)
METHOD_ORDER = (PROXY_RGB + (SL_DEN, ORACLE_OWN, "Oracle", RCL_ZERO, SL_SCRATCH, RCL_SL, ORACLE_GAUSS) + tuple(CLASSICAL)
                + REAL_PRETRAINED + tuple(f"{m} + SL" for m in REAL_PRETRAINED)
                + XCAM_PRETRAINED + tuple(f"{m} + SL" for m in XCAM_PRETRAINED) + (SL_SCRATCH_XCAM,)
                + tuple(f"{c} (xcam)" for c in CLASSICAL))

# Evaluation sets per task: (dataset name, path under shared/data).
EVAL_SETS: dict[str, list[tuple[str, str]]] = {
    "denoise": [("CBSD68", "test/CBSD68"), ("Kodak24", "test/Kodak24"), ("McMaster", "test/McMaster")],
    "sr": [("Set5", "sr/Set5/HR"), ("Set14", "sr/Set14"), ("CBSD68", "test/CBSD68")],
    "jdensr": [("Set5", "sr/Set5/HR"), ("Set14", "sr/Set14"), ("CBSD68", "test/CBSD68")],
    "jdd": [("CBSD68", "test/CBSD68"), ("Kodak24", "test/Kodak24"), ("McMaster", "test/McMaster")],
    "real": [("PolyU", "@polyu_test")],
    "gaussian": [("CBSD68", "test/CBSD68")],
}
TRAIN_SET = "train/CBSD432"
POLYU = "real/PolyU_cropped"
POLYU_TEST_FRACTION = 0.3
EVAL_SEED = 0  # test inputs: the same for every method, seed and run
# Published CBSD68 figures (shared/data/README.md), sigma 15/25/50: context, not targets.
PUBLISHED_CBSD68 = {"CBM3D": (33.52, 30.71, 27.38), "CDnCNN": (33.89, 31.23, 27.92), "FFDNet": (33.87, 31.21, 27.96)}

ROW_KEYS = ("method", "task", "dataset", "psnr_mean", "psnr_std", "ssim_mean", "seeds", "labels")
EXTRA_ROW_KEYS = ("study", "sigma", "ssim_std", "n_images", "psnr_input_mean", "ssim_input_mean", "seed_list",
                  "head", "global_residual")  # fmt: skip


def base_overrides(p: Preset) -> list[str]:
    """Config overrides every pre-training (and every random initialisation) shares."""
    return [
        "model.name=unet",
        f"model.width={p.width}",
        f"model.depth={p.depth}",
        f"data.crop={p.crop}",
        f"data.threads={p.threads}",
        f"train.batch_size={p.batch_size}",
        f"train.steps={p.pretrain_steps}",
        f"train.lr={p.lr}",
        f"train.schedule={p.schedule}",
        f"train.warmup={p.warmup}",
        f"model.global_residual={'null' if p.global_residual is None else str(p.global_residual).lower()}",
        f"train.log_every={p.log_every}",
        f"dist.workers={p.workers}",
        f"dist.use_gpu={'true' if p.use_gpu else 'false'}",
        f"dist.checkpoint_every={p.checkpoint_every}",
        f"data.realisation={p.realisation}",
        f"loss.b2u_grid={p.b2u_grid}",
    ]


# ----------------------------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One unit of work: a pre-training, or a fine-tuning + its evaluation, or an evaluation only.

    ``kind``: pretrain | finetune | zero (evaluate a pre-trained model as it is) | gaussian (evaluate
    a fine-tuned model under Gaussian noise) | fig2. ``source``: the key of the cell whose checkpoint
    this one starts from (None: random initialisation / nothing).
    """

    kind: str
    method: str
    seed: int
    task: str
    labels: int
    study: str = ""
    source: str | None = None
    overrides: list[str] = field(default_factory=list)  # pretrain: config overrides
    raw: bool = False  # random init / pretrain: packed-RAW model
    mode: str = "proxy"
    steps: int = 0
    batch_size: int = 0
    # "train" (CBSD432), "real" (PolyU train split, pairs), "real_noisy" (its noisy halves, data.noise=none),
    # "gaussian" (CBSD432, Gaussian noise)
    manifest: str = "train"
    evals: list[tuple[str, str, str, float | None]] = field(default_factory=list)  # (dataset, folder key, task, sigma)
    all_images: bool = False  # evaluate every image of each set (else the preset's eval_limit)
    fit: str = "lstsq+l1"  # proxy cells: the probe's fit

    @property
    def head(self) -> str:
        """How the evaluated network's last layer came about (a column of every row)."""
        if self.kind in ("zero", "gaussian"):
            return "own"
        if self.kind == "classical":
            return "no network"
        if self.kind == "finetune":
            return "full fine-tuning" if self.mode == "full" else f"fresh, {self.fit}"
        return ""

    @property
    def key(self) -> str:
        return cell_key(self.method, self.seed, self.task, self.labels)


def cell_key(method: str, seed: int, task: str, labels: int) -> str:
    return f"{method}|{seed}|{task}|{labels}"


def _evals(task: str, sigmas: Iterable[float] = ()) -> list[tuple[str, str, str, float | None]]:
    if task == "gaussian":
        return [(name, path, "gaussian", float(s)) for name, path in EVAL_SETS["gaussian"] for s in sigmas]
    return [(name, path, task, None) for name, path in EVAL_SETS[task]]


def build_plan(p: Preset) -> list[Cell]:
    """Every cell of the matrix, dependencies first (pre-trainings, then fine-tunings and evaluations)."""
    first = p.seeds[0]
    if not set(p.label_seeds) <= set(p.seeds):
        raise ValueError(f"preset {p.name}: label_seeds {p.label_seeds} must be a subset of seeds {p.seeds}")
    cells: list[Cell] = []

    real_seeds = p.real_seeds or (first,)

    def pre_seeds(method: str) -> tuple[int, ...]:
        if method in REAL_PRETRAINED or method in XCAM_PRETRAINED:
            return real_seeds
        return p.seeds if method in MULTI_SEED else (first,)

    for method, ov in PRETRAIN_METHODS.items():
        gauss = method == ORACLE_GAUSS
        ov = list(ov) + ([f"data.sigma_max={p.gaussian_sigma_max / 255.0}"] if gauss else [])
        manifest = ("gaussian" if gauss else "real_noisy" if method in REAL_PRETRAINED
                    else "xcam_noisy" if method in XCAM_PRETRAINED else "train")  # fmt: skip
        for s in pre_seeds(method):
            cells.append(Cell("pretrain", method, s, "pretrain", 0, study="pretrain", overrides=ov,
                              raw="model.raw=packed" in ov, steps=p.pretrain_steps, batch_size=p.batch_size,
                              manifest=manifest))  # fmt: skip

    def proxy(method: str, seed: int, task: str, source_method: str | None, raw: bool = False, study: str = "proxy") -> Cell:
        return Cell(
            "finetune", method, seed, task, p.proxy_labels, study=study,
            source=None if source_method is None else cell_key(source_method, seed, "pretrain", 0),
            raw=raw, mode="proxy", steps=p.proxy_steps, batch_size=p.batch_size,
            manifest="real" if task == "real" else "train", evals=_evals(task), fit=p.proxy_fit,
        )  # fmt: skip

    def task_oracle(task: str) -> Cell:
        return Cell(
            "finetune", "Oracle", first, task, p.oracle_labels, study="proxy", source=None, raw=task == "jdd",
            mode="full", steps=p.pretrain_steps, batch_size=p.batch_size,
            manifest="real" if task == "real" else "train", evals=_evals(task),
        )  # fmt: skip

    # Table 1: denoising, proxy; the Oracle also with its own last layer (the proxy's reference)
    for s in p.seeds:
        cells.append(Cell("zero", ORACLE_OWN, s, "denoise", 0, study="proxy",
                          source=cell_key("Oracle", s, "pretrain", 0), evals=_evals("denoise")))  # fmt: skip
    for method in PROXY_RGB + ("Oracle",):
        for s in p.seeds if method in MULTI_SEED else (first,):
            cells.append(proxy(method, s, "denoise", None if method == RANDOM_INIT else method))
    # Table 2: SR and JDenSR; real noise (PolyU)
    for task in ("sr", "jdensr", "real"):
        for method in PROXY_RGB:
            cells.append(proxy(method, first, task, None if method == RANDOM_INIT else method))
        cells.append(proxy(SL_DEN, first, task, "Oracle"))
        cells.append(task_oracle(task))
    # Table 4: JDD from packed RAW
    cells.append(proxy("RCL-EMD", first, "jdd", "RCL-EMD (RAW)", raw=True))
    cells.append(proxy(RANDOM_INIT, first, "jdd", None, raw=True))
    cells.append(task_oracle("jdd"))
    # Table 3: label efficiency
    for s in p.label_seeds:
        cells.append(Cell("zero", RCL_ZERO, s, "denoise", 0, study="label-efficiency",
                          source=cell_key("RCL-EMD", s, "pretrain", 0), evals=_evals("denoise")))  # fmt: skip
        for n in p.label_counts:
            for method, src in ((RCL_SL, cell_key("RCL-EMD", s, "pretrain", 0)), (SL_SCRATCH, None)):
                cells.append(Cell("finetune", method, s, "denoise", n, study="label-efficiency", source=src,
                                  mode="full", steps=p.full_steps, batch_size=p.batch_size, evals=_evals("denoise")))  # fmt: skip
    # context: the blind Gaussian Oracle with its own head, every CBSD68 image, beside published figures
    cells.append(Cell("gaussian", ORACLE_GAUSS, first, "gaussian", 0, study="context", all_images=True,
                      source=cell_key(ORACLE_GAUSS, first, "pretrain", 0), evals=_evals("gaussian", p.sigmas)))  # fmt: skip
    # the real-noise study (PolyU test split): networks pre-trained on PolyU's noisy halves only, proxy and
    # full fine-tuning on 10 and 100 crops of real pairs, against SL from scratch on the same pairs
    for s in real_seeds:
        for method in REAL_PRETRAINED:
            for n in REAL_LABELS:
                for mode, steps in (("proxy", p.proxy_steps), ("full", p.full_steps)):
                    name = method if mode == "proxy" else f"{method} + SL"  # one key per (network, mode)
                    cells.append(Cell("finetune", name, s, "real", n, study=f"real-{mode}", mode=mode, steps=steps,
                                      source=cell_key(method, s, "pretrain", 0), batch_size=p.batch_size,
                                      manifest="real", evals=_evals("real"), fit=p.proxy_fit))  # fmt: skip
        for n in REAL_LABELS:
            cells.append(Cell("finetune", SL_SCRATCH, s, "real", n, study="real-full", mode="full", steps=p.full_steps,
                              batch_size=p.batch_size, manifest="real", evals=_evals("real")))  # fmt: skip
        # the cross-camera study: the same cells, trained on the other cameras, tested on POLYU_XCAM_TEST
        for method in XCAM_PRETRAINED:
            for n in REAL_LABELS:
                for mode, steps in (("proxy", p.proxy_steps), ("full", p.full_steps)):
                    name = method if mode == "proxy" else f"{method} + SL"
                    cells.append(Cell("finetune", name, s, "real", n, study=f"xcam-{mode}", mode=mode, steps=steps,
                                      source=cell_key(method, s, "pretrain", 0), batch_size=p.batch_size,
                                      manifest="xcam", evals=XCAM_EVALS, fit=p.proxy_fit))  # fmt: skip
        for n in REAL_LABELS:
            cells.append(Cell("finetune", SL_SCRATCH_XCAM, s, "real", n, study="xcam-full", mode="full",
                              steps=p.full_steps, batch_size=p.batch_size, manifest="xcam", evals=XCAM_EVALS))  # fmt: skip
    # the floor a trained model must clear: classical denoisers on the same test inputs (denoise, real, xcam)
    for name in CLASSICAL:
        for task in ("denoise", "real"):
            cells.append(Cell("classical", name, first, task, 0, study="classical", evals=_evals(task)))
        cells.append(Cell("classical", f"{name} (xcam)", first, "real", 0, study="xcam-classical", evals=XCAM_EVALS))
    # Fig. 2
    cells.append(Cell("fig2", "RCL-EMD", first, "fig2", 0, study="fig2", source=cell_key("RCL-EMD", first, "pretrain", 0)))
    keys = [c.key for c in cells]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise AssertionError(f"duplicate cells: {sorted(dup)}")
    return cells


def pretrain_config(p: Preset, cell: Cell, manifest: str = "manifest.parquet", *, experiment: str = "rcl-fidelity",
                    run_name: str | None = None, storage_path: str | None = None):  # fmt: skip
    """The validated :class:`rcl_dist.config.Config` of a pre-training cell."""
    from rcl_dist.config import load_config

    ov = base_overrides(p) + cell.overrides + [
        f"train.seed={cell.seed}",
        f"data.manifest={manifest}",
        f"tracking.experiment={experiment}",
    ]
    if run_name:
        ov.append(f"dist.run_name={run_name}")
    if storage_path:
        ov.append(f"dist.storage_path={storage_path}")
    return load_config(None, ov)


def resolved_global_residual(p: Preset, cell: "Cell") -> bool:
    """Whether ``cell``'s network has the input skip: the preset's setting, or the product's auto rule
    (:func:`rcl_dist.config.global_residual_of`) for the method that trained its body (a fine-tuning
    cell: its source's; from random initialisation: supervised when trained whole, else the base config's)."""
    from rcl_dist.config import global_residual_of, load_config

    if cell.source:  # evaluated / fine-tuned from a pre-training cell: that cell's method
        method = cell.source.split("|")[0]
    elif cell.kind == "finetune":  # from random initialisation: supervised when trained whole (random_init_config)
        method = "Oracle" if cell.mode == "full" else None
    else:  # a pre-training cell itself
        method = cell.method
    return global_residual_of(load_config(None, base_overrides(p) + PRETRAIN_METHODS.get(method, [])))


def random_init_config(p: Preset, raw: bool, supervised: bool = False) -> dict[str, Any]:
    """The network of a cell from random initialisation: the pre-training config's model. ``supervised``
    (trained whole on labels: SL from scratch, the task Oracles) records that method, so the auto rule
    gives it the input skip as every supervised network; "No pre-training" (a frozen random body under a
    proxy) keeps the RCL config's architecture, the twin of the RCL body it is compared with."""
    from rcl_dist.config import load_config

    method = ["loss.method=supervised"] if supervised else []
    return load_config(None, base_overrides(p) + method + (["model.raw=packed"] if raw else [])).to_dict()


def finetune_spec(p: Preset, cell: Cell, source: str, manifest: str, *, experiment: str = "rcl-fidelity",
                  tracking_uri: str | None = None, run_name: str | None = None, out: str | None = None,
                  storage_path: str | None = None, workers: int | None = None):  # fmt: skip
    """The :class:`FinetuneSpec` of a fine-tuning cell (``source``: checkpoint path or "none")."""
    from rcl_dist.train.finetune_spec import FinetuneSpec

    engine_ray = p.finetune_engine == "ray"
    w = (workers or p.workers) if engine_ray else 1
    labels = cell.labels
    batch = min(cell.batch_size, labels)
    batch -= batch % w
    return FinetuneSpec(
        source=source,
        task=cell.task,
        mode=cell.mode,
        labels=labels,
        steps=cell.steps,
        batch_size=max(batch, w),
        lr=p.pretrained_lr if (p.pretrained_lr is not None and source != "none" and cell.mode == "full") else p.lr,
        seed=cell.seed,
        crop=p.crop,
        manifest=manifest,
        probe_first=p.probe_first and cell.mode == "full",
        augment=p.augment,
        grad_clip=p.grad_clip,
        sr_skip=p.sr_skip,
        config=random_init_config(p, cell.raw, supervised=cell.mode == "full") if source == "none" else None,
        workers=w,
        use_gpu=p.use_gpu and engine_ray,
        label_threads=p.label_threads,
        fit=cell.fit,
        schedule=p.schedule,
        warmup=p.warmup if p.warmup < cell.steps else 0,
        log_every=max(1, min(p.log_every, cell.steps)),
        tracking=engine_ray,  # the local engine is tracked by this harness
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        storage_path=storage_path,
        out=out,
    )


# ----------------------------------------------------------------------------------------------- cache


class ResultsCache:
    """Finished cells, one JSON object per line (appended and fsynced as each cell finishes).

    A record holds ``key`` and ``fingerprint``; :meth:`get` returns it only when the fingerprint
    matches (a changed preset re-runs its cells). A torn last line (a crash mid-write) is ignored.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.records: dict[str, dict[str, Any]] = {}
        self.stale = 0
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or "key" not in rec:
                    continue
                if rec.get("fingerprint") != fingerprint:
                    self.stale += 1
                    continue
                self.records[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def drop(self, key: str) -> None:
        self.records.pop(key, None)

    def put(self, record: dict[str, Any]) -> dict[str, Any]:
        rec = {**record, "fingerprint": self.fingerprint}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a line cut short by a crash: start on a new line
        with open(self.path, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(rec, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[rec["key"]] = rec
        return rec


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


# ----------------------------------------------------------------------------------------------- rows


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def rows_from_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate the evaluation results of cached cells into table rows, one per
    (study, method, task, dataset, labels, sigma): means over seeds of the per-seed image means;
    ``psnr_std`` / ``ssim_std``: standard deviation over seeds (ddof=1), null with one seed."""
    import statistics

    groups: dict[tuple, list[tuple[int, dict[str, Any]]]] = {}
    records = list(records)
    records_by_key: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        records_by_key.setdefault((rec.get("study", ""), rec["method"], int(rec["labels"])), []).append(rec)
    for rec in records:
        for res in rec.get("results") or []:
            k = (rec.get("study", ""), rec["method"], res["task"], res["dataset"], int(rec["labels"]), res.get("sigma"))
            groups.setdefault(k, []).append((int(rec["seed"]), res))
    rows = []
    for (study, method, task, dataset, labels, sigma), items in groups.items():
        items.sort(key=lambda t: t[0])
        seeds = [s for s, _ in items]

        def col(name: str) -> list[float]:
            return [v for v in (_finite(r.get(name)) for _, r in items) if v is not None]

        def mean(vals: list[float]) -> float | None:
            return statistics.fmean(vals) if vals else None

        def std(vals: list[float]) -> float | None:
            return statistics.stdev(vals) if len(vals) >= 2 else None

        psnr, ssim = col("psnr_mean"), col("ssim_mean")
        rows.append(
            {
                "method": method,
                "task": task,
                "dataset": dataset,
                "psnr_mean": mean(psnr),
                "psnr_std": std(psnr),
                "ssim_mean": mean(ssim),
                "seeds": len(seeds),
                "labels": labels,
                "study": study,
                "sigma": sigma,
                "ssim_std": std(ssim),
                "n_images": int(min((r.get("n") or 0) for _, r in items)),
                "psnr_input_mean": mean(col("psnr_input_mean")),
                "ssim_input_mean": mean(col("ssim_input_mean")),
                "seed_list": ",".join(str(s) for s in seeds),
                "head": next((r.get("head") for r in records_by_key.get((study, method, labels), [])), None),
                "global_residual": next((r.get("global_residual") for r in records_by_key.get((study, method, labels), [])), None),
            }
        )
    order = {"proxy": 0, "label-efficiency": 1, "context": 2}
    task_order = {t: i for i, t in enumerate(("denoise", "sr", "jdensr", "jdd", "real", "gaussian"))}
    methods = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (order.get(r["study"], 9), task_order.get(r["task"], 9), methods.get(r["method"], 99),
                             r["method"], r["labels"], r["dataset"], r["sigma"] or 0.0))  # fmt: skip
    return rows


def write_rows(rows: Sequence[dict[str, Any]], out_stem: str | os.PathLike) -> dict[str, Path]:
    """``out_stem.json`` (a list of row objects, non-finite -> null) and ``out_stem.parquet``: the
    documented keys first, in :data:`ROW_KEYS` + :data:`EXTRA_ROW_KEYS` order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    cols = list(ROW_KEYS) + list(EXTRA_ROW_KEYS)
    clean = [{k: (_finite(r.get(k)) if isinstance(r.get(k), float) else r.get(k)) for k in cols} for r in rows]
    schema = pa.schema(
        [
            ("method", pa.string()), ("task", pa.string()), ("dataset", pa.string()),
            ("psnr_mean", pa.float64()), ("psnr_std", pa.float64()), ("ssim_mean", pa.float64()),
            ("seeds", pa.int64()), ("labels", pa.int64()), ("study", pa.string()), ("sigma", pa.float64()),
            ("ssim_std", pa.float64()), ("n_images", pa.int64()), ("psnr_input_mean", pa.float64()),
            ("ssim_input_mean", pa.float64()), ("seed_list", pa.string()), ("head", pa.string()),
            ("global_residual", pa.bool_()),
        ]
    )  # fmt: skip
    paths = {"json": stem.with_name(stem.name + ".json"), "parquet": stem.with_name(stem.name + ".parquet")}
    paths["json"].write_text(json.dumps(clean, indent=1) + "\n")
    pq.write_table(pa.Table.from_pylist(clean, schema=schema), paths["parquet"])
    return paths


def _real_study_table(rows: list[dict[str, Any]], prefix: str, pretrained: Sequence[str], scratch: str) -> str:
    """A real-noise study's table: one row per (method, fine-tuning), one column per label count, plus the
    noisy input and the classical floor on the same test images (when those cells are in ``rows``)."""
    lines = ["| method | fine-tuning | " + " | ".join(f"{n} pairs' crops" for n in REAL_LABELS) + " |",
             "|---|---|" + "---|" * len(REAL_LABELS)]  # fmt: skip
    idx = {(r["method"], r["study"], int(r["labels"])): r for r in rows}
    first = next((r for r in rows if r.get("psnr_input_mean") is not None), None)
    if first is not None:
        lines.append("| noisy input | none | " + " | ".join(f"{first['psnr_input_mean']:.2f}" for _ in REAL_LABELS) + " |")
    for r in rows:
        if r["study"] == f"{prefix}-classical":
            lines.append(f"| {r['method']} | none (classical) | " + " | ".join(_fmt_cell(r) for _ in REAL_LABELS) + " |")
    order = ([(m, f"{prefix}-proxy") for m in pretrained] + [(f"{m} + SL", f"{prefix}-full") for m in pretrained]
             + [(scratch, f"{prefix}-full")])  # fmt: skip
    for method, study in order:
        if any((method, study, n) in idx for n in REAL_LABELS):
            lines.append(f"| {method} | {study.split('-')[1]} | "
                         + " | ".join(_fmt_cell(idx.get((method, study, n))) for n in REAL_LABELS) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _fmt_cell(row: dict[str, Any] | None, with_ssim: bool = True) -> str:
    if row is None or row.get("psnr_mean") is None:
        return "–"
    s = f"{row['psnr_mean']:.2f}"
    if row.get("psnr_std") is not None:
        s += f" ± {row['psnr_std']:.2f}"
    if with_ssim and row.get("ssim_mean") is not None:
        s += f" / {row['ssim_mean']:.4f}"
    return s


def _pivot(rows: list[dict[str, Any]], methods: Sequence[str], columns: Sequence[tuple[str, str]], *, study: str) -> str:
    """Markdown table: one line per method, one column per (task, dataset): "PSNR ± std / SSIM"."""
    index = {(r["method"], r["task"], r["dataset"]): r for r in rows if r["study"] == study}
    head = "| method | " + " | ".join(f"{t} {d}" for t, d in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for m in methods:
        cells = [_fmt_cell(index.get((m, t, d))) for t, d in columns]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    inputs = []
    for t, d in columns:
        any_row = next((r for (m, tt, dd), r in index.items() if tt == t and dd == d and r.get("psnr_input_mean") is not None), None)
        inputs.append("–" if any_row is None else f"{any_row['psnr_input_mean']:.2f} / {any_row['ssim_input_mean']:.4f}")
    lines.append("| *input (noisy / bicubic / bilinear demosaic)* | " + " | ".join(inputs) + " |")
    return "\n".join(lines) + "\n"


def probe_summary(records: Iterable[dict[str, Any]]) -> str | None:
    """One line on the proxy cells' fits: how many converged, seconds, label L1 closed form -> final."""
    import statistics

    fits = [r["train_metrics"] for r in records if r.get("kind") == "finetune" and r.get("mode") == "proxy"
            and "probe_seconds" in (r.get("train_metrics") or {})]  # fmt: skip
    if not fits:
        return None
    conv = sum(1 for m in fits if m.get("probe_converged"))
    gain = [1 - m["label_l1"] / m["probe_lstsq_l1"] for m in fits if m.get("probe_lstsq_l1")]
    return (f"{len(fits)} fits, {conv} converged; seconds per fit (features + solve + refinement) median "
            f"{statistics.median(m['probe_seconds'] for m in fits):.1f}, max {max(m['probe_seconds'] for m in fits):.1f}; "
            f"iterations median {statistics.median(m['probe_iterations'] for m in fits):.0f}"
            + (f"; L1 refinement lowered the label L1 below the closed form's by {100 * statistics.median(gain):.2f} % (median)"
               if gain else "") + ".")  # fmt: skip


def fig2_images_note(preset: Preset) -> str:
    return (f"Pairs of overlapping {preset.crop}x{preset.crop} crops of {preset.fig2_images} CBSD68 images (each with its own "
            "NLF noise, sigma in [0, 20]); every other image of the batch is a negative.")  # fmt: skip


def markdown_report(rows: list[dict[str, Any]], *, preset: Preset, header: dict[str, Any], fig2: str | None,
                    failures: list[dict[str, Any]], timing: dict[str, Any], polyu_split: dict[str, list[str]] | None,
                    fig2_stats: dict[str, Any] | None = None, probe_stats: str | None = None) -> str:  # fmt: skip
    """The whole ``<out>.md``."""
    from rcl_dist.evaluate import markdown_table

    out: list[str] = [f"# RCL fidelity matrix — preset `{preset.name}`\n"]
    if preset.name == "smoke":
        out.append(
            "> **The numbers below are meaningless.** The smoke preset trains for a handful of steps on a tiny "
            "network and evaluates 2 images per set: it checks that every cell of the matrix runs end to end, "
            "nothing else. Use the `cpu` or `gpu` preset for results.\n"
        )
    out.append("## Run\n")
    for k, v in header.items():
        out.append(f"- **{k}**: {v}")
    out.append("")
    out.append("## Budget (the same for every method)\n")
    out.append(markdown_table([{k: (", ".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in preset.as_dict().items()}]))
    out.append("## Timing\n")
    for k, v in timing.items():
        out.append(f"- {k}: {v}")
    out.append("")
    if failures:
        out.append("## Failed cells (rerun to retry)\n")
        for f in failures:
            out.append(f"- `{f['key']}`: {f['error']}")
        out.append("")

    out.append("Cells: PSNR (dB) ± standard deviation over seeds (when more than one) / SSIM, means over the test "
               "images of each set (first `eval_limit` images in file-name order). Test inputs are seeded per image "
               "(evaluation seed 0), identical for every method.\n")  # fmt: skip
    den = [("denoise", d) for d, _ in EVAL_SETS["denoise"]]
    out.append("## Table 1 analogue: proxy evaluation, denoising (NLF noise, sigma in [0, 20])\n")
    out.append(_pivot(rows, PROXY_RGB + (ORACLE_OWN, "Oracle"), den, study="proxy"))
    if any(r["study"] == "classical" for r in rows):
        out.append("No training (the floor): classical denoisers on the same inputs, the noise level estimated from each "
                   "image (`rcl_dist.classical`; BM3D only where the optional `bm3d` package is installed).\n")  # fmt: skip
        out.append(_pivot(rows, tuple(CLASSICAL), den, study="classical"))
    out.append(f"Proxy rows: every weight frozen but a fresh last layer fitted on {preset.proxy_labels} labelled crops "
               f"(fit `{preset.proxy_fit}`, `rcl_dist.train.probe`). {ORACLE_OWN}: the supervised denoiser with its own "
               "last layer, which lies in the proxy's hypothesis class (the proxy's reference). "
               + ("Networks: U-Net, `model.global_residual` per method (the auto rule; see each row's `global_residual`).\n"
                  if preset.global_residual is None else f"Networks: U-Net with `model.global_residual={str(preset.global_residual).lower()}`.\n"))  # fmt: skip
    if probe_stats:
        out.append("Probe fits (every proxy cell): " + probe_stats + "\n")
    out.append("## Table 2 analogue: proxy evaluation, SR x2 and JDenSR\n")
    cols = [(t, d) for t in ("sr", "jdensr") for d, _ in EVAL_SETS[t]]
    out.append(_pivot(rows, PROXY_RGB + (SL_DEN, "Oracle"), cols, study="proxy"))
    out.append("Oracle here: supervised training on the task itself (from random initialisation, full network, "
               f"{preset.pretrain_steps} steps on {preset.oracle_labels} labelled crops). SL (Den): the supervised "
               "denoising network, proxy-fine-tuned like the unsupervised ones.\n")  # fmt: skip
    out.append("## Table 4 analogue: proxy evaluation, JDD (packed RAW, noise added in RAW)\n")
    out.append(_pivot(rows, ("RCL-EMD", RANDOM_INIT, "Oracle"), [("jdd", d) for d, _ in EVAL_SETS["jdd"]], study="proxy"))
    out.append("RCL-EMD here is pre-trained on packed RAW (`model.raw=packed`, Eq. 11 consistency); the input row is "
               "the bilinear demosaic of the noisy RAW.\n")  # fmt: skip
    out.append("## Real noise: proxy evaluation on PolyU (test split)\n")
    out.append(_pivot(rows, PROXY_RGB + (SL_DEN, "Oracle"), [("real", "PolyU")], study="proxy"))
    if any(r["study"] == "classical" and r["task"] == "real" for r in rows):
        out.append(_pivot(rows, tuple(CLASSICAL), [("real", "PolyU")], study="classical"))
    real_rows = [r for r in rows if r["study"] in ("real-proxy", "real-full")]
    if real_rows:
        out.append("## Real noise, nothing simulated: pre-trained on PolyU's noisy halves, fine-tuned on real pairs\n")
        out.append(_real_study_table(real_rows, "real", REAL_PRETRAINED, SL_SCRATCH))
        out.append("Pre-training: the noisy `*_real` photographs of the PolyU training split only (`data.noise=none`: "
                   "both crops of an RCL pair from the one photograph; the clean means never seen), the preset's "
                   "budget. Fine-tuning: proxy (fresh last layer) or full, on 10 / 100 crops of the training split's "
                   "real pairs; SL (scratch): the same architecture from random initialisation on the same crops. "
                   "Test: the PolyU test split, whose noisy input and classical floor are in the rows above.\n")  # fmt: skip
    xcam_rows = [r for r in rows if r["study"] in ("xcam-proxy", "xcam-full", "xcam-classical")]
    if xcam_rows:
        test = "+".join(POLYU_XCAM_TEST)
        out.append(f"## Real noise across cameras: trained on the other cameras' pairs, tested on {test}\n")
        out.append(_real_study_table(xcam_rows, "xcam", XCAM_PRETRAINED, SL_SCRATCH_XCAM))
        out.append(f"The same study with a split by camera model: pre-training on the noisy halves and fine-tuning on "
                   f"the pairs of every camera but {', '.join(POLYU_XCAM_TEST)}; test: all pairs of {test}, which "
                   "no network saw in any form. Classical rows: no training, noise level estimated per image.\n")  # fmt: skip
    if polyu_split:
        out.append(f"Split of the {len(polyu_split['train']) + len(polyu_split['test'])} PolyU_cropped pairs by name "
                   "(sha256 order, seed 0): test = "
                   + ", ".join(f"`{n}`" for n in polyu_split["test"]) + "; every other pair is in the labelled training split.\n")  # fmt: skip
    out.append("## Table 3 analogue: label efficiency (full fine-tuning, denoising)\n")
    le = [r for r in rows if r["study"] == "label-efficiency"]
    if le:
        counts = sorted({r["labels"] for r in le})
        lines = ["| labels | " + " | ".join(f"{m} {d}" for d, _ in EVAL_SETS["denoise"] for m in (SL_SCRATCH, RCL_SL)) + " |"]
        lines.append("|---|" + "---|" * (2 * len(EVAL_SETS["denoise"])))
        idx = {(r["method"], r["labels"], r["dataset"]): r for r in le}
        for n in counts:
            cells = []
            for d, _ in EVAL_SETS["denoise"]:
                for m in (SL_SCRATCH, RCL_SL):
                    r = idx.get((RCL_ZERO if n == 0 and m == RCL_SL else m, n, d))
                    cells.append(_fmt_cell(r))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines) + "\n")
        out.append("Row 0: the pre-trained RCL-EMD network applied directly (no labels). SL (scratch): a U-Net of the same "
                   "width and depth from random initialisation, with the input skip of every supervised network, "
                   "on the same labels and seed.\n")  # fmt: skip
    out.append("## Context: a blind Gaussian Oracle on all of CBSD68\n")
    ctx = {r["sigma"]: r for r in rows if r["study"] == "context"}
    if ctx:
        lines = ["| method | " + " | ".join(f"sigma {s:g}" for s in preset.sigmas) + " |", "|---|" + "---|" * len(preset.sigmas)]
        lines.append(f"| {ORACLE_GAUSS} (this run, own head) | " + " | ".join(_fmt_cell(ctx.get(float(s))) for s in preset.sigmas) + " |")
        for name, vals in PUBLISHED_CBSD68.items():
            if len(vals) == len(preset.sigmas):
                lines.append(f"| {name} (published, all 68 images) | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
        lines.append("| *noisy input* | " + " | ".join(
            "–" if ctx.get(float(s)) is None else f"{ctx[float(s)]['psnr_input_mean']:.2f}" for s in preset.sigmas) + " |")  # fmt: skip
        out.append("\n".join(lines) + "\n")
        n_ctx = next(iter(ctx.values())).get("n_images")
        out.append(f"{ORACLE_GAUSS}: one blind U-Net (width {preset.width}, depth {preset.depth}) trained supervised on "
                   f"CBSD432 with plain Gaussian noise, sigma ~ U(0, {preset.gaussian_sigma_max:g}) per image (0-255 scale), "
                   f"{preset.pretrain_steps} steps x batch {preset.batch_size} of {preset.crop}x{preset.crop} crops "
                   f"(= {preset.pretrain_steps * preset.batch_size} crops seen), seed {preset.seeds[0]}; evaluated with its "
                   f"own last layer on {n_ctx} CBSD68 images. The published figures are of networks trained per sigma "
                   "(CDnCNN also blind) on far more data for far longer: context, not a target.\n")  # fmt: skip
    out.append("## Fig. 2: EMD(negative) − EMD(positive) before and after RCL-EMD training\n")
    out.append(f"![Fig. 2]({fig2})\n" if fig2 else "(not produced)\n")
    if fig2_stats:
        parts = []
        for k, label in (("init", "Before training (fresh initialisation)"), ("final", "after training"),
                         ("noise", "with the true simulated noise as the residual (an ideal denoiser)")):  # fmt: skip
            st = fig2_stats.get(k) or {}
            if st.get("mean") is not None:
                parts.append(f"{label}: mean {st['mean']:.4g}, median {st.get('median', float('nan')):.4g}, "
                             f"{100 * st.get('frac_positive', float('nan')):.0f} % > 0 over {st.get('n')} (anchor, negative) pairs")  # fmt: skip
        out.append(f"{fig2_images_note(preset)} " + "; ".join(parts) + ".\n")
        nd = fig2_stats.get("noise_distance") or {}
        if nd.get("init") and nd.get("final"):
            out.append(f"Distance of each crop's residual x - f(x) to the noise it holds (the quantity the paper's Fig. 2 "
                       f"caption says RCL contracts), median over {nd['final'].get('n')} crops: {nd['init']['median']:.4g} "
                       f"before training, {nd['final']['median']:.4g} after (0 for an ideal denoiser; the identity "
                       "f(x) = x gives the noise's own distance to 0).\n")  # fmt: skip
    out.append("## All rows\n")
    out.append(markdown_table(rows, list(ROW_KEYS) + ["study", "sigma", "n_images", "psnr_input_mean", "seed_list", "head",
                                    "global_residual"]) if rows else "(none)\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- the harness


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def start_private_ray(num_cpus: int) -> None:
    """A local Ray on 127.0.0.1 for this process only (``address="local"``), set up like
    :func:`rcl_dist.train.launch.ensure_ray`'s local branch; with ``RAY_ADDRESS`` set, that cluster.

    ``ensure_ray`` joins any Ray whose address file on this node answers, and on a shared machine
    that can be another user's instance (their CPUs, their workers' ``RCL_DIST_HOME``); before it
    checked that the address answers, one attempt here blocked ~14 minutes on a stale one. Starting
    our own first makes ``ensure_ray`` (called by run_pretrain / run_finetune) return at once."""
    import ray

    from rcl_dist.paths import rcl_home
    from rcl_dist.train.launch import ensure_ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ensure_ray(num_cpus=num_cpus)
        return
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo", "RCL_DIST_HOME": str(rcl_home())}},
    )


class Harness:
    """Runs the plan of a preset cell by cell, with the results cache, MLflow and the outputs."""

    def __init__(self, preset: Preset, out: str | os.PathLike, *, experiment: str | None = None,
                 tracking_uri: str | None = None, data_root: str | os.PathLike | None = None,
                 log: Callable[[str], Any] = print, argv: Sequence[str] | None = None) -> None:  # fmt: skip
        self.preset = preset
        self.out = Path(out).absolute()  # Ray workers run elsewhere: every path they see is absolute
        self.work = self.out.with_name(self.out.name + "_work")
        self.experiment = experiment or f"rcl-fidelity-{preset.name}"
        self.tracking_uri = tracking_uri
        self.data_root = Path(data_root).absolute() if data_root is not None else None
        self.log = log
        self.argv = list(argv) if argv is not None else None
        self.cache = ResultsCache(self.work / "cache.jsonl", preset.fingerprint())
        self.failures: list[dict[str, Any]] = []
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self._manifests: dict[str, str] = {}
        self._failed: dict[str, str] = {}  # cells that failed in this invocation: not retried by their dependents
        self._outdated: set[str] = set()  # cells dropped by drop_outdated: their runs get names of their own
        self._polyu: dict[str, list[str]] | None = None
        # kind -> executor(cell) -> record (tests replace these)
        self.executors: dict[str, Callable[[Cell], dict[str, Any]]] = {
            "pretrain": self._run_pretrain,
            "finetune": self._run_finetune,
            "zero": self._run_zero,
            "gaussian": self._run_gaussian,
            "fig2": self._run_fig2,
            "classical": self._run_classical,
        }

    # -- set-up ------------------------------------------------------------------------------------

    def prepare_environment(self) -> None:
        """RCL_DIST_HOME under the work folder (unless set), a .gitignore for the scratch state."""
        self.work.mkdir(parents=True, exist_ok=True)
        gi = self.work / ".gitignore"
        if not gi.exists():
            gi.write_text("# scratch state of benchmarks/fidelity.py (MLflow store, checkpoints, cache)\n*\n")
        if not os.environ.get("RCL_DIST_HOME"):
            os.environ["RCL_DIST_HOME"] = str((self.work / "home").resolve())
        if self.tracking_uri is None:
            from rcl_dist.paths import resolve_tracking_uri

            self.tracking_uri = resolve_tracking_uri(None)

    def shared(self) -> Path:
        if self.data_root is not None:
            return self.data_root
        from rcl_dist.data.images import shared_data_dir

        root = shared_data_dir()
        if root is None:
            raise FileNotFoundError("no shared/data folder here: set RCL_DIST_DATA or pass --data-root")
        self.data_root = root
        return root

    def folder(self, key: str) -> Path:
        if key == "@polyu_test":
            return self.polyu_split_dirs()[1]
        if key == "@polyu_xcam_test":
            return self.polyu_xcam_dirs()[1]
        return self.shared() / key

    def polyu_xcam_dirs(self) -> tuple[Path, Path]:
        """(train, test) folders of symlinks to the PolyU pairs split by camera model: test = the pairs
        whose name starts with one of POLYU_XCAM_TEST, train = every other camera's pairs."""
        src = self.shared() / POLYU
        dirs = {}
        for part in ("train", "test"):
            d = self.work / "data" / f"polyu_xcam_{part}"
            d.mkdir(parents=True, exist_ok=True)
            dirs[part] = d
        for p in sorted(src.iterdir()):
            if p.stem.endswith(("_real", "_mean")):
                part = "test" if p.name.startswith(POLYU_XCAM_TEST) else "train"
                link = dirs[part] / p.name
                if not link.exists():
                    link.symlink_to(p.resolve())
        return dirs["train"], dirs["test"]

    def polyu_split_dirs(self) -> tuple[Path, Path]:
        """(train, test) folders of symlinks to the PolyU pairs; the split is by pair name (module doc)."""
        src = self.shared() / POLYU
        names = sorted(p.name[: -len("_real" + p.suffix)] for p in src.iterdir() if p.stem.endswith("_real"))
        order = sorted(names, key=lambda n: hashlib.sha256(f"polyu-split|0|{n}".encode()).hexdigest())
        n_test = int(round(POLYU_TEST_FRACTION * len(order)))
        split = {"test": sorted(order[:n_test]), "train": sorted(order[n_test:])}
        self._polyu = split
        dirs = {}
        for part, members in split.items():
            d = self.work / "data" / f"polyu_{part}"
            d.mkdir(parents=True, exist_ok=True)
            for n in members:
                for p in src.glob(f"{n}_*"):
                    if p.stem in (f"{n}_real", f"{n}_mean"):
                        link = d / p.name
                        if not link.exists():
                            link.symlink_to(p.resolve())
            dirs[part] = d
        return dirs["train"], dirs["test"]

    def manifest(self, which: str) -> str:
        """The CBSD432 manifest ("train": NLF noise, sigma in [0, 20]; "gaussian": shot 0, sigma in
        [0, gaussian_sigma_max]) or the PolyU training-split manifest ("real"), indexed once."""
        if which in self._manifests:
            return self._manifests[which]
        from rcl_dist.data.index import index_images

        sampler, sigma_max = "uniform", 20.0 / 255.0
        if which == "train":
            folder, out = self.shared() / TRAIN_SET, self.work / "data" / "cbsd432.parquet"
        elif which == "gaussian":
            folder, out = self.shared() / TRAIN_SET, self.work / "data" / "cbsd432_gaussian.parquet"
            sampler, sigma_max = "gaussian", self.preset.gaussian_sigma_max / 255.0
        elif which == "real_noisy":  # the unlabelled set of the real-noise study: the noisy *_real halves only
            folder, out = self.polyu_split_dirs()[0], self.work / "data" / "polyu_train_noisy.parquet"
        elif which == "xcam_noisy":  # the cross-camera study's unlabelled set: the other cameras' noisy halves
            folder, out = self.polyu_xcam_dirs()[0], self.work / "data" / "polyu_xcam_train_noisy.parquet"
        elif which == "xcam":
            folder, out = self.polyu_xcam_dirs()[0], self.work / "data" / "polyu_xcam_train.parquet"
        else:
            folder, out = self.polyu_split_dirs()[0], self.work / "data" / "polyu_train.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        index_images([(str(folder), "train")], out, seed=0, sampler=sampler,
                     sampler_options={"sigma_min": 0.0, "sigma_max": sigma_max}, log=lambda *_: None,
                     noise="none" if which in ("real_noisy", "xcam_noisy") else "simulated")  # fmt: skip
        if which in ("train", "gaussian") and self.preset.realisation == "fixed":
            from rcl_dist.data.simulate import simulate

            # the stored noisy images every pre-training reads (where simulated_dir_for looks):
            # realisation 0 for all, 1 for N2N's second image, and the RAW-domain ones of RCL-EMD (RAW)
            stored = str(out.with_suffix("")) + "_simulated"
            simulate(out, stored, pairs=True, gray=False, log=lambda *_: None)
            if which == "train":
                simulate(out, stored, raw=True, log=lambda *_: None)
        self._manifests[which] = str(out)
        return str(out)

    # -- running -----------------------------------------------------------------------------------

    def drop_outdated(self, plan: list[Cell]) -> list[str]:
        """Forget cached cells whose network the product now builds differently: the record's
        ``global_residual`` is not what :func:`resolved_global_residual` gives today (the auto rule of
        ``model.global_residual`` changed since it ran). Their rows leave the report and a run computes
        them again (a fine-tuning built on such a pre-training is outdated with it). Returns their keys."""
        dropped = []
        for cell in plan:
            rec = self.cache.get(cell.key)
            if rec is None or rec.get("global_residual") is None or cell.kind == "classical":
                continue
            now = resolved_global_residual(self.preset, cell)
            if bool(rec["global_residual"]) != now:
                self.log(f"[fidelity] {cell.key}: cached with global_residual={rec['global_residual']}, the "
                         f"product's rule now gives {now}; dropped (it runs again)")  # fmt: skip
                self.cache.drop(cell.key)
                self._outdated.add(cell.key)
                dropped.append(cell.key)
        return dropped

    def _needs_checkpoint(self, rec: dict[str, Any] | None) -> bool:
        return rec is not None and (not rec.get("checkpoint") or not Path(rec["checkpoint"]).is_file())

    def ensure(self, key: str, plan: dict[str, Cell], needs_checkpoint: bool = False, stack: tuple = ()) -> dict[str, Any]:
        """The record of cell ``key``: from the cache, or by running it (and its source first)."""
        rec = self.cache.get(key)
        if rec is not None and needs_checkpoint and self._needs_checkpoint(rec):
            self.log(f"[fidelity] {key}: cached but its checkpoint is gone; running it again")
            self.cache.drop(key)
            rec = None
        if rec is not None:
            return rec
        if key in stack:
            raise RuntimeError(f"dependency cycle: {' -> '.join(stack + (key,))}")
        if key in self._failed:
            raise RuntimeError(f"{key} failed earlier in this invocation ({self._failed[key]})")
        cell = plan[key]
        if cell.source is not None:
            self.ensure(cell.source, plan, needs_checkpoint=True, stack=stack + (key,))
        self.log(f"[fidelity] running {key} ({cell.kind}{', ' + cell.mode if cell.kind == 'finetune' else ''})")
        t0 = time.perf_counter()
        try:
            rec = self.executors[cell.kind](cell)
        except Exception as e:
            first_line = str(e).splitlines()[0] if str(e) else ""
            self._failed[key] = f"{type(e).__name__}: {first_line}"[:300]
            raise
        rec = {
            "key": key, "kind": cell.kind, "method": cell.method, "seed": cell.seed, "task": cell.task,
            "labels": cell.labels, "study": cell.study, "mode": cell.mode, "source": cell.source,
            "steps": cell.steps, "seconds": round(time.perf_counter() - t0, 2), "head": cell.head,
            "global_residual": None if cell.kind == "classical" else resolved_global_residual(self.preset, cell),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **rec,
        }  # fmt: skip
        self.ran.append(key)
        return self.cache.put(rec)

    def run(self, plan: list[Cell], only: Sequence[str] = (), only_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Run (or take from the cache) every cell of ``plan`` whose key contains one of ``only`` or is one
        of ``only_keys`` (all when both are empty) and their sources; a failing cell is recorded and the
        rest go on."""
        by_key = {c.key: c for c in plan}
        unknown = set(only_keys) - set(by_key)
        if unknown:
            raise SystemExit(f"--only-key: no such cell in this plan: {sorted(unknown)}")
        for cell in plan:
            if (only or only_keys) and not (cell.key in only_keys or any(o in cell.key for o in only)):
                continue
            if self.cache.get(cell.key) is not None:
                self.skipped.append(cell.key)
                continue
            try:
                self.ensure(cell.key, by_key)
            except Exception as e:  # noqa: BLE001 - one failing cell must not stop the matrix
                self.log(f"[fidelity] FAILED {cell.key}: {type(e).__name__}: {e}")
                self.log(traceback.format_exc())
                first_line = str(e).splitlines()[0] if str(e) else ""
                self.failures.append({"key": cell.key, "error": f"{type(e).__name__}: {first_line}"[:300]})
        return [self.cache.get(c.key) for c in plan if self.cache.get(c.key) is not None]

    def import_pretrainings(self, other_out: str | os.PathLike, other: Preset) -> list[str]:
        """Take the finished pre-trainings of another output (``<other_out>_work/cache.jsonl``, made with
        preset ``other``) into this cache, when ``other`` differs from this preset only in
        :data:`FINETUNE_ONLY_FIELDS` (and plan-only fields): the same pre-training, not run twice.
        Only records of ``other``'s fingerprint with their checkpoint on disk; returns their keys."""
        diff = {k for k, v in self.preset.as_dict().items() if getattr(other, k) != v} - FINETUNE_ONLY_FIELDS - _PLAN_ONLY_FIELDS
        if diff:
            raise SystemExit(f"--pretrain-from {other_out}: its preset differs in {sorted(diff)}, which change a "
                             f"pre-training; only {sorted(FINETUNE_ONLY_FIELDS)} may differ")  # fmt: skip
        source = ResultsCache(Path(other_out).absolute().with_name(Path(other_out).name + "_work") / "cache.jsonl",
                              other.fingerprint())  # fmt: skip
        taken = []
        for key, rec in source.records.items():
            if rec.get("kind") != "pretrain" or self.cache.get(key) is not None or self._needs_checkpoint(rec):
                continue
            self.cache.put({**rec, "imported_from": f"{source.path} ({other.fingerprint()})"})
            taken.append(key)
        return taken

    # -- executors ---------------------------------------------------------------------------------

    def _checkpoint_of(self, key: str) -> str:
        rec = self.cache.get(key)
        if rec is None or not rec.get("checkpoint"):
            raise RuntimeError(f"{key}: no checkpoint")
        return rec["checkpoint"]

    def _tag_run(self, run_id: str | None, cell: Cell, extra: dict[str, str] | None = None) -> None:
        if not run_id:
            return
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        tags = {"fidelity.cell": cell.key, "fidelity.preset": self.preset.name, "fidelity.method": cell.method,
                "fidelity.study": cell.study, "fidelity.fingerprint": self.preset.fingerprint(), **(extra or {})}  # fmt: skip
        for k, v in tags.items():
            client.set_tag(run_id, k, v)

    def _run_name(self, cell: Cell) -> str:
        name = f"{self.preset.name}-{self.preset.fingerprint()[:6]}-{_slug(cell.key.replace('|', '-'))}"
        if cell.key in self._outdated:  # the old run's folder holds the other network: never resume from it
            name += "-skip" if resolved_global_residual(self.preset, cell) else "-direct"
        return name

    def _run_pretrain(self, cell: Cell) -> dict[str, Any]:
        from rcl_dist.config import ConfigError
        from rcl_dist.models.io import checkpoint_file
        from rcl_dist.paths import rcl_home
        from rcl_dist.train.launch import run_pretrain

        start_private_ray(max(os.cpu_count() or 1, self.preset.workers + 1))
        storage = rcl_home() / "ray_results"
        name = self._run_name(cell)
        resume = (storage / name / "rcl_dist_run.json").is_file()
        attempt = 0
        while True:
            run_name = name if attempt == 0 else f"{name}-r{attempt}"
            cfg = pretrain_config(self.preset, cell, self.manifest(cell.manifest), experiment=self.experiment, run_name=run_name)
            try:
                result = run_pretrain(cfg, resume=resume and attempt == 0, tracking_uri=self.tracking_uri, log=self.log)
                break
            except ConfigError as e:  # a run folder left by an interrupted attempt that cannot be resumed
                if "already exists" not in str(e) and "--resume" not in str(e):
                    raise
                self.log(f"[fidelity] {run_name}: {e}; starting a new run")
                attempt, resume = attempt + 1, False
            except Exception as e:  # noqa: BLE001
                if resume and attempt == 0:
                    self.log(f"[fidelity] resuming {run_name} failed ({type(e).__name__}: {e}); starting a new run")
                    attempt, resume = attempt + 1, False
                    continue
                raise
        ckpt = str(checkpoint_file(result.checkpoint_path or Path(result.storage_path) / result.run_name))
        self._tag_run(result.mlflow_run_id, cell)
        m = result.metrics or {}
        return {"checkpoint": ckpt, "mlflow_run_id": result.mlflow_run_id, "run_name": result.run_name,
                "train_seconds": round(result.seconds, 2),
                "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}}  # fmt: skip

    def _device(self) -> str:
        import torch

        return "cuda" if self.preset.use_gpu and torch.cuda.is_available() else "cpu"

    def _evaluate(self, model, cell: Cell, run_id: str | None) -> list[dict[str, Any]]:
        """Evaluate ``model`` on every set of the cell; log the summaries to MLflow run ``run_id``."""
        from rcl_dist.evaluate import evaluate_folder, summarise
        from rcl_dist.infer import WHOLE_IMAGE

        results = []
        for dataset, folder_key, task, sigma in cell.evals:
            limit = None if cell.all_images else self.preset.eval_limit
            tile = {} if cell.kind != "classical" else {"tile": WHOLE_IMAGE}  # one noise estimate per image
            table = evaluate_folder(model, self.folder(folder_key), task, seed=EVAL_SEED, limit=limit,
                                    sigma=sigma, device=self._device(), progress=None, **tile)  # fmt: skip
            s = summarise(table)
            s.update(dataset=dataset, task=task, sigma=sigma)
            results.append({k: s[k] for k in ("dataset", "task", "sigma", "n", "psnr_mean", "psnr_std", "ssim_mean",
                                              "psnr_input_mean", "ssim_input_mean", "skipped")})  # fmt: skip
            self.log(f"[fidelity]   {cell.method} {task} {dataset}{'' if sigma is None else f' sigma {sigma:g}'}: "
                     f"PSNR {s['psnr_mean']:.2f} dB (input {s['psnr_input_mean']:.2f}), SSIM {s['ssim_mean']:.4f}, n={s['n']}")  # fmt: skip
        if run_id:
            self._log_eval_metrics(run_id, results)
        return results

    def _log_eval_metrics(self, run_id: str, results: list[dict[str, Any]]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = []
        for r in results:
            base = f"eval.{r['task']}.{r['dataset']}" + ("" if r["sigma"] is None else f".sigma{r['sigma']:g}")
            for k in ("psnr_mean", "ssim_mean", "psnr_input_mean"):
                v = _finite(r.get(k))
                if v is not None:
                    metrics.append(Metric(f"{base}.{k}", v, ts, 0))
        if metrics:
            MlflowClient(self.tracking_uri).log_batch(run_id, metrics=metrics)

    def _eval_run(self, cell: Cell, params: dict[str, Any]):
        from rcl_dist.tracking import RunTracker

        tags = {"fidelity.cell": cell.key, "fidelity.preset": self.preset.name, "fidelity.method": cell.method,
                "fidelity.study": cell.study, "fidelity.fingerprint": self.preset.fingerprint()}  # fmt: skip
        return RunTracker.start(self.tracking_uri, self.experiment, self._run_name(cell), params, tags=tags)

    def _run_finetune(self, cell: Cell) -> dict[str, Any]:
        from rcl_dist.models.io import load_checkpoint

        source = "none" if cell.source is None else self._checkpoint_of(cell.source)
        manifest = self.manifest(cell.manifest)
        name = self._run_name(cell)
        out_dir = self.work / "checkpoints" / _slug(cell.key.replace("|", "-"))
        if self.preset.finetune_engine == "ray":
            from rcl_dist.train.finetune_ray import run_finetune
            from rcl_dist.paths import rcl_home

            start_private_ray(max(os.cpu_count() or 1, self.preset.workers + 1))
            storage = rcl_home() / "ray_results"
            run_name, n = name, 0
            while (storage / run_name).exists():  # an interrupted attempt: fine-tuning runs are short, start again
                n += 1
                run_name = f"{name}-r{n}"
            spec = finetune_spec(self.preset, cell, source, manifest, experiment=self.experiment,
                                 tracking_uri=self.tracking_uri, run_name=run_name, out=str(out_dir))  # fmt: skip
            result = run_finetune(spec, log=self.log)
            self._tag_run(result.mlflow_run_id, cell)
            model, _, _ = load_checkpoint(result.checkpoint_path)
            results = self._evaluate(model, cell, result.mlflow_run_id)
            return {"checkpoint": result.checkpoint_path, "mlflow_run_id": result.mlflow_run_id,
                    "train_seconds": round(result.seconds, 2), "train_metrics": _numbers(result.metrics),
                    "results": results}  # fmt: skip
        return self._run_finetune_local(cell, source, manifest, out_dir)

    def _run_finetune_local(self, cell: Cell, source: str, manifest: str, out_dir: Path) -> dict[str, Any]:
        """finetune_local (one process) tracked here like run_finetune tracks its runs."""
        from rcl_dist.train.finetune import finetune_local

        spec = finetune_spec(self.preset, cell, source, manifest, experiment=self.experiment, out=str(out_dir))
        tracker = self._eval_run(cell, spec.to_dict())
        status = "FAILED"
        try:
            tracker.set_tags({"pretrain_checkpoint": source, "task": cell.task, "mode": cell.mode,
                              "labels": str(cell.labels), "engine": "finetune_local",
                              "batch_size_effective": str(spec.effective_batch_size)})  # fmt: skip
            t0 = time.perf_counter()
            model, metrics, history = finetune_local(spec, device=self._device())
            seconds = time.perf_counter() - t0
            for m in history:
                tracker.log_metrics(m, step=int(m["step"]))
            ckpt = str(out_dir / "state.pt")
            tracker.set_tags({"checkpoint": ckpt})
            results = self._evaluate(model, cell, tracker.run_id)
            status = "FINISHED"
        finally:
            tracker.end(status)
        return {"checkpoint": ckpt, "mlflow_run_id": tracker.run_id, "train_seconds": round(seconds, 2),
                "train_metrics": _numbers(metrics), "results": results}  # fmt: skip

    def _run_zero(self, cell: Cell) -> dict[str, Any]:
        return self._evaluate_source(cell, {"labels": 0, "what": "pre-trained model applied directly"})

    def _run_classical(self, cell: Cell) -> dict[str, Any]:
        """A classical denoiser (no training) on the cell's test sets, whole images, sigma estimated per image."""
        from rcl_dist.classical import ClassicalDenoiser

        name = CLASSICAL[cell.method.removesuffix(" (xcam)")]
        return self._evaluate_in_run(ClassicalDenoiser(name), cell, {"classical": name, "sigma": "estimated per image"})

    def _run_gaussian(self, cell: Cell) -> dict[str, Any]:
        return self._evaluate_source(cell, {"sigmas": list(self.preset.sigmas)})

    def _evaluate_source(self, cell: Cell, params: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the checkpoint of ``cell.source`` as it is (no fine-tuning), in its own MLflow run."""
        from rcl_dist.models.io import load_checkpoint

        ckpt = self._checkpoint_of(cell.source)
        model, _, _ = load_checkpoint(ckpt)
        return {"checkpoint": ckpt, **self._evaluate_in_run(model, cell, {"checkpoint": ckpt, **params})}

    def _evaluate_in_run(self, model, cell: Cell, params: dict[str, Any]) -> dict[str, Any]:
        """``model`` on the cell's test sets, in an MLflow run of its own (``params``), ended FAILED on error."""
        tracker = self._eval_run(cell, params)
        status = "FAILED"
        try:
            results = self._evaluate(model, cell, tracker.run_id)
            status = "FINISHED"
        finally:
            tracker.end(status)
        return {"mlflow_run_id": tracker.run_id, "results": results}

    def _run_fig2(self, cell: Cell) -> dict[str, Any]:
        """Fig. 2 on CBSD68 crop pairs for the trained RCL-EMD network (see the module docstring)."""
        import shutil
        import tempfile

        import torch
        from mlflow import MlflowClient

        from rcl_dist.data.images import list_images, load_image
        from rcl_dist.data.sampler import PairSampler
        from rcl_dist.models.io import load_checkpoint
        from rcl_dist.losses.diagnostics import residual_noise_distances
        from rcl_dist.figures import pos_neg_from_distance_matrix
        from rcl_dist.tracking import FIG2_ARTIFACT
        from rcl_dist.models.factory import build_model_from_config
        from rcl_dist.losses.build import build_objective_from_config
        from rcl_dist.train.pretrain import _distance_matrix

        ckpt = self._checkpoint_of(cell.source)
        trained, cfg, _ = load_checkpoint(ckpt)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            initial = build_model_from_config(cfg)
        files = list_images(self.folder("test/CBSD68"))
        images = [load_image(p, gray=False) for p in files]
        n = min(self.preset.fig2_images, len(images))
        gen = torch.Generator().manual_seed(EVAL_SEED)
        sampler = PairSampler(images, crop=cfg.data.crop, overlap=cfg.data.overlap, sampler="uniform",
                              sampler_options={"sigma_min": cfg.data.sigma_min, "sigma_max": cfg.data.sigma_max},
                              generator=gen)  # fmt: skip
        batch = sampler.sample(n, "rcl+noise")
        objective = build_objective_from_config(cfg, None, torch.Generator().manual_seed(0))
        trained.eval()
        initial.eval()
        d_init = _distance_matrix(initial, objective, batch)
        d_final = _distance_matrix(trained, objective, batch)
        # the references: the same pairs with the true noise as the residual (an ideal denoiser), and
        # each crop's distance between the network's residual and the noise it holds
        contrastive = objective.contrastive
        with torch.no_grad():
            d_noise = contrastive.distance_matrix(contrastive.sketch(batch["q_noise"]), contrastive.sketch(batch["k_noise"]))
            to_noise = {name: residual_noise_distances(net.residual(batch["q"]), batch["q_noise"], contrastive.distance)[0]
                        for name, net in (("init", initial), ("final", trained))}  # fmt: skip
        tracker = self._eval_run(cell, {"checkpoint": ckpt, "images": n, "crop": cfg.data.crop, "dataset": "CBSD68",
                                        "before": f"fresh initialisation, torch seed {cfg.train.seed}"})  # fmt: skip
        status = "FAILED"
        try:
            summary = tracker.log_emd_density_plot(*pos_neg_from_distance_matrix(d_init), *pos_neg_from_distance_matrix(d_final),
                                                   reference=pos_neg_from_distance_matrix(d_noise), noise_distance=to_noise)  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                local = MlflowClient(self.tracking_uri).download_artifacts(tracker.run_id, FIG2_ARTIFACT, tmp)
                dest = self.out.with_name(self.out.name + "_fig2.png")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(local, dest)
            status = "FINISHED"
        finally:
            tracker.end(status)
        stats = {k: {s: summary[k].get(s) for s in ("n", "mean", "std", "median", "frac_positive") if s in summary[k]}
                 for k in ("init", "final", "noise")}  # fmt: skip
        stats["noise_distance"] = {k: {s: v.get(s) for s in ("n", "mean", "median")} for k, v in summary["noise_distance"].items()}
        return {"checkpoint": ckpt, "mlflow_run_id": tracker.run_id, "figure": str(dest), "fig2": stats}

    # -- outputs -----------------------------------------------------------------------------------

    def header(self, wall: float) -> dict[str, Any]:
        import torch

        def git(*args: str) -> str:
            try:
                return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return "?"

        commit = git("rev-parse", "HEAD") or "?"
        dirty = git("status", "--porcelain", "--untracked-files=no")
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        argv = self.argv if self.argv is not None else sys.argv
        note = {"note": self.note} if getattr(self, "note", None) else {}
        return {
            **note,
            "command": f"`{' '.join(shlex.quote(a) for a in ['python', *argv])}`",
            "commit": f"`{commit}`" + (" (with uncommitted changes to tracked files)" if dirty else ""),
            "machine": f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPU cores, GPU {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "MLflow": f"experiment `{self.experiment}` at `{self.tracking_uri}`",
            "RCL_DIST_HOME": f"`{os.environ.get('RCL_DIST_HOME', '')}`",
            "this invocation": f"{wall:.0f} s wall; {len(self.ran)} cells run, {len(self.skipped)} taken from the cache "
            f"(`{self.cache.path}`), {len(self.failures)} failed",
        }

    def timing(self, records: list[dict[str, Any]]) -> dict[str, str]:
        by_kind: dict[str, list[float]] = {}
        for r in records:
            by_kind.setdefault(r["kind"], []).append(float(r.get("seconds") or 0.0))
        total = sum(sum(v) for v in by_kind.values())
        out = {f"{k} cells": f"{len(v)}, {sum(v):.0f} s (mean {sum(v) / len(v):.1f} s)" for k, v in by_kind.items()}
        out["all cells (compute, summed over invocations)"] = f"{total:.0f} s"
        return out

    def write_outputs(self, plan: list[Cell], wall: float) -> dict[str, Path]:
        records = [self.cache.get(c.key) for c in plan if self.cache.get(c.key) is not None]
        rows = rows_from_records(records)
        paths = write_rows(rows, self.out)
        fig = self.out.with_name(self.out.name + "_fig2.png")
        if self._polyu is None:
            try:
                self.polyu_split_dirs()
            except OSError:
                pass
        # a figure left by an earlier run belongs to that run's RCL network, not to this plan's
        has_fig2 = fig.is_file() and any(r["kind"] == "fig2" for r in records)
        md = markdown_report(rows, preset=self.preset, header=self.header(wall), fig2=fig.name if has_fig2 else None,
                             failures=self.failures, timing=self.timing(records), polyu_split=self._polyu,
                             fig2_stats=next((r.get("fig2") for r in records if r["kind"] == "fig2"), None),
                             probe_stats=probe_summary(records))  # fmt: skip
        paths["md"] = self.out.with_name(self.out.name + ".md")
        paths["md"].write_text(md)
        if has_fig2:
            paths["fig2"] = fig
        self._log_summary(paths)
        return paths

    def _log_summary(self, paths: dict[str, Path]) -> None:
        """The outputs as artifacts of one MLflow run ("summary") in the same experiment."""
        try:
            from rcl_dist.tracking import RunTracker

            tr = RunTracker.start(self.tracking_uri, self.experiment, f"{self.preset.name}-summary", self.preset.as_dict(),
                                  tags={"fidelity.preset": self.preset.name, "fidelity.cell": "summary"})  # fmt: skip
            with tr:
                for p in paths.values():
                    tr.log_artifact_file(p, subdir="fidelity")
        except Exception as e:  # noqa: BLE001 - the files are written; MLflow is a copy
            self.log(f"[fidelity] could not log the summary run: {type(e).__name__}: {e}")


def _numbers(d: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------------------- CLI


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["pretrain_steps=50", "seeds=[0, 1]"]`` -> preset field overrides, type-checked against the defaults."""
    import yaml

    fields = {f.name: f for f in dataclasses.fields(Preset)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields or key == "name":
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(set(fields) - {'name'})}")
        value = yaml.safe_load(text)
        current = getattr(PRESETS["cpu"], key)
        if key == "eval_limit":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SystemExit(f"--set eval_limit: expected a positive integer or null, got {text!r}")
        elif key in ("pretrained_lr", "grad_clip"):
            try:
                value = None if value is None else float(value)  # YAML 1.1 reads "2e-4" as a string
            except (TypeError, ValueError):
                raise SystemExit(f"--set {key}: expected a number or null, got {text!r}") from None
        elif key == "global_residual":
            if value is not None and not isinstance(value, bool):
                raise SystemExit(f"--set global_residual: expected true, false or null (the auto rule), got {text!r}")
        elif isinstance(current, tuple):
            value = tuple(value if isinstance(value, list) else [value])
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise SystemExit(f"--set {key}: expected true/false, got {text!r}")
        elif isinstance(current, float) and isinstance(value, int):
            value = float(value)
        elif current is not None and not isinstance(value, type(current)):
            raise SystemExit(f"--set {key}: expected {type(current).__name__}, got {text!r}")
        out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True, help="output stem: writes <out>.md/.json/.parquet/_fig2.png, scratch in <out>_work/")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default rcl-fidelity-<preset>)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the local store in $RCL_DIST_HOME)")
    ap.add_argument("--data-root", default=None, help="the shared data folder (default: rcl_dist's shared_data_dir())")
    ap.add_argument("--finetune-engine", choices=("local", "ray"), default=None, help="override the preset's")
    ap.add_argument("--workers", type=int, default=None, help="override the preset's Ray Train workers")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override any preset field (YAML value, e.g. pretrain_steps=50, seeds=[0,1]); "
                         "a changed preset has its own cache fingerprint")  # fmt: skip
    ap.add_argument("--only", action="append", default=[], help="run only cells whose key contains this (repeatable)")
    ap.add_argument("--only-key", action="append", default=[], metavar="KEY",
                    help="run only the cell with exactly this key (repeatable; with --only: either matches)")
    ap.add_argument("--pretrain-from", default=None, metavar="OUT",
                    help="take the pre-trainings of another output stem (made with --pretrain-from-set) instead of "
                         "running them again; its preset may differ in fine-tuning fields only")  # fmt: skip
    ap.add_argument("--pretrain-from-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="the --set overrides that output was made with (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the cache state, run nothing")
    ap.add_argument("--report-only", action="store_true", help="write the outputs from the cache, run nothing")
    ap.add_argument("--note", default=None, help="a line for the report's Run section (e.g. where the cells ran)")
    args = ap.parse_args(argv)

    preset = PRESETS[args.preset]
    changes = {}
    if args.finetune_engine:
        changes["finetune_engine"] = args.finetune_engine
    if args.workers:
        changes["workers"] = args.workers
    changes.update(parse_sets(args.set))
    if changes:
        preset = dataclasses.replace(preset, **changes)
    plan = build_plan(preset)
    h = Harness(preset, args.out, experiment=args.experiment, tracking_uri=args.tracking_uri, data_root=args.data_root,
                argv=[sys.argv[0], *(argv if argv is not None else sys.argv[1:])])  # fmt: skip
    h.drop_outdated(plan)
    if args.dry_run:
        kinds: dict[str, int] = {}
        for c in plan:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
            done = "cached" if h.cache.get(c.key) else "todo"
            print(f"{done:6s} {c.kind:8s} {c.key}  (source {c.source}, {c.mode}, {c.steps} steps)")
        print(f"{len(plan)} cells: {kinds}; {sum(1 for c in plan if h.cache.get(c.key))} cached, {h.cache.stale} stale records")
        return 0
    h.note = args.note
    if args.report_only:
        paths = h.write_outputs(plan, 0.0)
        h.log(f"[fidelity] report from {sum(1 for c in plan if h.cache.get(c.key))} cached cells: "
              + ", ".join(str(p) for p in paths.values()))  # fmt: skip
        return 0
    if args.pretrain_from:
        other = dataclasses.replace(PRESETS[args.preset], **parse_sets(args.pretrain_from_set))
        taken = h.import_pretrainings(args.pretrain_from, other)
        h.log(f"[fidelity] {len(taken)} pre-training(s) taken from {args.pretrain_from}: {', '.join(taken) or 'none'}")
        h.drop_outdated(plan)
    h.prepare_environment()
    if h.cache.stale:
        h.log(f"[fidelity] {h.cache.stale} cached record(s) from another preset fingerprint are ignored")
    t0 = time.perf_counter()
    try:
        h.run(plan, args.only, args.only_key)
    finally:
        paths = h.write_outputs(plan, time.perf_counter() - t0)
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    h.log(f"[fidelity] {len(h.ran)} cells run, {len(h.skipped)} cached, {len(h.failures)} failed in "
          f"{time.perf_counter() - t0:.0f} s; outputs: {', '.join(str(p) for p in paths.values())}")  # fmt: skip
    return 1 if h.failures else 0


if __name__ == "__main__":
    sys.exit(main())
