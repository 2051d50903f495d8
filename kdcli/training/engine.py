"""One stage's training loop. It knows methods and sources only through their interfaces: each step it runs the
student, asks every source the stage reads for its outputs on the same batch, and sums the methods' losses."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from kdcli import distributed
from kdcli.data import TrainView, epoch_batches, train_loader
from kdcli.errors import KdcliError
from kdcli.evaluation.metrics import predict, topk_accuracy
from kdcli.models import taps
from kdcli.training.methods import STUDENT, Method, Needs, Outputs, Reads, StepInputs, merge_needs
from kdcli.training.optim import OptimizerSettings, ScheduleSettings, make_optimizer, make_schedule
from kdcli.training.precision import MixedPrecision
from kdcli.training.sources import Batch, Source


@dataclass
class Term:
    """One weighted loss of a stage; `name` labels it in logs and reports (the method's, numbered if repeated)."""

    name: str
    weight: float
    method: Method


@dataclass
class StagePlan:
    """Everything one stage needs, assembled by the pipeline."""

    index: int
    name: str
    epochs: int
    student: nn.Module
    terms: list[Term]
    sources: dict[str, Source]  # by name, every source the terms read
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    stages: int = 1  # how many stages the run has (for progress: stage index+1 of stages)

    def needs(self) -> Needs:
        """What the stage's losses read, per model: the union of their needs."""
        return merge_needs(term.method.needs() for term in self.terms)

    def trained(self) -> list[nn.Module]:
        """What the optimizer updates: the student and the methods' own parameters (connectors)."""
        return [self.student, *(term.method for term in self.terms)]


@dataclass
class EpochRecord:
    stage: str
    epoch: int  # 1-based within the stage
    epochs: int
    train_loss: float
    terms: dict[str, float]
    val_top1: float
    lr: float  # the learning rate of the epoch's last step
    seconds: float
    images: int = 0  # training images of the epoch (those run in this process, after a mid-epoch resume)
    train_seconds: float = 0.0  # time of the training steps alone, without validation

    @property
    def images_per_s(self) -> float | None:
        """Training throughput of the epoch (forward and backward, every source included)."""
        return self.images / self.train_seconds if self.images and self.train_seconds > 0 else None


@dataclass
class EpochSums:
    """Running loss sums of the epoch in progress; carried across a mid-epoch resume."""

    terms: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Position:
    """Where training stands: the next step to run."""

    stage: int
    epoch: int = 0
    step: int = 0


@dataclass
class TrainingData:
    view: TrainView
    val_loader: torch.utils.data.DataLoader
    batch_size: int
    workers: int
    seed: int
    precision: str = "auto"  # --precision: training arithmetic (precision.py)
    channels_last: bool = False  # --channels-last: batches (and models, set by the caller) in NHWC layout


class Listener(Protocol):
    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None: ...
    def steps_done(self, steps: list[tuple[int, float]]) -> None: ...  # per step: its images, its total loss
    def epoch_done(self, record: EpochRecord) -> None: ...


class Control(Protocol):
    """How the stage loop saves its state and learns that it should stop."""

    def save(self, runner: StageRunner, position: Position, sums: EpochSums | None) -> None: ...
    def stop_requested(self) -> bool: ...


class StopRequested(Exception):
    """A stop signal arrived; the state at `position` was saved before this was raised."""

    def __init__(self, position: Position):
        super().__init__(f"stopped before stage {position.stage} epoch {position.epoch} step {position.step}")
        self.position = position


class NotFinite(KdcliError):
    """A step's loss is not finite: `what` went wrong, and `advice`. Whoever knows what was saved words the line."""

    def __init__(self, what: str, advice: str):
        super().__init__(f"{what}; {advice}")
        self.what, self.advice = what, advice


def step_inputs(plan: StagePlan, needs: Needs, batch: Batch) -> StepInputs:
    """The student's outputs and those of every source the stage reads, all on the same batch."""
    logits, features = taps.forward(plan.student, batch.images, needs.get(STUDENT, Reads()).taps, STUDENT)
    sources = {name: plan.sources[name].outputs(batch, reads) for name, reads in needs.items() if name != STUDENT}
    return StepInputs(Outputs(logits, features), batch.labels, sources, batch.epoch)


def loss_terms(plan: StagePlan, inputs: StepInputs) -> dict[str, torch.Tensor]:
    """Every weighted loss term of the stage: weight · mean of the method's (per-sample) loss."""
    return {term.name: term.weight * term.method(inputs).mean() for term in plan.terms}


def not_finite(plan: StagePlan, inputs: StepInputs, bad_term: str, where: str, untrained: bool) -> NotFinite:
    """Name the cause of a non-finite loss: a source whose outputs (on the last step read) are not finite; the
    student's outputs before any training step (its starting weights); else the first bad term."""
    for name, outputs in inputs.sources.items():
        if not outputs.finite():
            return NotFinite(f"the {name}'s outputs are not finite at {where}", plan.sources[name].hint)
    if untrained and not inputs.student.finite():
        return NotFinite(f"the student's outputs are not finite at {where}",
                         "check its starting weights and the preprocessing")
    return NotFinite(f"{where}: loss term '{bad_term}' is not finite", "lower the learning rate or that term's weight")


class PendingLosses:
    """Loss terms of the steps run since they were last read, still on the device: reading them waits for the
    device, so they are read on an epoch's first step, then at most every READ_EVERY seconds, and at its end; not
    every step. Read back, each step's terms are added in step order, as if read one by one."""

    READ_EVERY = 0.5

    def __init__(self, names: list[str]):
        self.names, self.steps, self.last_read = names, [], time.perf_counter()
        self.first_step = self.last_step = 0

    def add(self, step: int, images: int, terms: dict[str, torch.Tensor]) -> None:
        if not self.steps:
            self.first_step = step
        self.last_step = step
        self.steps.append((images, torch.stack([terms[name].detach().float() for name in self.names])))

    def due(self, step: int) -> bool:
        return step == 0 or time.perf_counter() - self.last_read >= self.READ_EVERY

    def where(self, plan: StagePlan, epoch: int) -> str:
        steps = f"step {self.first_step + 1}" if self.first_step == self.last_step \
            else f"steps {self.first_step + 1}-{self.last_step + 1}"
        return f"stage '{plan.name}' epoch {epoch + 1} {steps}"

    def read(self) -> list[tuple[int, list[float]]]:
        """Every pending step's images and term values (one wait for the device); forgets them."""
        values = torch.stack([terms for _, terms in self.steps]).tolist() if self.steps else []
        read = [(images, row) for (images, _), row in zip(self.steps, values)]
        self.steps, self.last_read = [], time.perf_counter()
        return read


class StepModule(nn.Module):
    """What a stage trains, as one module (the student and the methods' own parameters), whose forward is one
    step's losses: one DistributedDataParallel wraps it all. Sources are not submodules: the teacher and the
    reference are never wrapped."""

    def __init__(self, plan: StagePlan, needs: Needs):
        super().__init__()
        self.student, self.methods = plan.student, nn.ModuleList(term.method for term in plan.terms)
        self.plan, self.needs = plan, needs

    def forward(self, batch: Batch) -> tuple[dict[str, torch.Tensor], StepInputs]:
        inputs = step_inputs(self.plan, self.needs, batch)
        return loss_terms(self.plan, inputs), inputs


class StageRunner:
    """One stage: a fresh optimizer and schedule, epochs of steps, validation after each epoch."""

    def __init__(self, plan: StagePlan, data: TrainingData, device: torch.device, listener: Listener):
        self.plan, self.data, self.device, self.listener = plan, data, device, listener
        self.needs = plan.needs()
        self.order_seed = data.seed + 7919 * plan.index  # each stage its own data order
        self.steps_per_epoch = len(epoch_batches(len(data.view), data.batch_size, self.order_seed, 0))
        self.optimizer = make_optimizer(plan.optimizer, plan.trained())
        self.schedule = make_schedule(plan.schedule, self.optimizer, self.steps_per_epoch * plan.epochs,
                                      self.steps_per_epoch)
        self.precision = MixedPrecision(device, data.precision)
        self.step = distributed.wrap(StepModule(plan, self.needs))

    def state(self) -> dict:
        """Optimizer, schedule and loss-scaler state (tensors inside), to save with a checkpoint."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
        }

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.precision.scaler and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])

    def run(self, start: Position, sums: EpochSums | None, history: list[EpochRecord], control: Control) -> None:
        """Train from `start` to the end of the stage, appending one record per epoch to history."""
        plan = self.plan
        self.listener.stage_started(plan, self.steps_per_epoch)
        for epoch in range(start.epoch, plan.epochs):
            first_step = start.step if epoch == start.epoch else 0
            sums = sums if epoch == start.epoch and sums is not None else EpochSums()
            if not distributed.is_writer():  # saved sums are every process's: count them once
                sums = EpochSums(seconds=sums.seconds)
            history.append(self._epoch(epoch, first_step, sums, control))
            self.listener.epoch_done(history[-1])
            control.save(self, Position(plan.index, epoch + 1, 0), None)

    def _epoch(self, epoch: int, first_step: int, sums: EpochSums, control: Control) -> EpochRecord:
        plan, data = self.plan, self.data
        started = time.perf_counter()
        for module in plan.trained():
            module.train()
        loader = train_loader(data.view, data.batch_size, self.order_seed, plan.index, epoch, data.workers, first_step,
                              pin_memory=self.device.type == "cuda")
        lr = self.optimizer.param_groups[0]["lr"]
        images_run, pending, inputs = 0, PendingLosses([term.name for term in plan.terms]), None
        layout = torch.channels_last if data.channels_last else torch.contiguous_format
        for step, (images, labels, samples) in enumerate(loader, start=first_step):
            if distributed.check(control.stop_requested()):  # every process stops at the same step
                self._take(pending, sums, inputs, epoch)
                distributed.check()  # every process read its losses: only now save (which may wait on the others)
                sums = self._summed(sums)
                sums.seconds += time.perf_counter() - started
                position = Position(plan.index, epoch, step)
                control.save(self, position, sums)
                raise StopRequested(position)
            batch = Batch(images.to(self.device, non_blocking=True, memory_format=layout),
                          labels.to(self.device, non_blocking=True), samples, plan.index, epoch)
            with self.precision.autocast():
                terms, inputs = self.step(batch)
            pending.add(step, len(labels), terms)
            if pending.due(step):
                self._take(pending, sums, inputs, epoch)
            distributed.check()  # every process read what was due: only now join the gradients' all-reduce
            lr = self.optimizer.param_groups[0]["lr"]  # the one this step uses; the schedule moves on after it
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward(sum(terms.values()), self.optimizer)
            self.schedule.step()
            images_run += len(labels) * distributed.world_size()  # every process's share of the step
        self._take(pending, sums, inputs, epoch)
        distributed.check()
        train_seconds = time.perf_counter() - started
        distributed.average_buffers(plan.trained())
        sums = self._summed(sums)
        val_logits, val_labels = predict(plan.student, data.val_loader, self.device)
        seen = max(sums.seen, 1)
        return EpochRecord(
            stage=plan.name, epoch=epoch + 1, epochs=plan.epochs,
            train_loss=sum(sums.terms.values()) / seen,
            terms={name: total / seen for name, total in sums.terms.items()},
            val_top1=topk_accuracy(val_logits, val_labels, 1),
            lr=lr,
            seconds=sums.seconds + time.perf_counter() - started,
            images=images_run,
            train_seconds=train_seconds,
        )

    def _take(self, pending: PendingLosses, sums: EpochSums, inputs: StepInputs | None, epoch: int) -> None:
        """Read the pending steps' losses into the epoch's sums and the listener; a non-finite one ends training
        (before anything is saved: the last checkpoint stays the last good one)."""
        where, untrained = pending.where(self.plan, epoch), (self.plan.index, epoch, pending.first_step) == (0, 0, 0)
        steps = pending.read()
        for images, values in steps:
            bad = next((name for name, value in zip(pending.names, values) if not math.isfinite(value)), None)
            if bad is not None:
                raise not_finite(self.plan, inputs, bad, where, untrained)
            for name, value in zip(pending.names, values):
                sums.terms[name] = sums.terms.get(name, 0.0) + value * images
            sums.seen += images
        if steps:  # the listener counts every process's images
            self.listener.steps_done([(images * distributed.world_size(), sum(values)) for images, values in steps])

    def _summed(self, sums: EpochSums) -> EpochSums:
        """The epoch's loss sums over every process (each summed its share of the batches)."""
        names = [term.name for term in self.plan.terms]
        *totals, seen = distributed.sum_all([sums.terms.get(name, 0.0) for name in names] + [float(sums.seen)])
        return EpochSums(dict(zip(names, totals)) if seen else {}, int(seen), sums.seconds)
