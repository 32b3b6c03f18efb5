"""benchmarks/fidelity.py: the presets are valid, the rows have the documented keys, the results cache
makes a rerun skip finished cells, and one pretrain -> proxy fine-tune -> evaluate cell runs on the real
engines (Ray Train + DALI pre-training, Ray Train fine-tuning, MLflow) on tiny images."""

from __future__ import annotations

import re

import dataclasses
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_fidelity():
    spec = importlib.util.spec_from_file_location("fidelity_harness", REPO / "benchmarks" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fidelity_harness"] = mod
    spec.loader.exec_module(mod)
    return mod


fid = _load_fidelity()


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(fid.PRESETS))
@pytest.mark.parametrize("engine", ["local", "ray"])
def test_every_config_loads_and_every_spec_constructs(name, engine):
    from rcl_dist.config import Config, global_residual_of
    from rcl_dist.train.finetune_spec import FinetuneSpec

    p = dataclasses.replace(fid.PRESETS[name], finetune_engine=engine)
    plan = fid.build_plan(p)
    keys = {c.key for c in plan}
    assert len(keys) == len(plan)
    kinds = {c.kind for c in plan}
    assert kinds == {"pretrain", "finetune", "zero", "gaussian", "fig2", "classical"}
    for c in plan:
        assert c.source is None or c.source in keys, c.key  # every dependency is in the plan
        if c.kind == "pretrain":
            cfg = fid.pretrain_config(p, c, "m.parquet", experiment="e", run_name="r")
            assert isinstance(cfg, Config)
            assert (cfg.model.width, cfg.model.depth, cfg.data.crop) == (p.width, p.depth, p.crop)
            assert (cfg.train.batch_size, cfg.train.steps, cfg.train.seed) == (p.batch_size, p.pretrain_steps, c.seed)
            assert cfg.dist.workers == p.workers and cfg.dist.use_gpu == p.use_gpu
            assert cfg.model.raw == ("packed" if c.method == "RCL-EMD (RAW)" else None)
            assert cfg.model.global_residual == p.global_residual and cfg.train.schedule == p.schedule
            # the row's label is the network that is built: the auto rule per method
            assert global_residual_of(cfg) == fid.resolved_global_residual(p, c), c.key
            assert global_residual_of(cfg) == (c.method in ("N2N", "Nb2Nb", "Oracle", "Oracle (Gaussian)",
                                                            "Nb2Nb (real)", "Nb2Nb (real, xcam)")), c.key  # fmt: skip
            if c.method in fid.REAL_PRETRAINED + fid.XCAM_PRETRAINED:  # real photographs: nothing simulated, nothing stored
                assert c.manifest == ("real_noisy" if c.method in fid.REAL_PRETRAINED else "xcam_noisy")
                assert cfg.data.noise == "none" and cfg.data.realisation == "fresh"
            else:  # one data regime for every method: stored realisations (N2N: a second one, same parameters)
                assert cfg.data.realisation == p.realisation == "fixed" and cfg.data.noise == "simulated"
            assert cfg.loss.b2u_grid == p.b2u_grid
        elif c.kind == "finetune":
            source = "none" if c.source is None else "/nowhere/state.pt"
            spec = fid.finetune_spec(p, c, source, "m.parquet", experiment="e")
            assert isinstance(spec, FinetuneSpec)
            assert spec.crop == p.crop and spec.seed == c.seed and spec.labels == c.labels
            assert spec.workers == (p.workers if engine == "ray" else 1)
            assert spec.fit == p.proxy_fit
            if source == "none":
                assert Config.from_dict(spec.config).model.width == p.width
                # trained whole on labels (SL from scratch, task Oracles): a supervised network, the input
                # skip; a frozen random body under a proxy: the RCL config's direct-prediction twin
                assert global_residual_of(Config.from_dict(spec.config)) == (c.mode == "full"), c.key
                assert fid.resolved_global_residual(p, c) == (c.mode == "full"), c.key
            assert c.evals, c.key
        for dataset, *_ in c.evals:  # part of MLflow metric names: alphanumerics, _ - . space : / only
            assert re.fullmatch(r"[\w\-. :/]+", f"eval.{c.task}.{dataset}.psnr_mean"), dataset
    # the matrix the issue asks for
    first = p.seeds[0]
    for method in ("RCL-EMD", "N2N", "N2S", "Nb2Nb", fid.RANDOM_INIT, "Oracle"):
        for s in p.seeds:
            assert fid.cell_key(method, s, "denoise", p.proxy_labels) in keys
    for method in ("RCL-BD", "RCL-MMD", "Consistency", "B2U"):
        assert fid.cell_key(method, first, "denoise", p.proxy_labels) in keys
    for task in ("sr", "jdensr"):
        assert fid.cell_key(fid.SL_DEN, first, task, p.proxy_labels) in keys
        assert fid.cell_key("RCL-EMD", first, task, p.proxy_labels) in keys
    assert fid.cell_key("RCL-EMD", first, "jdd", p.proxy_labels) in keys
    assert fid.cell_key("RCL-EMD", first, "real", p.proxy_labels) in keys
    for n in (10, 100, 1000):
        assert fid.cell_key(fid.RCL_SL, first, "denoise", n) in keys and fid.cell_key(fid.SL_SCRATCH, first, "denoise", n) in keys
    assert fid.cell_key(fid.RCL_ZERO, first, "denoise", 0) in keys
    for s in p.seeds:  # the Oracle with its own last layer beside its proxy
        assert fid.cell_key(fid.ORACLE_OWN, s, "denoise", 0) in keys
    for m in fid.REAL_PRETRAINED:  # the real-noise study: proxy and full on 10 / 100 real pairs' crops
        for n in fid.REAL_LABELS:
            assert fid.cell_key(m, first, "real", n) in keys and fid.cell_key(f"{m} + SL", first, "real", n) in keys
            assert fid.cell_key(fid.SL_SCRATCH, first, "real", n) in keys
    by_key = {c.key: c for c in plan}
    for m in fid.XCAM_PRETRAINED:  # the same across cameras: trained on some camera models, tested on the others
        for n in fid.REAL_LABELS:
            for row in (m, f"{m} + SL", fid.SL_SCRATCH_XCAM):
                cell = by_key[fid.cell_key(row, first, "real", n)]
                assert cell.manifest == "xcam" and cell.evals == fid.XCAM_EVALS and cell.study.startswith("xcam-")
    for cname in fid.CLASSICAL:  # the untrained floor on the denoising and real-noise sets
        for task in ("denoise", "real"):
            assert fid.cell_key(cname, first, task, 0) in keys
        assert by_key[fid.cell_key(f"{cname} (xcam)", first, "real", 0)].evals == fid.XCAM_EVALS
    gauss = next(c for c in plan if c.kind == "gaussian")  # the blind Gaussian Oracle, all CBSD68 images
    assert gauss.all_images and gauss.source == fid.cell_key(fid.ORACLE_GAUSS, first, "pretrain", 0)
    gsrc = next(c for c in plan if c.key == gauss.source)
    gcfg = fid.pretrain_config(p, gsrc, "m.parquet")
    assert gsrc.manifest == "gaussian" and gcfg.data.sampler == "gaussian" and gcfg.loss.method == "supervised"
    assert gcfg.data.sigma_max == pytest.approx(p.gaussian_sigma_max / 255.0)
    if name != "smoke":
        assert len(p.seeds) >= 3


