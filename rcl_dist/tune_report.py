"""What a sweep returns and the report written from it (``rcl-dist sweep --report PREFIX``): :class:`SweepResult`,
the trial table in Markdown, the checkout's commit, :func:`write_report`. The sweep itself: :mod:`rcl_dist.tune`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcl_dist.tune_space import SweepSpace

__all__ = ["SweepResult", "trial_markdown", "git_commit", "write_report"]


@dataclass
class SweepResult:
    """One sweep session's outcome: the trial table, the best and default rows, the parent run, the summary."""

    name: str
    path: str  # the Tune experiment folder
    table: list[dict[str, Any]]  # one row per trial (see rcl_dist.tune._trial_rows)
    best: dict[str, Any] | None  # the best row
    best_config_path: str | None
    default: dict[str, Any] | None  # the default-config row (include_default)
    parent_run_id: str | None
    tracking_uri: str | None
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


def trial_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The trial rows as a Markdown table of ``columns`` (floats to 4 digits, None as empty)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    """The checkout's short commit, with '+' when the working tree has uncommitted changes."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+" if dirty else "")


def write_report(result: SweepResult, space: SweepSpace, prefix: str | os.PathLike, command: Sequence[str]) -> Path:
    """``PREFIX.md`` (command, commit, machine, wall time, summary, trial table), ``PREFIX.csv``,
    ``.parquet``, ``.json``, ``.png`` and ``PREFIX_best_config.yaml``, copied from the sweep folder."""
    import platform
    import shlex
    import shutil

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    exp = Path(result.path)
    for src, suffix in (("trials.csv", ".csv"), ("trials.parquet", ".parquet"), ("objective.png", ".png"),
                        ("best_config.yaml", "_best_config.yaml")):  # fmt: skip
        if (exp / src).is_file():
            shutil.copyfile(exp / src, prefix.with_name(prefix.name + suffix))
    commit = result.summary.get("code_commit") or git_commit()
    machine = f"{platform.node()}: {platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    s, m = result.summary, space.metric
    lines = [
        f"# Sweep `{space.name}` ({space.source})", "",
        f"- command: `{shlex.join(command)}`",
        f"- code: commit {commit} (at the sweep's start; '+' = uncommitted changes); machine: {machine}",
        f"- wall time (this session of the sweep): {result.seconds / 60:.1f} min",
        f"- trials: {s.get('trials')} ({s.get('finished')} finished, {s.get('stopped')} stopped early by "
        f"{space.scheduler['type'].upper()}, {s.get('failed')} failed); {space.rounds} rounds of {space.steps_per_round} "
        f"pre-training steps, search {space.search_alg['type']}, {space.concurrency} at a time",
        f"- objective: {m} of proxy denoising on {space.objective.get('val_images', 8)} whole images of the "
        f"manifest's '{space.objective.get('val_split', 'val')}' split (fresh last layer, "
        + (f"{space.objective.get('steps', 150)} Adam steps" if space.objective.get("fit") == "adam"
           else f"fit {space.objective.get('fit', 'lstsq+l1')}")
        + f" on {space.objective.get('labels', 64)} labelled crops)",
    ]  # fmt: skip
    if "best_value" in s:
        lines.append(f"- best: trial {s['best_trial']}, {m} {s['best_value']:.3f} after {s['best_rounds']} rounds, "
                     f"params {json.dumps(s['best_params'])}")  # fmt: skip
    if "default_value" in s:
        lines.append(f"- default config: {m} {s['default_value']:.3f} after {s['default_rounds']} rounds ({s['default_status']})")
        if "best_minus_default_final" in s:
            lines.append(f"- best - default: {s['best_minus_default_final']:+.3f} dB (each at its last round)"
                         + (f", {s['best_minus_default_same_round']:+.3f} dB at the default's last round"
                            if "best_minus_default_same_round" in s else ""))  # fmt: skip
    columns = ["trial", "status", "rounds", m, f"{m}_per_round", *[p.key for p in space.params], "default", "error"]
    lines += ["", "## Trials (best first)", "", trial_markdown(result.table, columns), "",
              f"![objective against each parameter]({prefix.name}.png)", ""]  # fmt: skip
    md = prefix.with_name(prefix.name + ".md")
    md.write_text("\n".join(lines))
    prefix.with_name(prefix.name + ".json").write_text(
        json.dumps({"summary": s, "trials": result.table, "command": list(command), "commit": commit, "machine": machine,
                    "seconds": result.seconds}, indent=2, default=str)  # fmt: skip
    )
    return md
