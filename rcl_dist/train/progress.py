"""One progress bar per phase on the driver, fed by rank 0 of a Ray Train job.

Ray Train V2 runs its callbacks in the controller actor, not in the driver, so the driver cannot see
a report as it happens. Instead the driver starts a small actor (:class:`ProgressBoard`, no CPU) and
hands its handle to the workers in the loop config; rank 0 posts each log step to it
(fire-and-forget, so a worker never waits on the console), and a thread of the driver polls it and
redraws a tqdm bar: step / total, the loss terms, samples/s and tqdm's ETA. At the end the bar is
closed and one summary line is printed.

Where the bar is drawn: ``RCL_DIST_PROGRESS=bar`` always, ``lines`` never (each log step is then one
line printed by rank 0, as before: right for log files and CI), ``auto`` (the default) when the
driver's stderr is a terminal and ``-v`` was not given. With the bar, the workers print no progress
lines (they would tear it apart); warnings and errors still pass.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

__all__ = ["PROGRESS_ENV", "progress_mode", "driver_progress", "post_progress", "format_fields"]

PROGRESS_ENV = "RCL_DIST_PROGRESS"
_MODES = ("auto", "bar", "lines")

# the metrics shown in the bar and in the summary line, in this order, with their short names
_FIELDS = (
    ("loss", "loss"),
    ("contrast", "contrast"),
    ("consistency", "consistency"),
    ("samples_per_s", "samples/s"),
    ("data_wait_fraction", "data wait"),
    ("val_psnr", "val PSNR"),
    ("label_l1", "label L1"),
)


def progress_mode(stream: TextIO | None = None) -> str:
    """``"bar"`` or ``"lines"``: what this driver shows (``RCL_DIST_PROGRESS``; ``auto`` by terminal)."""
    from rcl_dist.console import verbose

    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{PROGRESS_ENV} must be one of {_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if (isatty is not None and isatty() and not verbose()) else "lines"


def format_fields(metrics: dict[str, float]) -> str:
    """``loss 0.12  contrast 3.4  ...``: the known metrics present in ``metrics``, in a fixed order."""
    parts = []
    for key, name in _FIELDS:
        if key not in metrics:
            continue
        v = float(metrics[key])
        parts.append(f"{name} {100 * v:.0f}%" if key == "data_wait_fraction" else
                     f"{name} {v:.1f}" if key == "samples_per_s" else f"{name} {v:.4g}")  # fmt: skip
    return "  ".join(parts)


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """The newest post of rank 0: (step, total, metrics); a counter tells the reader what is new."""

        def __init__(self) -> None:
            self.latest: tuple[int, int, int, dict[str, float]] | None = None
            self.posts = 0

        def post(self, step: int, total: int, metrics: dict[str, float]) -> None:
            self.posts += 1
            self.latest = (self.posts, int(step), int(total), dict(metrics))

        def read(self):
            return self.latest

    return ProgressBoard


def post_progress(board: Any, step: int, total: int, metrics: dict[str, float]) -> None:
    """Rank 0: hand one log step to the driver's board (no wait; a board that has gone is ignored)."""
    if board is None:
        return
    keep = {k: float(v) for k, v in metrics.items() if k in dict(_FIELDS) and isinstance(v, (int, float))}
    try:
        board.post.remote(step, total, keep)
    except Exception:  # the driver went away: training goes on without a console
        pass


@contextmanager
def driver_progress(
    desc: str, total: int, *, initial: int = 0, mode: str | None = None, file: TextIO | None = None,
    log: Callable[[str], None] | None = None, poll_s: float = 0.5,
) -> Iterator[Any]:  # fmt: skip
    """Around ``trainer.fit()``: yields the board handle to put in the loop config (None in ``lines``
    mode: the workers then print their lines). The bar starts at ``initial`` (a resumed run) and ends
    with one summary line through ``log`` (default: printed to the bar's stream)."""
    mode = mode or progress_mode(file)
    if mode != "bar":
        yield None
        return
    import ray
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    board = _board_class().remote()
    # a terminal that reports no size (a bare pty) would get a bar of width 0: take 120 columns then
    width = shutil.get_terminal_size((0, 0)).columns or 120
    bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=stream, ncols=width, leave=True,
               mininterval=0.2, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")  # fmt: skip
    stop = threading.Event()
    seen = {"posts": 0, "metrics": {}}
    t0 = time.perf_counter()

    def refresh() -> None:
        try:
            latest = ray.get(board.read.remote(), timeout=10)
        except Exception:
            return
        if latest is None or latest[0] == seen["posts"]:
            return
        seen["posts"], step, _, metrics = latest[0], latest[1], latest[2], latest[3]
        seen["metrics"] = metrics
        bar.set_postfix_str(format_fields(metrics), refresh=False)
        bar.update(max(0, step - bar.n))

    def poll() -> None:
        while not stop.wait(poll_s):
            refresh()

    thread = threading.Thread(target=poll, name="rcl-dist-progress", daemon=True)
    thread.start()
    ok = False
    try:
        yield board
        ok = True
    finally:
        stop.set()
        thread.join(timeout=15)
        refresh()  # the last post, which may have come after the thread's last poll
        bar.close()
        try:
            ray.kill(board)
        except Exception:
            pass
        fields = format_fields(seen["metrics"])
        line = (f"{desc}: {'done' if ok else 'stopped'} at step {bar.n}/{total} in {time.perf_counter() - t0:.0f} s"
                + (f"  ({fields})" if fields else ""))  # fmt: skip
        if log is not None:
            log(line)
        else:
            print(line, file=stream, flush=True)
