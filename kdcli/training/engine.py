"""One stage's training loop. It knows methods only through their interface (needs / forward)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from kdcli.models import taps
from kdcli.training.anchor import anchor_loss, sample_weights
from kdcli.data import TrainView, epoch_batches, train_loader
from kdcli.errors import KdcliError
from kdcli.evaluation.metrics import predict, topk_accuracy
from kdcli.training.methods import Method, Needs, StepInputs


@dataclass
class StagePlan:
    """Everything one stage needs, assembled by the pipeline."""

    index: int
    name: str
    epochs: int
    student: nn.Module
    teacher: nn.Module | None
    reference: nn.Module | None
    losses: list[tuple[str, float, Method]]  # (term name, weight, method)
    anchor: object  # recipe AnchorSettings
    optimizer: object  # recipe OptimizerSettings
    schedule: object  # recipe ScheduleSettings
    teacher_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def needs(self) -> Needs:
        """The union of what the stage's losses read, plus teacher logits for tcp weighting."""
        wants = [m.needs() for _, _, m in self.losses]
        return Needs(
            teacher_logits=any(w.teacher_logits for w in wants) or self.anchor.weighting == "tcp",
            student_taps=tuple(dict.fromkeys(k for w in wants for k in w.student_taps)),
            teacher_taps=tuple(dict.fromkeys(k for w in wants for k in w.teacher_taps)),
        )

    def trainable(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *(p for _, _, m in self.losses for p in m.parameters())]


@dataclass
class EpochRecord:
    stage: str
    epoch: int  # 1-based within the stage
    epochs: int
    train_loss: float
    terms: dict[str, float]
    val_top1: float
    lr: float
    seconds: float


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


class Listener(Protocol):
    def stage_started(self, plan: StagePlan, steps_per_epoch: int) -> None: ...
    def step_done(self) -> None: ...
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


def make_optimizer(settings, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if settings.name == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
        nesterov=settings.nesterov and settings.momentum > 0,
    )


def lr_factor(settings, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at a step: linear warm-up from 1%, then cosine to 0 or constant."""
    warmup = round(settings.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    if settings.name == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class StageRunner:
    """One stage: a fresh optimizer and schedule, epochs of steps, validation after each epoch."""

    def __init__(self, plan: StagePlan, data: TrainingData, device: torch.device, listener: Listener):
        self.plan, self.data, self.device, self.listener = plan, data, device, listener
        self.needs = plan.needs()
        self.seed = data.seed + 7919 * plan.index  # each stage its own data order
        self.steps_per_epoch = len(epoch_batches(len(data.view), data.batch_size, self.seed, 0))
        total = self.steps_per_epoch * plan.epochs
        self.optimizer = make_optimizer(plan.optimizer, plan.trainable())
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(plan.schedule, step, total, self.steps_per_epoch)
        )
        self.amp = _Amp(device)

    def state(self) -> dict:
        """Optimizer, schedule and loss-scaler state (tensors inside), to save with a checkpoint."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler else None,
        }

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.amp.scaler and state.get("scaler"):
            self.amp.scaler.load_state_dict(state["scaler"])

    def run(self, start: Position, sums: EpochSums | None, history: list[EpochRecord], control: Control) -> None:
        """Train from `start` to the end of the stage, appending one record per epoch to history."""
        plan = self.plan
        self.listener.stage_started(plan, self.steps_per_epoch)
        for epoch in range(start.epoch, plan.epochs):
            first_step = start.step if epoch == start.epoch else 0
            sums = sums if epoch == start.epoch and sums is not None else EpochSums()
            history.append(self._epoch(epoch, first_step, sums, control))
            self.listener.epoch_done(history[-1])
            control.save(self, Position(plan.index, epoch + 1, 0), None)

    def _epoch(self, epoch: int, first_step: int, sums: EpochSums, control: Control) -> EpochRecord:
        plan = self.plan
        started = time.perf_counter()
        plan.student.train()
        for _, _, method in plan.losses:
            method.train()
        loader = train_loader(self.data.view, self.data.batch_size, self.seed, epoch, self.data.workers, first_step)
        for step, (images, labels) in enumerate(loader, start=first_step):
            if control.stop_requested():
                sums.seconds += time.perf_counter() - started
                position = Position(plan.index, epoch, step)
                control.save(self, position, sums)
                raise StopRequested(position)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with self.amp.autocast():
                terms = loss_terms(plan, self.needs, images, labels, epoch)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                bad = next((n for n, t in terms.items() if not torch.isfinite(t)), "total")
                raise KdcliError(
                    f"stage '{plan.name}' epoch {epoch + 1} step {step + 1}: loss term '{bad}' is not finite; "
                    "the last good checkpoint is kept; lower the learning rate or that term's weight"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.amp.backward(loss, self.optimizer)
            self.schedule.step()
            for name, value in terms.items():
                sums.terms[name] = sums.terms.get(name, 0.0) + value.item() * len(labels)
            sums.seen += len(labels)
            self.listener.step_done()
        val_logits, val_labels = predict(plan.student, self.data.val_loader, self.device)
        seen = max(sums.seen, 1)
        return EpochRecord(
            stage=plan.name, epoch=epoch + 1, epochs=plan.epochs,
            train_loss=sum(sums.terms.values()) / seen,
            terms={name: total / seen for name, total in sums.terms.items()},
            val_top1=topk_accuracy(val_logits, val_labels, 1),
            lr=self.optimizer.param_groups[0]["lr"],
            seconds=sums.seconds + time.perf_counter() - started,
        )


def loss_terms(
    plan: StagePlan, needs: Needs, images: torch.Tensor, labels: torch.Tensor, epoch: int
) -> dict[str, torch.Tensor]:
    """Forward student (and teacher/reference where needed) on the same batch; every weighted loss term."""
    with ExitStack() as stack:
        student_features = stack.enter_context(taps.capture(plan.student, needs.student_taps, "student"))
        student_logits = plan.student(images)
        teacher_logits, teacher_features = None, {}
        if needs.teacher_logits or needs.teacher_taps:
            teacher_features = stack.enter_context(taps.capture(plan.teacher, needs.teacher_taps, "teacher"))
            with torch.no_grad():
                teacher_logits = plan.teacher(plan.teacher_input(images))
        inputs = StepInputs(
            student_logits=student_logits, labels=labels, teacher_logits=teacher_logits,
            student_features=dict(student_features), teacher_features=dict(teacher_features), epoch=epoch,
        )
        terms = {name: weight * method(inputs).mean() for name, weight, method in plan.losses}
    if plan.reference is not None:
        with torch.no_grad():
            reference_logits = plan.reference(images)
        anchor = plan.anchor
        weights = sample_weights(anchor.weighting, anchor.tcp, anchor.lambda_, teacher_logits, labels)
        terms["anchor"] = anchor_loss(student_logits, reference_logits, weights, anchor.temperature)
    return terms


class _Amp:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); plain fp32 on CPU."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else nullcontext()

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
