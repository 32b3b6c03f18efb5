"""Learning-rate schedules of every trainer (pre-training, single-process training, fine-tuning).

``lr_factor(schedule, step, total, warmup)`` multiplies the base rate at optimiser step ``step``
(1-based) of ``total``:

* ``constant``: 1 (the paper's Adam at lr 1e-3, Sec. 4), after the warm-up;
* ``cosine``: 0.5 (1 + cos(pi t)) with t the fraction of the post-warm-up steps done, decaying to 0
  at the last step;
* warm-up (either schedule): a linear ramp step / warmup over the first ``warmup`` steps.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if warmup > 0 and step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0), span) / span
    return 0.5 * (1.0 + math.cos(math.pi * t))
