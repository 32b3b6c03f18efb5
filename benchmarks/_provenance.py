"""Where a benchmark's numbers came from: the commit (and whether the tree had uncommitted changes)
and how busy the machine was, for the header of its results file."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str:
    """Short HEAD, with " (with uncommitted changes)" when tracked files differ from it; "unknown" without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return out + (" (with uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def load_average() -> float:
    """The 1-minute load average (NaN where /proc/loadavg is unreadable): a timing taken above ~0.5 on
    this 2-core machine shared its cores."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
