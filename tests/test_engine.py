"""What the stage engine promises beyond the losses: fresh views per stage and epoch, loaders that leave torch's
global generator alone, timm's weight-decay groups, native bf16 only, and the learning rate it logs."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from conftest import TEACHER_DATA
from kdcli.data import DataConfig, TrainView, open_data, train_loader
from kdcli.errors import KdcliError
from kdcli.training.methods import REGISTRY
from kdcli.training.optim import OptimizerSettings, make_optimizer
from kdcli.training.precision import MixedPrecision


@pytest.fixture(scope="module")
def view():
    return TrainView(open_data("synthetic:train=64,val=16").train, DataConfig(32, (0.5,) * 3, (0.5,) * 3),
                     hflip=True, crop="pad", seed=0)


def views_by_sample(view, stage: int, epoch: int) -> torch.Tensor:
    """The images of one stage's epoch as the engine's loader serves them, ordered by sample index."""
    found = {}
    for images, _, samples in train_loader(view, 16, order_seed=7919 * stage, stage=stage, epoch=epoch, workers=0):
        found.update(zip(samples.tolist(), images))
    return torch.stack([found[i] for i in sorted(found)])


def test_every_stage_and_epoch_sees_views_of_its_own(view):
    """An image's augmentation depends on (seed, stage, epoch, sample): stage 1 does not replay stage 0's views."""
    first = views_by_sample(view, 0, 0)
    assert torch.equal(first, views_by_sample(view, 0, 0))  # deterministic
    for stage, epoch in ((1, 0), (2, 0), (0, 1)):
        other = views_by_sample(view, stage, epoch)
        differ = (first != other).flatten(1).any(1).float().mean().item()
        assert differ > 0.9, (stage, epoch, differ)  # 162 pad offsets x flips: a repeat is a 1-in-162 chance


def test_a_loader_draws_nothing_from_torchs_global_generator(view):
    """Else a mid-epoch resume (a fresh loader) shifts every later dropout draw of the student by one."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in train_loader(view, 16, order_seed=0, stage=0, epoch=3, workers=0, start_batch=2):
        pass
    assert torch.equal(torch.get_rng_state(), before)


def test_weight_decay_skips_biases_norm_weights_and_what_timm_exempts():
    torch.manual_seed(0)
    student = timm.create_model("test_vit", num_classes=10, img_size=32)
    fitnets = REGISTRY["fitnets"](REGISTRY["fitnets"].Params(method="fitnets"))
    fitnets.setup({"student": {"feature:-2": torch.Size([2, 64, 2, 2])},
                   "teacher": {"feature:-2": torch.Size([2, 48, 4, 4])}})
    optimizer = make_optimizer(OptimizerSettings(lr=0.1, weight_decay=0.5), [student, fitnets])
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    named = [*student.named_parameters(), *(("connector." + n, p) for n, p in fitnets.named_parameters())]
    assert len(decay) == len(named)
    for name, param in named:
        exempt = param.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert decay[id(param)] == (0.0 if exempt else 0.5), name

    # one step with zero gradients: only the decayed weights move
    before = {name: param.detach().clone() for name, param in named}
    for _, param in named:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in named:
        moved = not torch.equal(param, before[name])
        assert moved == (decay[id(param)] > 0 and bool(before[name].abs().sum() > 0)), name


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_cuda_mixed_precision_uses_bf16_only_where_the_gpu_has_it(monkeypatch):
    """torch.cuda.is_bf16_supported() also counts emulated bf16; such a GPU must get fp16 and a GradScaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    emulated = MixedPrecision(torch.device("cuda"))
    assert emulated.dtype == torch.float16 and emulated.scaler is not None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    native = MixedPrecision(torch.device("cuda"))
    assert native.dtype == torch.bfloat16 and native.scaler is None
    cpu = MixedPrecision(torch.device("cpu"))
    assert not cpu.enabled and cpu.scaler is None and cpu.name == "fp32"
    cpu_bf16 = MixedPrecision(torch.device("cpu"), "bf16")  # --precision bf16: autocast on the CPU too
    assert cpu_bf16.enabled and cpu_bf16.dtype == torch.bfloat16 and cpu_bf16.scaler is None
    assert not MixedPrecision(torch.device("cuda"), "fp32").enabled
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(KdcliError, match="this GPU has no native bf16"):
        MixedPrecision(torch.device("cuda"), "bf16")


def test_the_logged_learning_rate_is_the_one_the_epochs_last_step_used(teacher_dir):
    """The session's teacher (`kdcli train`, one cosine stage): each epoch logs the lr of its last step."""
    report = json.loads((teacher_dir / "report.json").read_text())
    history, ran = report["stages"][0]["history"], report["recipe"]["resolved"]
    lr, epochs, batch = ran["stages"][0]["optimizer"]["lr"], ran["stages"][0]["epochs"], ran["data"]["batch_size"]
    steps = len(open_data(TEACHER_DATA).train) // batch
    total = epochs * steps
    expected = [lr * 0.5 * (1 + math.cos(math.pi * (steps * epoch - 1) / total)) for epoch in range(1, epochs + 1)]
    assert [h["lr"] for h in history] == pytest.approx(expected)
    assert history[-1]["lr"] > 0


def test_losses_are_read_from_the_device_a_few_times_an_epoch_not_every_step(monkeypatch, tmp_path):
    """Reading a loss waits for the device (a CUDA sync): the engine reads the pending steps' losses together, on
    an epoch's first step, at most every READ_EVERY seconds, and at its end. Each step still counts, in order."""
    from kdcli.jobs.training import train_student
    from kdcli.progress import Silent
    from kdcli.training.engine import PendingLosses
    from kdcli.training.recipe import load_recipe

    monkeypatch.setattr(PendingLosses, "READ_EVERY", 1e9)
    original, reads = PendingLosses.read, []
    monkeypatch.setattr(PendingLosses, "read", lambda self: reads.append(len(self.steps)) or original(self))

    class Heard(Silent):
        steps: list = []

        def steps_done(self, steps):
            self.steps.append(steps)

    heard = Heard()
    recipe = load_recipe("supervised", ["stages.0.epochs=2", "data.batch_size=16"])
    report = train_student(recipe, "test_resnet", "synthetic:train=96,val=32", tmp_path / "run", listener=heard,
                           kind="train", device_name="cpu")
    assert reads == [1, 5, 1, 5]  # per epoch of 6 steps: the first alone, the other five together at the end
    assert [len(steps) for steps in heard.steps] == [1, 5, 1, 5]
    history = report["stages"][0]["history"]
    for epoch, (first, rest) in zip(history, zip(heard.steps[::2], heard.steps[1::2])):
        steps = first + rest
        assert all(images == 16 and math.isfinite(loss) for images, loss in steps)
        assert epoch["train_loss"] == pytest.approx(sum(loss for _, loss in steps) / len(steps), rel=1e-6)
