"""The learning-rate shape and the step budget, as plain functions of the step and the pace."""

from __future__ import annotations

import pytest

from lejepa.train.schedule import StepBudget, warmup_cosine


def test_warmup_rises_linearly_then_the_cosine_falls_to_its_floor() -> None:
    rates = [warmup_cosine(step, 100, 0.1, min_ratio=0.01) for step in range(101)]
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:-1], rates[11:], strict=True))
    assert rates[55] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down the cosine
    assert rates[100] == pytest.approx(0.01)


def test_a_timed_budget_plans_from_the_pace_after_the_first_step() -> None:
    budget = StepBudget(upper=10_000, seconds=100.0)
    budget.update(1, 5.0)  # the first step's start-up costs are left out of the pace
    assert budget.total == 10_000
    budget.update(3, 7.0)  # 1 s a step from here: 93 s left
    assert budget.total == 3 + 93


def test_a_resumed_timed_budget_plans_on_the_checkpoints_pace_until_it_measures_its_own() -> None:
    budget = StepBudget(upper=10_000, seconds=100.0)
    budget.resume_at(40, 80.0)  # 2 s a step so far: 20 s left
    assert budget.total == 40 + 10 and budget.due(41)
    budget.update(41, 85.0)  # start-up: not yet a pace
    assert budget.total == 50
    budget.update(43, 86.0)  # 0.5 s a step on this machine: 14 s left
    assert budget.total == 43 + 28


def test_a_resumed_budget_that_is_spent_ends_at_its_step_and_a_fixed_one_keeps_its_steps() -> None:
    spent = StepBudget(upper=10_000, seconds=100.0)
    spent.resume_at(60, 120.0)
    assert spent.total == 60
    fixed = StepBudget(upper=500, seconds=None)
    fixed.resume_at(40, 80.0)
    fixed.update(45, 90.0)
    assert fixed.total == 500 and not fixed.due(41)