def test_gpu_preset_has_the_paper_settings():
    p = fid.PRESETS["gpu"]
    assert (p.crop, p.batch_size, p.width, p.depth, p.use_gpu) == (128, 64, 32, 4, True)
    cfg = fid.pretrain_config(p, fid.build_plan(p)[0], "m.parquet")
    assert cfg.dist.use_gpu and cfg.loss.alpha == 1e-3 and cfg.train.lr == 1e-3


def test_preset_overrides_from_the_command_line():
    got = fid.parse_sets(["pretrain_steps=50", "seeds=[0, 1]", "label_seeds=0", "eval_limit=null", "use_gpu=false", "lr=1"])
    assert got == {"pretrain_steps": 50, "seeds": (0, 1), "label_seeds": (0,), "eval_limit": None, "use_gpu": False, "lr": 1.0}
    p = dataclasses.replace(fid.PRESETS["gpu"], **got)
    assert p.fingerprint() != fid.PRESETS["gpu"].fingerprint()  # its own cache
    assert fid.parse_sets(["global_residual=true"]) == {"global_residual": True}
    assert fid.parse_sets(["global_residual=null"]) == {"global_residual": None}
    for bad in (["pretrain_steps=abc"], ["nope=1"], ["use_gpu=1"], ["global_residual=banana"]):
        with pytest.raises(SystemExit):
            fid.parse_sets(bad)
    with pytest.raises(ValueError, match="finetune_engine"):
        dataclasses.replace(fid.PRESETS["cpu"], finetune_engine="mpi")


