"""The report's section on how each recipe was tuned (a launch with --lr-search): every trial, the chosen
rate and its margin over the next, a warning when the best rate sits at the edge of the grid, where the
splits came from, and search.png (validation score against learning rate, one line per recipe).

Built from `<launch>/search.json` (recipe_runner/search/run.py writes it); absent for a plain launch.
"""

from __future__ import annotations

import math
from pathlib import Path

from src.utils.files import read_json


def search_of(launch_dir: Path) -> dict | None:
    """search.json with, per recipe, the chosen trial's margin and whether it lies on the grid's edge."""
    search = read_json(launch_dir / "search.json")
    if not isinstance(search, dict) or not search.get("trials"):
        return None
    verdicts = {}
    for recipe, grid in search.get("grids", {}).items():
        trials = [t for t in search["trials"] if t["recipe"] == recipe]
        verdicts[recipe] = _verdict(trials, search.get("chosen", {}).get(recipe), search["metric"], len(grid))
    return {**search, "verdicts": verdicts}


def _verdict(trials: list[dict], chosen: float | None, metric: str, points: int) -> dict:
    """The chosen rate, its margin over the best other trial at the last rung both were scored at, and
    whether it is the lowest or highest rate tried (then a better one may lie outside the grid)."""
    if chosen is None:
        return {"chosen": None, "margin": None, "edge": None, "runner_up": None}
    rates = sorted(t["learning_rate"] for t in trials)
    best = next(t for t in trials if t["learning_rate"] == chosen)
    others = [t for t in trials if t is not best and t["val_scores"]]
    margin, runner_up = None, None
    if others:
        step = max(int(s) for t in others for s in t["val_scores"])
        scored = [t for t in others if str(step) in t["val_scores"]]
        # The rung rule's order: the higher score, then the lower validation loss.
        rival = max(scored, key=lambda t: (t["val_scores"][str(step)], -_loss(t)))
        margin = best["val_scores"][str(step)] - rival["val_scores"][str(step)]
        runner_up = {"learning_rate": rival["learning_rate"], "steps": step}
    edge = None
    if points > 1 and chosen == rates[0]:
        edge = "lowest"
    elif points > 1 and chosen == rates[-1]:
        edge = "highest"
    return {"chosen": chosen, "margin": margin, "edge": edge, "runner_up": runner_up, "metric": metric}


def _loss(trial: dict) -> float:
    loss = trial.get("val_loss")
    return math.inf if loss is None else float(loss)


def _early_rung_lines(search: dict, metric: str) -> list[str]:
    """A warning per chain whose rungs come before its last stage: the choice there saw only its first
    stage(s), which the metric may not tell apart (r3's frozen LLM names nothing new: every rate ties)."""
    lines = []
    for key, start in search.get("last_stage_from", {}).items():
        early = [step for step in search["rungs"].get(key, []) if step <= start]
        if early:
            steps = ", ".join(str(step) for step in early)
            lines += [
                "",
                f"**Note:** `{key}`'s rung(s) at step {steps} come before its last stage begins (after "
                f"step {start}): trials were kept or dropped there on what the earlier stage(s) did, where "
                f"{metric} may tie for every rate and the validation loss decides; --halving 1 (every rate "
                "to the full budget) judges them all on the last stage.",
            ]
    return lines


def search_lines(search: dict, splits: dict | None) -> list[str]:
    """The Markdown section: how tuned, the trials table, one sentence per recipe on its choice."""
    metric = search["metric"]
    lines = ["", "## How each recipe was tuned", ""]
    lines.append(
        f"Each recipe trained at every rate of its grid and was scored by `{metric}` on the validation "
        f"split; by successive halving (halving {search['halving']}) the best of each rung went on from its "
        "checkpoint, until one reached the full budget. The test split above was read only by those chosen "
        "runs, once. Every recipe had the same number of trials and the same budget. A recipe's wall time "
        "and GPU-hours above are its chosen run's (every rung of it, and its test scoring); what each whole "
        "search took is below."
    )
    lines += _split_lines(splits)
    if chains := search.get("chains"):
        named = ", ".join(f"`{key}`" for key in chains)
        lines += [
            "",
            f"{named}: a chain's stages keep their own rates' ratio; each trial scales all of them by one "
            "factor, and the rate shown is the chain's own (reference) rate times that factor.",
        ]
        lines += _early_rung_lines(search, metric)
    lines += [
        "",
        "| recipe | learning rate | rung reached | steps | validation " + metric + " | validation loss "
        "| status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for trial in sorted(search["trials"], key=lambda t: (t["recipe"], t["learning_rate"])):
        picked = search.get("chosen", {}).get(trial["recipe"]) == trial["learning_rate"]
        name = f"**{trial['learning_rate']:.3g}** (chosen)" if picked else f"{trial['learning_rate']:.3g}"
        lines.append(
            f"| `{trial['recipe']}` | {name} | {trial['rung']} | {trial['steps']} | "
            f"{_num(trial['val_metric'])} | {_num(trial['val_loss'], 4)} | "
            f"{trial['status']}{': ' + trial['error'] if trial.get('error') else ''} |"
        )
    lines.append("")
    hours = search.get("device_hours", {})
    for recipe, verdict in search.get("verdicts", {}).items():
        cost = f" Its search took {hours[recipe]:.3f} device-hours." if recipe in hours else ""
        lines.append(f"- {choice_sentence(recipe, verdict)}{cost}")
    return lines


def choice_sentence(recipe: str, verdict: dict) -> str:
    if verdict["chosen"] is None:
        return f"`{recipe}`: every trial failed; no rate was chosen (see the table)."
    text = f"`{recipe}`: learning rate {verdict['chosen']:.3g}"
    if verdict["margin"] is not None:
        rival = verdict["runner_up"]
        text += (
            f", {verdict['margin']:+.3f} {verdict['metric']} over the next best "
            f"({rival['learning_rate']:.3g}) at {rival['steps']} steps"
        )
    if verdict["edge"]:
        text += (
            f". **It is the {verdict['edge']} rate of the grid: a better one may lie beyond it; widen the "
            "grid** (--lr-grid)"
        )
    return text + "."


def _split_lines(splits: dict | None) -> list[str]:
    if not splits:
        return []
    lines = ["", "| split | images | how it was made |", "| --- | --- | --- |"]
    for name in ("train", "validation", "test"):
        if name in splits:
            lines.append(f"| {name} | {splits[name]['images']} | {splits[name]['how']} |")
    return lines


def _num(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def plot_search(search: dict, out: Path) -> Path | None:
    """search.png: each recipe's validation score against learning rate (log scale) at the furthest rung
    each trial reached, the chosen rate marked."""
    scored = [t for t in search["trials"] if t["val_metric"] is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for recipe in search.get("grids", {}):
        points = sorted(
            (t["learning_rate"], t["val_metric"], t["steps"]) for t in scored if t["recipe"] == recipe
        )
        if not points:
            continue
        line = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=recipe)[0]
        chosen = search.get("chosen", {}).get(recipe)
        if chosen is not None:
            value = next(p[1] for p in points if p[0] == chosen)
            axis.plot([chosen], [value], marker="*", markersize=16, color=line.get_color())
    axis.set_xscale("log")
    axis.set_xlabel("learning rate (a chain: its reference rate)")
    axis.set_ylabel(f"validation {search['metric']} (at the last rung each reached)")
    axis.set_title("Learning-rate search: the chosen rate starred")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
