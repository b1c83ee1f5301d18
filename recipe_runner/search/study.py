"""The learning-rate search's record: one Optuna study per recipe in `<launch>/search.db` (SQLite), so that a
crash or Ctrl-C loses nothing and `recipe-run resume` goes on where the search stopped.

Optuna is the bookkeeping only: trials with a fixed learning rate (enqueued, then asked), their validation
score reported at each rung (`trial.report(metric, step)`), their state told at the end: COMPLETE for the
one that reached the full budget, PRUNED for those the rung rule (rungs.py) stopped, FAIL for a trial whose
job failed. No pruner or sampler decides anything. Each trial keeps, as user attributes, its recipe, its
job name, the validation loss of each rung and the rung it reached.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STUDY_FILE = "search.db"
PARAM = "learning_rate"


class SearchMismatch(ValueError):
    """The launch's study was made with other settings than the ones asked now."""


@dataclass(frozen=True)
class Trial:
    """One trial as the search reads it back: which recipe, at which rate, how far it got."""

    recipe: str
    number: int  # its index in the recipe's grid (the study's trial number)
    learning_rate: float
    state: str  # "running" (still in the search), "pruned", "complete", "failed"
    scores: dict[int, float]  # rung step -> validation metric
    val_losses: dict[int, float | None]
    error: str | None = None

    @property
    def name(self) -> str:
        return trial_name(self.recipe, self.number)

    @property
    def reached(self) -> int:
        """The last rung step it was scored at (0: none)."""
        return max(self.scores, default=0)


def trial_name(recipe: str, number: int) -> str:
    """The job of trial `number` of `recipe`: its output folder and log name."""
    return f"{recipe}-lr{number}"


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines in the launch
    warnings.filterwarnings("ignore", module="optuna")  # a rung reported again on resume is ignored
    return optuna


class SearchRecord:
    """The studies of one search (one a recipe), in `launch_dir/search.db`."""

    def __init__(self, launch_dir: Path) -> None:
        self.optuna = _optuna()
        self.url = f"sqlite:///{(launch_dir / STUDY_FILE).resolve()}"
        self.studies: dict[str, Any] = {}

    def open(self, recipe: str, grid: list[float], config: dict) -> None:
        """The recipe's study, with one trial a rate of `grid` (created once; reopened as it is)."""
        optuna = self.optuna
        study = optuna.create_study(
            study_name=recipe,
            storage=self.url,
            direction="maximize",
            load_if_exists=True,
            pruner=optuna.pruners.NopPruner(),
        )
        stored = study.user_attrs.get("config")
        if stored is None:
            study.set_user_attr("config", {**config, "grid": grid})
        elif stored != {**config, "grid": grid}:
            raise SearchMismatch(f"{recipe}: this launch's search was made with {stored}, not {config}")
        wanted = optuna.distributions.FloatDistribution(min(grid), max(grid), log=True)
        for rate in grid:
            study.enqueue_trial({PARAM: rate}, skip_if_exists=True)
        while any(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False)):
            trial = study.ask({PARAM: wanted})  # takes the next enqueued rate, as given
            trial.set_user_attr("recipe", recipe)
        self.studies[recipe] = study

    def trials(self, recipe: str) -> list[Trial]:
        study = self.studies[recipe]
        return [self._read(recipe, frozen) for frozen in study.get_trials(deepcopy=False)]

    def _read(self, recipe: str, frozen: Any) -> Trial:
        state = {"RUNNING": "running", "PRUNED": "pruned", "COMPLETE": "complete"}.get(
            frozen.state.name, "failed"
        )
        attrs = frozen.user_attrs
        losses = {int(k.split("@")[1]): v for k, v in attrs.items() if k.startswith("val_loss@")}
        scores = {int(step): float(value) for step, value in frozen.intermediate_values.items()}
        return Trial(recipe, frozen.number, frozen.params[PARAM], state, scores, losses, attrs.get("error"))

    def report(self, recipe: str, number: int, step: int, metric: float, val_loss: float | None) -> None:
        """The trial's validation score at the rung ending at `step` (its loss first: the tie-break)."""
        trial = self._handle(recipe, number)
        trial.set_user_attr(
            f"val_loss@{step}", None if val_loss is None or math.isnan(val_loss) else val_loss
        )
        trial.report(metric, step)

    def fail(self, recipe: str, number: int, why: str) -> None:
        self._handle(recipe, number).set_user_attr("error", why)
        self.studies[recipe].tell(number, state=self.optuna.trial.TrialState.FAIL, skip_if_finished=True)

    def prune(self, recipe: str, number: int) -> None:
        self.studies[recipe].tell(number, state=self.optuna.trial.TrialState.PRUNED, skip_if_finished=True)

    def complete(self, recipe: str, number: int, metric: float) -> None:
        self.studies[recipe].tell(number, metric, skip_if_finished=True)

    def _handle(self, recipe: str, number: int) -> Any:
        # A trial left running by an earlier (crashed) launcher is continued by its number: Optuna's Trial
        # over the stored trial id is the one handle that reports for it from a new process.
        study = self.studies[recipe]
        frozen = study.get_trials(deepcopy=False)[number]
        return self.optuna.Trial(study, frozen._trial_id)