def test_lp_ft_and_the_pretrained_rate_reach_full_cells_only_and_keep_old_fingerprints():
    got = fid.parse_sets(["probe_first=true", "pretrained_lr=2e-4"])
    assert got == {"probe_first": True, "pretrained_lr": 2e-4}
    cpu = fid.PRESETS["cpu"]
    d = {k: v for k, v in cpu.as_dict().items() if k not in ("probe_first", "pretrained_lr", "augment", "grad_clip", "sr_skip", "real_seeds")}
    assert cpu.fingerprint() == fid.hashlib.sha256(fid.json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
    p = dataclasses.replace(cpu, **got)
    assert p.fingerprint() != cpu.fingerprint()
    by_key = {c.key: c for c in fid.build_plan(p)}
    full = fid.finetune_spec(p, by_key[fid.cell_key(fid.RCL_SL, 0, "denoise", 10)], "/nowhere/state.pt", "m.parquet", experiment="e")
    scratch = fid.finetune_spec(p, by_key[fid.cell_key(fid.SL_SCRATCH, 0, "denoise", 10)], "none", "m.parquet", experiment="e")
    proxy = fid.finetune_spec(p, by_key[fid.cell_key("RCL-EMD", 0, "denoise", p.proxy_labels)], "/nowhere/state.pt", "m.parquet", experiment="e")
    assert (full.probe_first, full.lr) == (True, 2e-4)  # a pre-trained source: the lower rate
    assert (scratch.probe_first, scratch.lr) == (True, p.lr)  # from scratch: the preset's rate
    assert not proxy.probe_first
    assert full.grad_clip is None and scratch.grad_clip is None  # the harness's records before clipping existed
    clipped = dataclasses.replace(p, **fid.parse_sets(["grad_clip=1"]))
    assert clipped.fingerprint() != p.fingerprint() and clipped.grad_clip == 1.0
    assert fid.finetune_spec(clipped, by_key[fid.cell_key(fid.SL_SCRATCH, 0, "denoise", 10)], "none", "m.parquet",
                             experiment="e").grad_clip == 1.0  # fmt: skip
    with pytest.raises(ValueError, match="pretrained_lr"):
        dataclasses.replace(cpu, pretrained_lr=2.0)


def test_real_seeds_add_cells_without_touching_the_fingerprint():
    """real_seeds: every real / cross-camera cell (and its pre-training) once per seed; seed 0's keys and
    the cache fingerprint unchanged, so the cells already run stay cached."""
    cpu = fid.PRESETS["cpu"]
    p = dataclasses.replace(cpu, **fid.parse_sets(["real_seeds=[0, 1, 2]"]))
    assert p.real_seeds == (0, 1, 2) and p.fingerprint() == cpu.fingerprint()
    before, after = {c.key for c in fid.build_plan(cpu)}, {c.key: c for c in fid.build_plan(p)}
    assert before <= set(after)
    added = set(after) - before
    studies = {after[k].study for k in added}
    assert studies == {"pretrain", "real-proxy", "real-full", "xcam-proxy", "xcam-full"}
    for seed in (1, 2):
        assert fid.cell_key("Nb2Nb (real, xcam)", seed, "pretrain", 0) in added
        cell = after[fid.cell_key("Nb2Nb (real, xcam)", seed, "real", 10)]
        assert cell.source == fid.cell_key("Nb2Nb (real, xcam)", seed, "pretrain", 0)
        assert fid.cell_key(fid.SL_SCRATCH_XCAM, seed, "real", 100) in added
    assert not any(k.startswith("RCL-EMD|1|") for k in added)  # the simulated-noise rows keep their seeds


def test_label_seeds_add_cells_and_keep_the_fingerprint_records_were_made_under():
    """label_seeds only adds label-efficiency cells; fingerprints held it before that was seen, so they keep
    the preset's built-in value: setting it leaves every cached record current (the clipped 1000-label cell)."""
    cpu = fid.PRESETS["cpu"]
    p = dataclasses.replace(cpu, **fid.parse_sets(["label_seeds=[0, 1, 2]", "grad_clip=1.0"]))
    assert p.fingerprint() == dataclasses.replace(cpu, grad_clip=1.0).fingerprint() != cpu.fingerprint()
    d = {k: v for k, v in cpu.as_dict().items() if k not in fid._LATER_FIELDS and k != "real_seeds"}
    assert cpu.fingerprint() == fid.hashlib.sha256(fid.json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
    added = {c.key for c in fid.build_plan(p)} - {c.key for c in fid.build_plan(cpu)}
    assert added == {fid.cell_key(m, s, "denoise", n) for s in (1, 2) for n in cpu.label_counts
                     for m in (fid.RCL_SL, fid.SL_SCRATCH)} | {fid.cell_key(fid.RCL_ZERO, s, "denoise", 0) for s in (1, 2)}


def test_sr_skip_reaches_sr_cells_and_is_a_later_field():
    cpu = fid.PRESETS["cpu"]
    assert cpu.sr_skip == "none"  # the SR head of every record made before the option
    p = dataclasses.replace(cpu, **fid.parse_sets(["sr_skip=bicubic"]))
    assert p.fingerprint() != cpu.fingerprint()
    by_key = {c.key: c for c in fid.build_plan(p)}
    for key in (fid.cell_key("N2N", 0, "sr", p.proxy_labels), fid.cell_key("Oracle", 0, "sr", p.oracle_labels)):
        assert fid.finetune_spec(p, by_key[key], "/nowhere/state.pt", "m.parquet", experiment="e").sr_skip == "bicubic"
    assert fid.finetune_spec(cpu, by_key[key], "/nowhere/state.pt", "m.parquet", experiment="e").sr_skip == "none"
    with pytest.raises(ValueError, match="sr_skip"):
        dataclasses.replace(cpu, sr_skip="lanczos")


def test_label_augmentation_reaches_full_cells_and_is_a_later_field():
    cpu = fid.PRESETS["cpu"]
    assert cpu.augment == "none"  # the behaviour of every record made before the option
    p = dataclasses.replace(cpu, **fid.parse_sets(["augment=auto"]))
    assert p.fingerprint() != cpu.fingerprint()
    by_key = {c.key: c for c in fid.build_plan(p)}
    full = fid.finetune_spec(p, by_key[fid.cell_key(fid.SL_SCRATCH, 0, "denoise", 10)], "none", "m.parquet", experiment="e")
    assert full.augment == "auto"
    with pytest.raises(ValueError, match="augment"):
        dataclasses.replace(cpu, augment="flips")


def test_cross_camera_split_is_by_camera_model(tmp_path):
    src = tmp_path / "data" / fid.POLYU
    src.mkdir(parents=True)
    names = ["Canon5D2_a_1", "Canon80D_b_2", "NikonD800_c_3", "Sony_d_4", "Canon600D_e_5"]
    for n in names:
        for half in ("real", "mean"):
            (src / f"{n}_{half}.JPG").write_bytes(b"x")
    h = fid.Harness(fid.PRESETS["smoke"], tmp_path / "out" / "f", data_root=tmp_path / "data", log=lambda *_: None)
    train, test = h.polyu_xcam_dirs()
    assert sorted(p.name for p in test.iterdir()) == sorted(f"{n}_{x}.JPG" for n in names[2:4] for x in ("real", "mean"))
    assert sorted(p.name for p in train.iterdir()) == sorted(f"{n}_{x}.JPG" for n in names if not n.startswith(("Nikon", "Sony"))
                                                            for x in ("real", "mean"))  # fmt: skip
    assert h.folder("@polyu_xcam_test") == test


# ----------------------------------------------------------------------------- rows and reports


def _record(method, seed, task, labels, psnr, study="proxy", datasets=("CBSD68", "Kodak24"), sigma=None):
    return {
        "key": fid.cell_key(method, seed, task, labels), "kind": "finetune", "method": method, "seed": seed,
        "task": task, "labels": labels, "study": study, "seconds": 1.0,
        "results": [
            {"dataset": d, "task": task, "sigma": sigma, "n": 2, "psnr_mean": psnr + i, "psnr_std": 0.5,
             "ssim_mean": 0.5 + 0.1 * seed, "psnr_input_mean": 20.0, "ssim_input_mean": 0.4, "skipped": 0}
            for i, d in enumerate(datasets)
        ],
    }  # fmt: skip


def test_rows_have_the_documented_keys_and_seed_statistics(tmp_path):
    records = [
        _record("RCL-EMD", 0, "denoise", 8, 30.0),
        _record("RCL-EMD", 1, "denoise", 8, 31.0),
        _record("RCL-EMD", 2, "denoise", 8, 32.0),
        _record("N2N", 0, "denoise", 8, 29.0),
        _record(fid.ORACLE_GAUSS, 0, "gaussian", 0, 25.0, study="context", datasets=("CBSD68",), sigma=25.0),
        _record(fid.RCL_ZERO, 0, "denoise", 0, 22.0, study="label-efficiency"),
    ]
    rows = fid.rows_from_records(records)
    assert all(set(fid.ROW_KEYS) <= set(r) for r in rows)
    rcl = next(r for r in rows if r["method"] == "RCL-EMD" and r["dataset"] == "CBSD68")
    assert rcl["psnr_mean"] == pytest.approx(31.0) and rcl["psnr_std"] == pytest.approx(1.0)  # over seeds, ddof=1
    assert rcl["seeds"] == 3 and rcl["labels"] == 8 and rcl["seed_list"] == "0,1,2"
    assert rcl["ssim_mean"] == pytest.approx(0.6)
    n2n = next(r for r in rows if r["method"] == "N2N" and r["dataset"] == "CBSD68")
    assert n2n["seeds"] == 1 and n2n["psnr_std"] is None
    paths = fid.write_rows(rows, tmp_path / "fidelity_x")
    data = json.loads(paths["json"].read_text())
    assert isinstance(data, list) and len(data) == len(rows)
    for row in data:
        assert list(row)[: len(fid.ROW_KEYS)] == list(fid.ROW_KEYS)
    import pyarrow.parquet as pq

    table = pq.read_table(paths["parquet"])
    assert set(fid.ROW_KEYS) <= set(table.column_names) and table.num_rows == len(rows)
    md = fid.markdown_report(rows, preset=fid.PRESETS["smoke"], header={"command": "x"}, fig2="f.png", failures=[],
                             timing={}, polyu_split={"train": ["a"], "test": ["b"]})  # fmt: skip
    assert "meaningless" in md and "31.00 ± 1.00 / 0.6000" in md and "![Fig. 2](f.png)" in md
    assert "Table 3 analogue" in md and "| 0 |" in md and "sigma 25" in md


# ----------------------------------------------------------------------------- the results cache


def _parses(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _fake_harness(tmp_path, preset, calls):
    h = fid.Harness(preset, tmp_path / "fidelity_t", log=lambda *_: None)

    def fake(kind):
        def run(cell):
            calls.append(cell.key)
            if cell.source is not None:  # sources run first and are in the cache
                assert h.cache.get(cell.source) is not None
            ckpt = tmp_path / "ckpts" / f"{len(calls)}.pt"
            ckpt.parent.mkdir(exist_ok=True)
            ckpt.write_text("x")
            res = [{"dataset": d, "task": t, "sigma": s, "n": 1, "psnr_mean": 20.0, "ssim_mean": 0.5,
                    "psnr_input_mean": 10.0, "ssim_input_mean": 0.1} for d, _, t, s in cell.evals]  # fmt: skip
            return {"checkpoint": str(ckpt), "results": res}

        return run

    h.executors = {k: fake(k) for k in h.executors}
    return h


def test_resume_cache_skips_finished_cells(tmp_path):
    p = fid.PRESETS["smoke"]
    plan = fid.build_plan(p)
    calls: list[str] = []
    h = _fake_harness(tmp_path, p, calls)
    h.run(plan, only=["RCL-EMD|0|denoise"])
    assert calls == ["RCL-EMD|0|pretrain|0", f"RCL-EMD|0|denoise|{p.proxy_labels}"]  # the source first
    h.run(plan)
    assert len(calls) == len(plan) and len(set(calls)) == len(plan)  # every cell once, nothing twice
    lines = (h.work / "cache.jsonl").read_text().splitlines()
    assert len(lines) == len(plan)

    exact: list[str] = []
    _fake_harness(tmp_path / "exact", p, exact).run(plan, only_keys=["N2S|0|pretrain|0"])
    assert exact == ["N2S|0|pretrain|0"]  # exactly that cell (a substring would also match others)
    with pytest.raises(SystemExit, match="no such cell"):
        _fake_harness(tmp_path / "exact", p, []).run(plan, only_keys=["N2S|9|pretrain|0"])

    again: list[str] = []
    h2 = _fake_harness(tmp_path, p, again)
    h2.run(plan)
    assert again == [] and len(h2.skipped) == len(plan)

    # a torn last line and a deleted line: only the missing cell runs again
    gone = f"N2S|0|sr|{p.proxy_labels}"
    kept = [ln for ln in lines if json.loads(ln)["key"] != gone]
    (h.work / "cache.jsonl").write_text("\n".join(kept) + '\n{"key": "torn')
    third: list[str] = []
    _fake_harness(tmp_path, p, third).run(plan)
    assert third == [gone]

    # a missing checkpoint of a source re-runs the source for a cell that still needs it
    rec = json.loads(next(ln for ln in lines if json.loads(ln)["key"] == "N2S|0|pretrain|0"))
    Path(rec["checkpoint"]).unlink()
    kept = [ln for ln in (h.work / "cache.jsonl").read_text().splitlines() if _parses(ln) and f'"key": "{gone}"' not in ln]
    assert len(kept) == len(plan) - 1  # the record written after the torn line is on a line of its own
    (h.work / "cache.jsonl").write_text("\n".join(kept) + "\n")
    fourth: list[str] = []
    _fake_harness(tmp_path, p, fourth).run(plan)
    assert fourth == ["N2S|0|pretrain|0", gone]

    # another preset fingerprint: nothing is reused
    other = dataclasses.replace(p, proxy_steps=p.proxy_steps + 1)
    fifth: list[str] = []
    h5 = _fake_harness(tmp_path, other, fifth)
    assert h5.cache.stale > 0 and h5.cache.get(plan[0].key) is None


def test_pretrainings_are_taken_from_an_output_whose_preset_differs_in_fine_tuning_only(tmp_path):
    """--pretrain-from: another output's pre-trainings (their checkpoints on disk) count as this preset's
    when only fine-tuning fields differ; the fine-tuning cells still run; other differences refuse."""
    p = fid.PRESETS["smoke"]
    plan = fid.build_plan(p)
    first: list[str] = []
    h1 = _fake_harness(tmp_path / "a", p, first)
    (tmp_path / "a").mkdir()
    h1.run(plan, only=["RCL-EMD|0|denoise"])
    assert first == ["RCL-EMD|0|pretrain|0", f"RCL-EMD|0|denoise|{p.proxy_labels}"]

    q = dataclasses.replace(p, augment="auto", probe_first=True)
    second: list[str] = []
    h2 = _fake_harness(tmp_path / "b", q, second)
    (tmp_path / "b").mkdir()
    assert h2.import_pretrainings(tmp_path / "a" / "fidelity_t", p) == ["RCL-EMD|0|pretrain|0"]
    h2.run(fid.build_plan(q), only=["RCL-EMD|0|denoise"])
    assert second == [f"RCL-EMD|0|denoise|{p.proxy_labels}"]  # the pre-training was not run again
    assert "imported_from" in h2.cache.get("RCL-EMD|0|pretrain|0")
    with pytest.raises(SystemExit, match="pretrain_steps"):
        h2.import_pretrainings(tmp_path / "a" / "fidelity_t", dataclasses.replace(p, pretrain_steps=5))
    # a record of another fingerprint (the preset stated wrongly) is not taken
    h3 = _fake_harness(tmp_path / "c", q, [])
    assert h3.import_pretrainings(tmp_path / "a" / "fidelity_t", dataclasses.replace(p, proxy_steps=99)) == []


def test_a_failing_cell_is_reported_and_the_rest_runs(tmp_path):
    p = fid.PRESETS["smoke"]
    plan = fid.build_plan(p)
    calls: list[str] = []
    h = _fake_harness(tmp_path, p, calls)
    ok = h.executors["pretrain"]

    attempts: list[str] = []

    def broken(cell):
        if cell.method == "N2N":
            attempts.append(cell.key)
            raise RuntimeError("boom")
        return ok(cell)

    h.executors["pretrain"] = broken
    h.run(plan)
    failed = {f["key"] for f in h.failures}
    assert "N2N|0|pretrain|0" in failed and f"N2N|0|denoise|{p.proxy_labels}" in failed and f"N2N|0|sr|{p.proxy_labels}" in failed
    assert attempts == ["N2N|0|pretrain|0"]  # tried once, not again for every cell that needs it
    assert h.cache.get(f"N2S|0|denoise|{p.proxy_labels}") is not None


# ----------------------------------------------------------------------------- micro end to end


def _tiny_data(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)

    def img(h, w):
        import torch

        coarse = torch.from_numpy(rng.uniform(0.15, 0.85, size=(1, 3, 5, 5)).astype(np.float32))
        x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0]
        return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    for sub, n in (("train/CBSD432", 4), ("test/CBSD68", 2), ("test/Kodak24", 2), ("test/McMaster", 2)):
        d = root / sub
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(img(40, 48)).save(d / f"im{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_micro_pretrain_proxy_finetune_evaluate_on_the_real_engines(tmp_path, monkeypatch):
    """One RCL-EMD pre-training (Ray Train, 2 workers, DALI) -> proxy fine-tuning (Ray Train, 2 workers)
    -> evaluation of the denoise sets, 2 tiny images each; both runs in MLflow; a rerun runs nothing."""
    ray = pytest.importorskip("ray")
    from mlflow import MlflowClient

    _tiny_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # relative --out and --data-root, as on the command line (Ray workers run elsewhere)
    data = Path("data")
    monkeypatch.setenv("RCL_DIST_HOME", str(tmp_path / "home"))
    preset = dataclasses.replace(
        fid.PRESETS["smoke"], width=4, depth=2, crop=16, batch_size=4, pretrain_steps=2, proxy_steps=2, proxy_labels=4,
        eval_limit=2, workers=2, finetune_engine="ray", log_every=1,
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    h = fid.Harness(preset, Path("out") / "fidelity_micro", tracking_uri=uri, data_root=data, log=lambda *_: None)
    h.prepare_environment()
    assert os.environ["RCL_DIST_HOME"] == str(tmp_path / "home")  # kept when set
    plan = fid.build_plan(preset)
    key = fid.cell_key("RCL-EMD", 0, "denoise", 4)
    was_running = ray.is_initialized()
    try:
        h.run(plan, only=[key])
        assert h.failures == []
        assert h.ran == ["RCL-EMD|0|pretrain|0", key]
        rec = h.cache.get(key)
        assert [r["dataset"] for r in rec["results"]] == ["CBSD68", "Kodak24", "McMaster"]
        for r in rec["results"]:
            assert r["n"] == 2 and math.isfinite(r["psnr_mean"]) and 0 < r["ssim_mean"] <= 1
        assert Path(rec["checkpoint"]).is_file()

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("rcl-fidelity-smoke")
        runs = {r.data.tags.get("fidelity.cell"): r for r in client.search_runs([exp.experiment_id])}
        assert {"RCL-EMD|0|pretrain|0", key} <= set(runs)
        assert runs[key].data.tags["pretrain_checkpoint"] == h.cache.get("RCL-EMD|0|pretrain|0")["checkpoint"]
        assert "eval.denoise.CBSD68.psnr_mean" in runs[key].data.metrics

        paths = h.write_outputs(plan, 1.0)
        rows = json.loads(paths["json"].read_text())
        assert {(r["method"], r["dataset"]) for r in rows} == {("RCL-EMD", d) for d in ("CBSD68", "Kodak24", "McMaster")}
        assert "commit" in paths["md"].read_text()

        h2 = fid.Harness(preset, Path("out") / "fidelity_micro", tracking_uri=uri, data_root=data, log=lambda *_: None)
        h2.run(plan, only=[key])
        assert h2.ran == [] and h2.skipped == [key]
    finally:
        if not was_running and ray.is_initialized():
            ray.shutdown()


def test_calibrated_rcl_is_the_committed_sweep_winner():
    """The preset's "RCL-EMD (calibrated)" pre-trains with the joint sweep's best config (issue 12, item 7):
    its alpha, tau and overlap, and the cpu preset's crop and batch, are those of the committed file."""
    import yaml

    best = yaml.safe_load((REPO / "benchmarks/results/sweep_rcl_joint_cpu_best_config.yaml").read_text())
    p = fid.PRESETS["cpu"]
    cell = next(c for c in fid.build_plan(p) if c.kind == "pretrain" and c.method == fid.RCL_CAL)
    cfg = fid.pretrain_config(p, cell, "m.parquet", experiment="e", run_name="r")
    assert cfg.loss.method == best["loss"]["method"] and cfg.loss.distance == best["loss"]["distance"]
    assert cfg.loss.alpha == best["loss"]["alpha"] and cfg.loss.temperature == best["loss"]["temperature"]
    assert cfg.loss.temperature_scale == best["loss"]["temperature_scale"] == "fixed"
    assert cfg.data.overlap == best["data"]["overlap"]
    assert (cfg.data.crop, cfg.train.batch_size) == (best["data"]["crop"], best["train"]["batch_size"])
    # the paper-literal row stays the paper's alpha and tau
    paper = next(c for c in fid.build_plan(p) if c.kind == "pretrain" and c.method == "RCL-EMD")
    pcfg = fid.pretrain_config(p, paper, "m.parquet", experiment="e", run_name="r")
    assert (pcfg.loss.alpha, pcfg.loss.temperature) == (1e-3, 0.1)
    assert fid.RCL_CAL in fid.MULTI_SEED and "Consistency" in fid.MULTI_SEED


def test_cells_cached_under_another_skip_rule_are_dropped_and_run_again(tmp_path):
    """A record whose ``global_residual`` is not what the product's auto rule builds today (the rule
    changed after it ran: N2S lost the input skip) leaves the report and runs again, with the cells
    fine-tuned from it; the rest stays cached."""
    p = fid.PRESETS["smoke"]
    plan = fid.build_plan(p)
    calls: list[str] = []
    h = _fake_harness(tmp_path, p, calls)
    h.run(plan, only=["|0|denoise|"])
    path = h.work / "cache.jsonl"
    n2s = {"N2S|0|pretrain|0", f"N2S|0|denoise|{p.proxy_labels}"}
    lines = []
    for ln in path.read_text().splitlines():
        rec = json.loads(ln)
        if rec["key"] in n2s:
            assert rec["global_residual"] is False  # as the rule builds it now
            rec["global_residual"] = True  # as it was built before the rule changed
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    again: list[str] = []
    h2 = _fake_harness(tmp_path, p, again)
    assert sorted(h2.drop_outdated(plan)) == sorted(n2s)
    assert all(h2.cache.get(k) is None for k in n2s) and h2.cache.get("N2N|0|pretrain|0") is not None
    by_key = {c.key: c for c in plan}
    old_name = h._run_name(by_key["N2S|0|pretrain|0"])
    # the rerun never resumes the old run's folder (a Ray checkpoint of the other network)
    assert h2._run_name(by_key["N2S|0|pretrain|0"]) == old_name + "-direct"
    assert h2._run_name(by_key["N2N|0|pretrain|0"]) == h._run_name(by_key["N2N|0|pretrain|0"])
    h2.run(plan, only=["|0|denoise|"])
    assert again == ["N2S|0|pretrain|0", f"N2S|0|denoise|{p.proxy_labels}"]
    assert fid.Harness(p, tmp_path / "fidelity_t", log=lambda *_: None).drop_outdated(plan) == []
