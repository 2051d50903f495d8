"""Runs a recipe's stages in order: builds each stage's losses and sources, saves and restores the run's state,
collects the results.

Everything that can be checked is checked before the first step: that every stage can have the sources its
losses read (a teacher; a reference, which on the first stage needs a student that starts from weights), and the
taps on every model they tap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kdcli import distributed
from kdcli.errors import KdcliError
from kdcli.models import taps
from kdcli.training import sources
from kdcli.training.cache import OutputCache
from kdcli.training.engine import (
    EpochRecord, EpochSums, Listener, NotFinite, Position, StagePlan, StageRunner, Term, TrainingData,
)
from kdcli.training.methods import REGISTRY, STUDENT, merge_needs
from kdcli.training.recipe import Recipe, Stage
from kdcli.training.sources import Models, Source
from kdcli.training.trainstate import (
    join_tensors, load_module, module_tensors, restore_rng, restoring, rng_tensors, split_tensors, write_checkpoint,
)

__all__ = ["Checkpoint", "Models", "StageOutcome", "build_terms", "check_plan", "restore_models", "run_stages",
           "stage_plan"]


@dataclass
class StageOutcome:
    name: str
    epochs: int
    anchor: str
    history: list[EpochRecord]

    @property
    def val_top1(self) -> float:
        return self.history[-1].val_top1

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.history)


def build_terms(stage: Stage) -> list[Term]:
    """One term per loss of the stage (the anchor shorthand expanded); a method listed twice gets numbered names."""
    specs = stage.loss_specs()
    counts = Counter(spec.method for spec in specs)
    seen: Counter = Counter()
    terms = []
    for spec in specs:
        seen[spec.method] += 1
        name = spec.method if counts[spec.method] == 1 else f"{spec.method}#{seen[spec.method]}"
        terms.append(Term(name, spec.weight, REGISTRY[spec.method](spec)))
    return terms


def check_plan(recipe: Recipe, models: Models) -> list[list[Term]]:
    """Validate every stage against the models and set its methods up; returns the terms of each stage."""
    all_terms = []
    for index, stage in enumerate(recipe.stages):
        terms = build_terms(stage)
        try:
            readers: dict[str, list[str]] = {}
            for term in terms:
                for name in term.method.needs():
                    if name != STUDENT:
                        readers.setdefault(name, []).append(term.name)
            sources.check(index, readers, models)
            _setup_methods(terms, models)
        except KdcliError as err:
            raise KdcliError(f"recipe stage {index} ('{stage.name}'): {err}") from None
        all_terms.append(terms)
    return all_terms


def _setup_methods(terms: list[Term], models: Models) -> None:
    """Resolve the taps on every model read (unknown taps fail here) and give methods their feature shapes."""
    needs = merge_needs(term.method.needs() for term in terms)
    shapes = {
        name: taps.shapes(models.student if name == STUDENT else sources.network(name, models), reads.taps,
                          models.image_size, name)
        for name, reads in needs.items() if reads.taps
    }
    for term in terms:
        term.method.setup(shapes)


def stage_plan(recipe: Recipe, index: int, terms: list[Term], models: Models) -> StagePlan:
    """A stage ready to run: its terms and the sources they read, made now (the reference is the student now)."""
    stage = recipe.stages[index]
    needs = merge_needs(term.method.needs() for term in terms)
    return StagePlan(
        index=index, name=stage.name, epochs=stage.epochs, student=models.student, terms=terms,
        sources=sources.build(index, [name for name in needs if name != STUDENT], models),
        optimizer=stage.optimizer, schedule=stage.schedule, stages=len(recipe.stages),
    )


@dataclass
class Checkpoint:
    """Where to save training state, what identifies the run, and what a saved state restores."""

    path: Path
    fingerprint: dict
    stop_requested: object = lambda: False  # () -> bool
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # of the checkpoint resumed from
    state: dict | None = None

    @property
    def resuming(self) -> bool:
        return self.state is not None


def _source_prefix(name: str) -> str:
    return f"source.{name}."


class _Saver:
    """The stage loop's Control: writes the whole run's state at a position."""

    def __init__(self, checkpoint: Checkpoint, models: Models, all_terms: list[list[Term]],
                 done: list[StageOutcome], history: list[EpochRecord], stage_sources: dict[str, Source]):
        self.checkpoint, self.models, self.all_terms = checkpoint, models, all_terms
        self.done, self.history, self.sources = done, history, stage_sources

    def stop_requested(self) -> bool:
        return self.checkpoint.stop_requested()

    def save(self, runner: StageRunner, position: Position, sums: EpochSums | None) -> None:
        if not distributed.is_writer():  # every process holds the same state; rank 0 writes it
            return
        tensors = {**module_tensors("student", self.models.student), **rng_tensors()}
        for name, source in self.sources.items():
            tensors.update({_source_prefix(name) + key: value for key, value in source.state().items()})
        for index, terms in enumerate(self.all_terms):
            for term in terms:
                tensors.update(module_tensors(f"method.{index}.{term.name}", term.method))
        state = {
            "fingerprint": self.checkpoint.fingerprint,
            "world_size": distributed.world_size(),  # positions count global batches: any count resumes it
            "position": asdict(position),
            "done": [{"name": o.name, "epochs": o.epochs, "anchor": o.anchor,
                      "history": [asdict(r) for r in o.history]} for o in self.done],
            "history": [asdict(r) for r in self.history],
            "sums": asdict(sums) if sums else None,
            "runner": split_tensors(runner.state(), "runner", tensors),
        }
        write_checkpoint(self.checkpoint.path, tensors, state)


def restore_models(checkpoint: Checkpoint, models: Models, all_terms: list[list[Term]]) -> None:
    """Put the student, every method's parameters and the RNG back as they were saved."""
    load_module(models.student, "student", checkpoint.tensors)
    for index, terms in enumerate(all_terms):
        for term in terms:
            load_module(term.method, f"method.{index}.{term.name}", checkpoint.tensors)
    restore_rng(checkpoint.tensors)


