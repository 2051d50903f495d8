"""The cells of an ablation: recipes derived from one sequential recipe, all at the same total epochs.

From a base recipe of stages S1..Sn (smskd by default) and a budget of E epochs:

    alone         the student alone: cross-entropy only, E epochs (no teacher)
    kd            single stage: the first stage's losses for E epochs (plain KD for smskd)
    joint         single stage: the losses of every stage summed (each distinct loss once), no anchor
    multi-teacher the kd cell with every teacher, logits averaged (only when several teachers are given)
    seq-none      the stages in order, no anchor
    seq-fixed     the stages in order, each later stage anchored with a fixed λ
    seq-tcp       the stages in order, each later stage anchored with TCP weighting
    stages-k      k = 2..4 stages: the first k stages (k > n adds stages shaped like the last, with PKT as its
                  last loss); stages-1 is the kd cell and stages-n is the seq cell of the base's own weighting

Later stages keep the base's lengths (scaled to E); the first stage takes the rest of the budget. Every cell
keeps the base's optimizer, schedule, data settings and learning rates, so only what the cell names differs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from kdcli.errors import KdcliError
from kdcli.training.recipe import Recipe, validate_recipe

BASE_RECIPE = "smskd"  # what `kdcli ablate` takes apart unless --recipe names another sequential recipe
MAX_STAGES = 4
ANCHORED = ("none", "fixed", "tcp")
EXTRA_LOSS = {"method": "pkt", "tap": {"student": "penultimate", "teacher": "penultimate"}}


@dataclass(frozen=True)
class Cell:
    name: str  # folder name and row key
    label: str  # what it is, for people
    recipe: Recipe
    kind: str  # "train" (no teacher) or "distill"
    all_teachers: bool = False  # the multi-teacher cell distils from every teacher; the others from the first

    @property
    def schedule(self) -> str:
        return "+".join(str(stage.epochs) for stage in self.recipe.stages)


def stage_lengths(base: Recipe, epochs: int | None) -> list[int]:
    """The base's stage lengths scaled to `epochs` in total: later stages scaled and rounded (at least 1), the
    first takes the rest."""
    lengths = [stage.epochs for stage in base.stages]
    total = sum(lengths)
    if epochs is None or epochs == total:
        return lengths
    scaled = _scaled(lengths, epochs)
    if scaled is None:
        least = next(n for n in range(len(lengths), total + 1) if _scaled(lengths, n))
        raise KdcliError(f"--epochs {epochs} is too few for the {len(lengths)} stages of recipe '{base.name}' "
                         f"({'+'.join(map(str, lengths))}); pass --epochs {least} or more")
    return scaled


def _scaled(lengths: list[int], epochs: int) -> list[int] | None:
    later = [max(1, round(n * epochs / sum(lengths))) for n in lengths[1:]]
    first = epochs - sum(later)
    return [first, *later] if first >= 1 else None


def _plain(stage: dict) -> dict:
    """A stage without any anchor (block or loss)."""
    stage = copy.deepcopy(stage)
    stage["losses"] = [loss for loss in stage["losses"] if loss["method"] != "anchor"]
    stage["anchor"] = {"weighting": "none"}
    return stage


def _anchor_fields(raw: dict) -> dict:
    """The anchor settings the base uses (its first anchored stage), to vary only the weighting."""
    for stage in raw["stages"][1:]:
        if stage["anchor"]["weighting"] != "none":
            return dict(stage["anchor"])
        for loss in stage["losses"]:
            if loss["method"] == "anchor":
                return {k: v for k, v in loss.items() if k not in ("method", "weight")}
    return {"weighting": "tcp", "tcp": "true-class", "lambda": 1.0, "temperature": 4.0}


def _anchored(stage: dict, fields: dict, weighting: str) -> dict:
    stage = _plain(stage)
    stage["anchor"] = {**fields, "weighting": weighting}
    return stage


def _recipe(raw: dict, name: str, stages: list[dict], lengths: list[int], seed: int) -> Recipe:
    stages = [{**copy.deepcopy(stage), "epochs": n} for stage, n in zip(stages, lengths)]
    cell = {**copy.deepcopy(raw), "name": f"{raw['name']}:{name}", "seed": seed, "stages": stages,
            "description": f"ablation cell '{name}' of recipe '{raw['name']}'"}
    return validate_recipe(cell, f"ablation cell {name}")


def _extended(raw_stages: list[dict], count: int) -> list[dict]:
    """The first `count` stages; past the base's own, stages shaped like its last with PKT as the last loss."""
    stages = list(raw_stages[:count])
    last = raw_stages[-1]
    for extra in range(len(raw_stages), count):
        stage = copy.deepcopy(last)
        stage["name"] = f"pkt-{extra}"
        losses = stage["losses"]
        stage["losses"] = [*losses[:-1], dict(EXTRA_LOSS)] if len(losses) > 1 else [*losses, dict(EXTRA_LOSS)]
        stages.append(stage)
    return stages


