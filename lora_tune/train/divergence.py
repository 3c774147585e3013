"""Divergence: a training that has clearly failed is stopped at an evaluation instead of running
all its planned steps (the study records it as pruned with reason ``diverged``).

Judged at each evaluation once ``diverged_after`` (a share of the planned optimizer steps) is done;
a training has diverged when

* its training loss since the last evaluation is above ``diverged_loss_ratio`` times its starting
  loss (the mean over its first steps, where the adapter still is the base), or
* at least half of the planned steps are done, the task's ``accuracy`` is within
  ``diverged_chance_margin`` of predicting the majority class (``Task.majority_accuracy``) *and*
  its training loss has not fallen below 0.95 times its start, nor below 0.95 times the loss of
  predicting the label frequencies (``Task.prior_loss``; a model that learned only the prior of
  skewed labels, 0.90-0.95 of a uniform start on TREC, CR and MPQA, has learned nothing from its
  input). A slow learner whose loss falls past both is left alone, whatever its accuracy so far;
  a short training is given half its steps to learn.

A non-finite loss is a divergence at once, at the step it appears. ``diverged_after: null``
turns the check off (a non-finite loss then fails the trial, as a ``NonFiniteLossError``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

START_STEPS = 0.05  # the starting loss: the mean over this share of the planned steps (at least one)
LEARNING = 0.95  # a loss below this share of its start is learning, whatever the accuracy
CHANCE_AFTER = 0.5  # "nothing learned" (the majority class) is judged from this share of the planned steps


@dataclass
class DivergenceCheck:
    """The thresholds (``TrainConfig.diverged_*``) and what a run has shown so far."""

    after: float | None
    loss_ratio: float
    chance_margin: float
    planned: int
    majority: float | None = None  # the eval set's majority-class accuracy, when the task knows it
    prior_loss: float | None = None  # the loss of predicting the label frequencies, when the task knows it
    _start: list[float] = field(default_factory=list)

    @property
    def start_steps(self) -> int:
        return max(1, math.ceil(START_STEPS * self.planned))

    def step(self, loss: float) -> None:
        """Note an optimizer step's loss (the first steps make the starting loss)."""
        if len(self._start) < self.start_steps:
            self._start.append(loss)

    def verdict(self, step: int, recent_loss: float, metrics: Mapping[str, float]) -> str | None:
        """Why the run has diverged at this evaluation after ``step`` steps, or None."""
        if self.after is None or not self._start or step < self.after * self.planned or step >= self.planned:
            return None  # before the warm-up share, or after the last step (stopping saves nothing)
        start = sum(self._start) / len(self._start)
        if recent_loss > self.loss_ratio * start:
            return (f"training loss {recent_loss:.4g} at step {step} is above {self.loss_ratio:g} x its start "
                    f"{start:.4g}")
        accuracy = metrics.get("accuracy")
        floor = min(start, self.prior_loss) if self.prior_loss is not None else start
        if (self.majority is not None and accuracy is not None and step >= CHANCE_AFTER * self.planned
                and accuracy <= self.majority + self.chance_margin and recent_loss >= LEARNING * floor):
            fallen = f"{start:.4g}" + (f" or the label prior's {self.prior_loss:.4g}" if floor < start else "")
            return (f"accuracy {accuracy:.4g} at step {step} is at the majority class's {self.majority:.4g} "
                    f"and the training loss {recent_loss:.4g} has not fallen from {fallen}")
        return None


def non_finite(step: int, value: float) -> str:
    """The reason of a run stopped by a non-finite loss."""
    return f"training loss {value} at step {step}"