def _not_finite_line(err: NotFinite, checkpoint: Path) -> str:
    kept = f"; the last good checkpoint is kept in {checkpoint}" if checkpoint.is_file() else ""
    return f"{err.what}{kept}; {err.advice}"


def run_stages(
    recipe: Recipe,
    all_terms: list[list[Term]],
    models: Models,
    data: TrainingData,
    device: torch.device,
    listener: Listener,
    checkpoint: Checkpoint,
    cache: OutputCache | None = None,
) -> list[StageOutcome]:
    """Train the student through every stage (terms from check_plan), saving a checkpoint after every epoch.
    Resumes where a checkpoint left off. With a cache, frozen sources' outputs are stored per view and looked
    up (computed when a stage starts, once its sources are as they will stay)."""
    state = checkpoint.state
    start = Position(**state["position"]) if state else Position(0)
    done = [StageOutcome(o["name"], o["epochs"], o["anchor"], [EpochRecord(**r) for r in o["history"]])
            for o in state["done"]] if state else []
    for index in range(start.stage, len(recipe.stages)):
        stage, terms = recipe.stages[index], all_terms[index]
        resumed = state is not None and index == start.stage
        history = [EpochRecord(**r) for r in state["history"]] if resumed else []
        if not resumed or start.epoch < stage.epochs:
            for term in terms:
                term.method.to(device)
            plan = stage_plan(recipe, index, terms, models)
            runner = StageRunner(plan, data, device, listener)
            sums = None
            if resumed:
                with restoring(checkpoint.path):
                    for name, source in plan.sources.items():
                        prefix = _source_prefix(name)
                        source.load_state({k[len(prefix):]: v for k, v in checkpoint.tensors.items()
                                           if k.startswith(prefix)})
                    runner.load_state(join_tensors(state["runner"], checkpoint.tensors))
                sums = EpochSums(**state["sums"]) if state["sums"] else None
            if cache is not None:
                plan.sources = cache.wrap(plan.sources, plan.needs())
            saver = _Saver(checkpoint, models, all_terms, done, history, plan.sources)
            try:
                runner.run(start if resumed else Position(index), sums, history, saver)
            except NotFinite as err:
                raise KdcliError(_not_finite_line(err, checkpoint.path)) from None
        done.append(StageOutcome(stage.name, stage.epochs, stage.anchor_weighting(), history))
    return done
