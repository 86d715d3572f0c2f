"""How long pretraining runs and at what rate: the step budget, and the warm-up + cosine learning-rate
shape that pretraining and the linear probe share."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float, min_ratio: float = 0.0) -> float:
    """LR multiplier at `step`: linear warm-up over the first steps, then a cosine down to `min_ratio`."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepBudget:
    """How many steps the run takes: fixed, or under `pretrain.time_budget_s` re-estimated from the pace.

    `update` gets the same numbers on every rank (the slowest rank's training seconds), so every rank
    computes the same total, the same learning rate and stops at the same step. A timed attempt re-plans
    after each of its first `EARLY_STEPS` steps (`due`), so its warm-up follows the real total from its fourth
    step on (a step's rate is set as the one before ends), not the `upper` bound it starts from. The first
    step, which carries one-off start-up costs, is left out of the pace. A resumed attempt starts from the
    checkpoint's pace, until it has measured its own.
    """

    EARLY_STEPS = 10

    def __init__(self, upper: int, seconds: float | None) -> None:
        self.total, self.upper, self.seconds = upper, upper, seconds
        self.since_step, self.since_s = 0, 0.0  # where this attempt's pace is measured from
        self.first_step = 1

    def resume_at(self, step: int, trained_s: float) -> None:
        """Plan on the checkpoint's pace, then measure the pace from here: a resumed attempt may run on
        another machine."""
        if self.seconds is not None and step > 0:
            self._plan(step, trained_s, trained_s / step)
        self.since_step, self.since_s, self.first_step = step, trained_s, step + 1

    def due(self, step: int) -> bool:
        """Whether `step` should re-plan even between logging steps: a timed attempt's first steps."""
        return self.seconds is not None and step < self.first_step + self.EARLY_STEPS

    def update(self, step: int, trained_s: float) -> None:
        if self.seconds is None or step <= self.since_step:
            return
        if step == self.first_step:  # start-up costs: measure the pace from the end of this step
            self.since_step, self.since_s = step, trained_s
            return
        self._plan(step, trained_s, (trained_s - self.since_s) / (step - self.since_step))

    def _plan(self, step: int, trained_s: float, pace: float) -> None:
        assert self.seconds is not None
        remaining = max(0.0, self.seconds - trained_s)
        self.total = min(self.upper, step + int(remaining / max(pace, 1e-9)))