def build_cells(base: Recipe, epochs: int | None, seed: int, teachers: int) -> list[Cell]:
    """The ablation's cells for one seed, in table order."""
    raw = base.to_dict()
    lengths = stage_lengths(base, epochs)
    total = sum(lengths)
    first = raw["stages"][0]
    later = lengths[1:] or [max(1, total // 4)]
    fields = _anchor_fields(raw)
    supervised = {"name": "supervised", "epochs": total, "losses": [{"method": "ce"}]}
    joint_losses = []
    for stage in raw["stages"]:
        for loss in _plain(stage)["losses"]:
            if loss not in joint_losses:
                joint_losses.append(loss)
    kd = _recipe(raw, "kd", [_plain(first)], [total], seed)
    cells = [
        Cell("alone", "student alone (cross-entropy)", _recipe(raw, "alone", [supervised], [total], seed), "train"),
        Cell("kd", "single-stage KD (the first stage's losses)", kd, "distill"),
        Cell("joint", "joint: every stage's losses in one stage",
             _recipe(raw, "joint", [{**_plain(first), "name": "joint", "losses": joint_losses}], [total], seed),
             "distill"),
    ]
    if teachers > 1:
        cells.append(Cell("multi-teacher", f"single-stage KD from {teachers} teachers, logits averaged", kd,
                          "distill", all_teachers=True))
    if len(raw["stages"]) > 1:
        for weighting in ANCHORED:
            stages = [_plain(first)] + [
                _plain(s) if weighting == "none" else _anchored(s, fields, weighting) for s in raw["stages"][1:]]
            what = {"none": "no anchor", "fixed": f"anchor, fixed λ {fields.get('lambda', 1.0):g}",
                    "tcp": f"anchor, TCP-weighted λ {fields.get('lambda', 1.0):g}"}[weighting]
            cells.append(Cell(f"seq-{weighting}", f"sequential, {what}",
                              _recipe(raw, f"seq-{weighting}", stages, lengths, seed), "distill"))
    own = base.stages[-1].anchor_weighting() if len(base.stages) > 1 else "tcp"
    for count in range(2, MAX_STAGES + 1):
        if count == len(raw["stages"]):
            continue  # the seq cell of the base's own weighting
        stages = _extended(raw["stages"], count)
        extra_lengths = (later + [later[-1]] * MAX_STAGES)[:count - 1]
        if total - sum(extra_lengths) < 1:
            continue  # the budget cannot hold this many stages
        stages = [_plain(stages[0])] + [
            _plain(s) if own == "none" else _anchored(s, fields, own) for s in stages[1:]]
        cells.append(Cell(f"stages-{count}", f"sequential, {count} stages ({own} anchor)",
                          _recipe(raw, f"stages-{count}", stages, [total - sum(extra_lengths), *extra_lengths],
                                  seed), "distill"))
    return cells


def stage_count_rows(cells: list[Cell], base: Recipe) -> dict[int, str]:
    """Which cell stands for k stages (k = 1..4): the kd cell, the seq cell of the base's weighting, stages-k."""
    names = {cell.name for cell in cells}
    own = base.stages[-1].anchor_weighting() if len(base.stages) > 1 else "tcp"
    rows = {1: "kd"}
    for count in range(2, MAX_STAGES + 1):
        name = f"seq-{own}" if count == len(base.stages) else f"stages-{count}"
        if name in names:
            rows[count] = name
    return rows
