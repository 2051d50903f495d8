"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from conftest import DATA, Watched


def assert_one_clear_line(result, *fragments: str) -> None:
    """Exit 2 and exactly one `error:` line, the last one (progress lines of a started run may precede it)."""
    assert result.code == 2, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


FAST = ["--recipe", "kd-anchored", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1"]


class Call:
    """Argument lists of kdcli calls around one tmp folder and the session's teacher."""

    def __init__(self, tmp, teacher):
        self.tmp, self.teacher, self.out = tmp, teacher, tmp / "out"

    def distill(self, teacher=None, student="test_efficientnet", *extra, data=DATA, out=None):
        return ["distill", teacher or self.teacher, student, "--data", data, "--out", out or self.out, *FAST, *extra]

    def ablate(self, *extra, out=None):
        return ["ablate", self.teacher, "test_resnet", "--data", DATA, "--seeds", "1", "--out", out or self.out, *extra]

    def file(self, name, content=b""):
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def folder(self, name):
        path = self.tmp / name
        path.mkdir()
        return path

    def bare_weights(self):
        path = self.tmp / "bare.safetensors"
        safetensors.torch.save_file({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, str(path))
        return path

    def teacher_with_classes(self, classes):
        import timm

        from kdcli.models.checkpoint import LoadedModel, save_timm_folder
        from kdcli.data import DataConfig

        folder = self.tmp / f"teacher{classes}"
        model = timm.create_model("test_resnet", num_classes=classes)
        save_timm_folder(folder, LoadedModel(model, "test_resnet", classes), DataConfig(32, (0.5,) * 3, (0.5,) * 3), None)
        return folder


def image_folder(root, classes=10, bad=None, val_classes=None):
    """An ImageFolder root with one tiny PNG per class and split; bad: a junk file's relative path."""
    from PIL import Image

    for split, count in (("train", classes), ("val", val_classes or classes)):
        for index in range(count):
            folder = root / split / f"c{index}"
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(folder / "0.png")
    if bad:
        (root / bad).write_bytes(b"not an image")
    return root


def image_folder_missing_class(c):
    root = image_folder(c.tmp / "d")
    (root / "train" / "c9" / "0.png").unlink()
    return root


def undecodable(c):
    """A PNG whose header is fine but whose pixels are cut off: found only when a loader worker decodes it."""
    from PIL import Image

    root = image_folder(c.tmp / "d")
    png = root / "train" / "c4" / "0.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(png)
    png.write_bytes(png.read_bytes()[:2000])
    return root


def truncated(c):
    whole = (c.teacher / "model.safetensors").read_bytes()
    return c.file("truncated.safetensors", whole[: len(whole) // 2])


def teacher_with_bad_config(c):
    folder = c.folder("badconfig")
    (folder / "model.safetensors").write_bytes((c.teacher / "model.safetensors").read_bytes())
    (folder / "config.json").write_text("{architecture: test_resnet")
    return folder


def teacher_with_config(c, name, **changes):
    """The session teacher's folder with config.json fields changed (None deletes a field)."""
    import json

    folder = c.folder(name)
    (folder / "model.safetensors").write_bytes((c.teacher / "model.safetensors").read_bytes())
    config = json.loads((c.teacher / "config.json").read_text())
    for path, value in changes.items():
        holder, _, key = path.rpartition("__")
        target = config[holder] if holder else config
        target.pop(key) if value is None else target.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def teacher_with_metadata(c, **metadata):
    tensors = safetensors.torch.load_file(str(c.teacher / "model.safetensors"))
    path = c.tmp / "meta.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"arch": "test_resnet", **metadata})
    return path


def nan_weights(c):
    tensors = safetensors.torch.load_file(str(c.teacher / "model.safetensors"))
    tensors["fc.weight"][0, 0] = float("nan")
    folder = c.folder("nan")
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"arch": "test_resnet"})
    (folder / "config.json").write_text((c.teacher / "config.json").read_text())
    return folder


def training_checkpoint(c):
    path = c.tmp / "checkpoint.safetensors"
    safetensors.torch.save_file({"student.fc.weight": torch.zeros(10, 4)}, str(path),
                                metadata={"kdcli_state": "{}", "arch": "test_resnet"})
    return path


def bare_teacher(c):
    tensors = safetensors.torch.load_file(str(c.teacher / "model.safetensors"))
    path = c.tmp / "teacher_bare.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


def random_teacher(c):
    import timm

    from kdcli.data import DataConfig
    from kdcli.models.checkpoint import LoadedModel, save_timm_folder

    folder = c.tmp / "random_teacher"
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    save_timm_folder(folder, LoadedModel(model, "test_resnet", 10), DataConfig(32, (0.5,) * 3, (0.5,) * 3), None)
    return folder


def lightning_ckpt(c):
    import timm

    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    path = c.tmp / "last.ckpt"
    torch.save({"epoch": 1, "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    return ["convert", path, "--arch", "test_resnet", "--out", c.out]


def out_is_not_empty(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("mine")
    return c.distill()


def out_is_a_file(c):
    c.out.write_text("mine")
    return c.distill()


def unknown_key_file(c):
    path = c.tmp / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "epochs": 1, "losses": [{"method": "kd"}], "anchr": {}}]}))
    return ["distill", c.teacher, "test_efficientnet", "--data", DATA, "--out", c.out, "--recipe", path]


def unsafe_pickle(c):
    torch.save({"state_dict": {}, "optimizer": object.__new__(Call)}, c.tmp / "ckpt.pth")
    return ["convert", c.tmp / "ckpt.pth", "--arch", "test_resnet", "--out", c.out]


def overflowing(c, name):
    """A copy of the session's teacher whose classifier weights are scaled up to near float32's limit: every
    weight finite, but the logits overflow to ±inf."""
    folder = c.folder(name)
    with safetensors.safe_open(str(c.teacher / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(str(c.teacher / "model.safetensors"))
    weight = tensors["fc.weight"].double()
    tensors["fc.weight"] = (weight * (3e38 / weight.abs().max())).float()
    assert all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)
    (folder / "config.json").write_bytes((c.teacher / "config.json").read_bytes())
    return folder


def png_declaring(path, width, height, checksum_ok=True):
    """A PNG whose header declares width x height (its pixels are not there): what a decoder reads first."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data, crc=0: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) ^ crc))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header, 0 if checksum_ok else 1)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def image_folder_with(c, name, write):
    root = image_folder(c.tmp / "d")
    write(root / name)
    return str(root)


def cifar_folder(c, rows=3072, label_max=9):
    """A CIFAR-10 python folder as the official archive lays it out, 8 images per batch."""
    folder = c.folder("data") / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [int(v) for v in rng.integers(0, label_max + 1, 8)],
                 b"data": rng.integers(0, 256, (8, rows), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2).replace(b"numpy._core", b"numpy.core"))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2))
    return str(c.tmp / "data")


def recipe_file(c, text):
    path = c.tmp / "r.yaml"
    path.write_text(text)
    return ["distill", c.teacher, "test_efficientnet", "--data", DATA, "--out", c.out, "--recipe", path]


def alias_bomb(c):
    rows = ["a: &a [" + ", ".join(['"xxxxxxxxxx"'] * 9) + "]"]
    rows += [f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]" for prev, name in zip("abcdefg", "bcdefgh")]
    return recipe_file(c, "\n".join([*rows, "stages: *h"]) + "\n")


def staged_checkpoint(c, state: dict):
    """A checkpoint where an interrupted run on c.out keeps it (see jobs/outputs.py), holding `state`."""
    partial = c.tmp / f".{c.out.name}.kdcli" / "partial"
    partial.mkdir(parents=True)
    safetensors.torch.save_file({"student.fc.weight": torch.zeros(2, 2)}, str(partial / "checkpoint.safetensors"),
                                metadata={"kdcli_state": json.dumps(state)})


def out_in_use(c):
    """Another process holds the lock on --out (here: this one, through another open file, as a second run would)."""
    home = c.tmp / f".{c.out.name}.kdcli"
    home.mkdir()
    c.lock = os.open(home / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(c.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(c.lock, f"{os.getpid()}\n".encode())
    return c.distill()


def teacher_copy(c):
    folder = c.tmp / "model"
    shutil.copytree(c.teacher, folder)
    return folder


def incomplete_cifar(c):
    folder = c.folder("data") / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"")
    return c.distill(data=str(c.tmp / "data"))


def onnx_without_metadata(c):
    """A valid ONNX file not written by kdcli export (no metadata to tell the model and its preprocessing)."""
    import onnx
    from onnx import TensorProto, helper

    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 3, 32, 32])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [tensor("input")],
                              [tensor("logits")])
    onnx.save(helper.make_model(graph), str(c.tmp / "plain.onnx"))
    return ["eval", c.tmp / "plain.onnx", "--data", DATA]


# id: (argument list, fragments the one line must contain). docs/errors.md lists the same ids.
CASES = {
    # checkpoints
    "missing-file": (lambda c: c.distill(c.tmp / "nope.safetensors"), ["does not exist", ".safetensors"]),
    "unknown-logger": (lambda c: c.distill(None, "test_efficientnet", "--log", "wandb"),
                       ["--log wandb: unknown logger", "choose from tensorboard"]),
    "folder-without-weights": (lambda c: c.distill(c.folder("empty")), ["has no model.safetensors"]),
    "pickle-checkpoint": (lambda c: c.distill(c.file("teacher.pth", b"\x80\x02")), ["pickle", "kdcli convert"]),
    "corrupt-safetensors": (
        lambda c: c.distill(c.file("bad.safetensors", b"\xff" * 16)), ["not a readable safetensors file"]),
    "truncated-safetensors": (lambda c: c.distill(truncated(c)), ["not a readable safetensors file", "re-copy"]),
    "architecture-as-teacher": (lambda c: c.distill("resnet18"), ["architecture name", "kdcli train resnet18"]),
    "unknown-architecture": (
        lambda c: c.distill(None, "mobilenetv2_05"), ["unknown timm architecture", "mobilenetv2_050"]),
    "no-architecture-anywhere": (
        lambda c: c.distill(c.bare_weights()), ["cannot tell its architecture", "--teacher-arch"]),
    "weights-do-not-fit": (
        lambda c: c.distill(c.bare_weights(), "test_efficientnet", "--teacher-arch", "resnet18"),
        ["does not fit resnet18", "fc.weight"]),
    "invalid-config-json": (lambda c: c.distill(teacher_with_bad_config(c)), ["config.json is not valid JSON"]),
    "teacher-data-classes": (
        lambda c: c.distill(c.teacher_with_classes(7)), ["teacher has 7 classes", "data has 10"]),
    "student-teacher-classes": (
        lambda c: c.distill(None, c.teacher_with_classes(7)), ["has 7 classes but the data has 10", "--reset-head"]),
    "config-field-wrong-type": (
        lambda c: c.distill(teacher_with_config(c, "t", pretrained_cfg__mean="0.5")),
        ["config.json: field 'pretrained_cfg.mean' must be 3 finite numbers", '(got "0.5")']),
    "config-zero-std": (
        lambda c: c.distill(teacher_with_config(c, "t", pretrained_cfg__std=[0, 0.5, 0.5])),
        ["field 'pretrained_cfg.std' must be 3 positive numbers"]),
    "config-bad-input-size": (
        lambda c: c.distill(teacher_with_config(c, "t", pretrained_cfg__input_size=[3, 0, 0])),
        ["field 'pretrained_cfg.input_size' must be [channels, height, width]"]),
    "config-architecture-not-a-string": (
        lambda c: c.distill(teacher_with_config(c, "t", architecture=18)),
        ["field 'architecture' must be a timm architecture name"]),
    "config-and-metadata-disagree": (
        lambda c: c.distill(teacher_with_config(c, "disagree", architecture="test_efficientnet")),
        ["metadata says architecture 'test_resnet'", "config.json says 'test_efficientnet'", "--teacher-arch"]),
    "config-not-an-object": (
        lambda c: c.distill(teacher_with_config(c, "t", pretrained_cfg=[1, 2])),
        ["field 'pretrained_cfg' must be a JSON object"]),
    "config-model-args-do-not-build": (
        lambda c: c.distill(teacher_with_config(c, "t", model_args={"no_such_arg": 1})),
        ["teacher", "timm cannot build test_resnet with no_such_arg=1", "fix its model_args"]),
    "grayscale-model": (
        lambda c: c.distill(teacher_with_config(c, "t", model_args={"in_chans": 1})),
        ["takes 1-channel images", "RGB"]),
    "metadata-not-json": (
        lambda c: c.distill(teacher_with_metadata(c, data_config="{input_size: 32")),
        ["safetensors metadata field 'data_config' is not JSON"]),
    "metadata-zero-std": (
        lambda c: c.distill(teacher_with_metadata(c, data_config='{"std": [0.5, 0.0, 0.5]}')),
        ["(safetensors metadata): field 'data_config.std' must be 3 positive numbers"]),
    "non-finite-weights": (lambda c: c.distill(nan_weights(c)), ["weight 'fc.weight' holds NaN or infinite values"]),
    "training-checkpoint-as-model": (
        lambda c: ["eval", training_checkpoint(c), "--data", DATA],
        ["kdcli's training checkpoint of an interrupted run", "--resume", "student/"]),
    "unknown-architecture-train": (
        lambda c: ["train", "resnet1", "--data", DATA, "--out", c.out], ["unknown timm architecture 'resnet1'"]),
    "unknown-architecture-demo": (
        lambda c: ["demo", "--teacher", "resnet1", "--data", DATA, "--out", c.out], ["unknown timm architecture"]),
    "unknown-student-bare-teacher": (
        lambda c: c.distill(bare_teacher(c), "mobilenetv2_05", "--teacher-arch", "test_resnet"),
        ["unknown timm architecture 'mobilenetv2_05'"]),
    "unknown-pretrained-tag": (
        lambda c: c.distill(None, "test_resnet.nope"), ["no pretrained weights under that tag", "r160_in1k"]),
    "hub-not-cached": (
        lambda c: c.distill("hf-hub:kdcli-tests/absent"), ["not in the Hugging Face cache", "HF_HUB_OFFLINE is set"]),
    "hub-name-without-prefix": (
        lambda c: c.distill("someorg/some-model"), ["does not exist", "hf-hub:someorg/some-model"]),
    "teacher-at-chance": (
        lambda c: c.distill(random_teacher(c)),
        ["no better than chance", "class order", "--teacher-mean", "--allow-weak-teacher"]),
    "teacher-label-names-differ": (
        lambda c: c.distill(teacher_with_config(c, "t", label_names=[f"class_{i}" for i in reversed(range(10))])),
        ["label_names differ from the data's class folders", "another order", "--allow-weak-teacher"]),
    "bad-preprocessing-flag": (
        lambda c: c.distill(None, "test_efficientnet", "--teacher-std", "0.5,0"),
        ["--teacher-std 0.5,0: expected 3 comma-separated positive numbers"]),
    "convert-needs-prefix": (lambda c: lightning_ckpt(c), ["no classifier weight 'fc.weight'", "--prefix"]),
    "unsafe-pickle-convert": (lambda c: unsafe_pickle(c), ["weights_only=True", "Unsupported global", "torch.save(model.state_dict()"]),
    # recipe and overrides
    "unknown-recipe": (
        lambda c: c.distill(None, "test_efficientnet", "--recipe", "nope.yaml"), ["no recipe 'nope.yaml'"]),
    "recipe-unknown-key": (lambda c: unknown_key_file(c), ["stages.0.anchr: unknown key", "did you mean anchor"]),
    "recipe-wrong-type": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.epochs=abc"),
        ["stages.0.epochs", "valid integer", "'abc'"]),
    "negative-epochs": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.epochs=-2"),
        ["stages.0.epochs", "greater than or equal to 1"]),
    "empty-stages": (lambda c: c.distill(None, "test_efficientnet", "--set", "stages=[]"), ["stages", "at least 1"]),
    "unknown-method": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.losses.0.method=kdd"),
        ["unknown method 'kdd'", "did you mean kd"]),
    "unknown-tap": (
        lambda c: c.distill(None, "test_efficientnet", "--recipe", "smskd",
                            "--set", "stages.1.losses.1.pairs.0.teacher=feature:9"),
        ["recipe stage 1 ('feature')", "unknown teacher tap 'feature:9'", "available: feature:0", "kdcli inspect"]),
    "first-stage-anchor-random-student": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.anchor.weighting=tcp"),
        ["first stage", "randomly initialised"]),
    "set-path-does-not-exist": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.epoks=1"), ["did you mean epochs"]),
    "set-without-value": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.epochs"), ["expected key=value"]),
    "non-finite-number": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "schedule.warmup_epochs=.inf"),
        ["schedule.warmup_epochs: must be a finite number (got inf)"]),
    "number-out-of-range": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "optimizer.lr=1e300"),
        ["optimizer.lr: input should be less than or equal to 3.40282e+38 (got '1e300')"]),
    "seed-out-of-range": (
        lambda c: c.distill(None, "test_efficientnet", "--seed", str(2**70)), ["seed", "less than or equal to 4294967295"]),
    "batch-size-one": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "data.batch_size=1"),
        ["data.batch_size: input should be greater than or equal to 2"]),
    "yaml-alias-bomb": (lambda c: alias_bomb(c), ["more than 100000 values", "aliases"]),
    "recipe-too-large": (
        lambda c: recipe_file(c, "description: " + "x" * (2 << 20) + "\n"), ["larger than 1024 KiB"]),
    "train-zero-epochs": (
        lambda c: ["train", "test_resnet", "--data", DATA, "--out", c.out, "--epochs", "0"], ["--epochs 0"]),
    # training
    "teacher-outputs-not-finite": (
        lambda c: c.distill(overflowing(c, "hot")),
        ["the teacher's outputs are not finite on 128 of 128 validation images; check its weights and preprocessing"]),
    "reference-outputs-not-finite": (
        lambda c: c.distill(None, overflowing(c, "hot"), "--set", "stages.0.anchor.weighting=fixed"),
        ["the reference's outputs are not finite at stage 'kd' epoch 1 step 1; it is the student's starting weights"]),
    "student-outputs-not-finite": (
        lambda c: c.distill(None, overflowing(c, "hot")),
        ["the student's outputs are not finite at stage 'kd' epoch 1 step 1; check its starting weights"]),
    "loss-not-finite-before-checkpoint": (  # no checkpoint yet: the line promises none
        lambda c: c.distill(None, "test_efficientnet", "--set", "optimizer.lr=1e6"),
        ["stage 'kd' epoch 1 step", "is not finite; lower the learning rate or that term's weight"]),
    "image-size-too-small": (
        lambda c: c.distill(None, "test_vit", "--set", "data.image_size=8"), ["cannot take 8x8", "data.image_size"]),
    # data
    "missing-data": (lambda c: c.distill(data=str(c.tmp / "nodata")), ["data folder", "does not exist"]),
    "eval-split-missing": (lambda c: ["eval", c.teacher, "--data", image_folder(c.tmp / "d"), "--split", "nope"],
                           ["--split nope:", "is not a folder", "(e.g. test, val)"]),
    "data-is-a-file": (lambda c: c.distill(data=str(c.file("data.zip", b"PK"))), ["is a file"]),
    "empty-data-folder": (lambda c: c.distill(data=str(c.folder("data"))), ["has no train/ folder"]),
    "class-folder-without-images": (lambda c: c.distill(data=str(image_folder_missing_class(c))), ["has no images"]),
    "train-val-classes-differ": (
        lambda c: c.distill(data=str(image_folder(c.tmp / "d", val_classes=9))), ["different class folders", "c9"]),
    "unreadable-image": (
        lambda c: c.distill(data=str(image_folder(c.tmp / "d", bad="train/c3/broken.jpg"))),
        ["cannot read image", "broken.jpg", "remove or replace"]),
    "image-fails-to-decode": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "data.workers=1", "--allow-weak-teacher",
                            data=str(undecodable(c))),
        ["cannot read image", "0.png", "remove or replace"]),
    "incomplete-cifar": (lambda c: incomplete_cifar(c), ["incomplete", "data_batch_2"]),
    "bad-synthetic-spec": (  # into --out in new nested folders: none of them is left behind
        lambda c: c.distill(data="synthetic:train=x", out=c.tmp / "new" / "nested" / "out"), ["synthetic:train=N,val=M"]),
    "synthetic-too-large": (lambda c: c.distill(data="synthetic:train=10000000"), ["from 1 to 100000"]),
    "one-training-image": (
        lambda c: c.distill(data="synthetic:train=1,val=8"), ["has 1 image", "at least 2", "batch norm"]),
    "decompression-bomb": (
        lambda c: c.distill(data=image_folder_with(c, "train/c2/huge.png", lambda p: png_declaring(p, 20000, 20000))),
        ["huge.png", "decompression bomb", "resize or remove it"]),
    "undecodable-header": (
        lambda c: c.distill(data=image_folder_with(c, "val/c5/crc.png", lambda p: png_declaring(p, 8, 8, False))),
        ["cannot read image", "crc.png", "remove or replace"]),
    "file-name-with-newline": (
        lambda c: c.distill(data=image_folder_with(c, "train/c1/bro\nken.jpg", lambda p: p.write_bytes(b"junk"))),
        ["bro\\nken.jpg", "remove or replace"]),
    "cifar-malformed": (
        lambda c: c.distill(data=cifar_folder(c, rows=3000)), ["data_batch_1", "not rows of 3072 bytes", "re-extract"]),
    "cifar-labels-out-of-range": (
        lambda c: c.distill(data=cifar_folder(c, label_max=40)), ["outside 0..9", "re-extract"]),
    # output and machine
    "out-not-empty": (lambda c: out_is_not_empty(c), ["not empty", "--force"]),
    "out-is-a-file": (lambda c: out_is_a_file(c), ["is a file"]),
    "out-not-writable": (
        lambda c: c.distill(out="/sys/kdcli-out"), ["cannot write in /sys", "choose another folder"]),
    "bad-workers": (lambda c: c.distill(None, "test_efficientnet", "--workers", "many"), ["--workers many", "auto"]),
    "cache-without-views": (
        lambda c: c.distill(None, "test_efficientnet", "--cache", c.tmp / "cache"), ["need fixed views", "data.views"]),
    "precision-unknown": (
        lambda c: c.distill(None, "test_efficientnet", "--precision", "fp16"), ["--precision fp16", "auto, fp32, bf16"]),
    "cache-is-a-file": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "data.views=2", "--cache", c.file("cache")),
        ["is a file", "--cache"]),
    "nothing-to-resume": (lambda c: c.distill(None, "test_efficientnet", "--resume"), ["nothing to resume"]),
    "no-cuda": (lambda c: c.distill(None, "test_efficientnet", "--device", "cuda"), ["no CUDA device"]),
    "out-inside-data": (
        lambda c: c.distill(out=image_folder(c.tmp / "d") / "train" / "c3" / "run", data=str(c.tmp / "d")),
        ["is inside --data", "choose a folder outside"]),
    "out-holds-an-input": (
        lambda c: ["eval", teacher_copy(c), "--data", DATA, "--out", c.tmp / "model", "--force"],
        ["holds the checkpoint", "choose another folder"]),
    "force-onto-foreign-folder": (
        lambda c: [*out_is_not_empty(c), "--force"], ["kdcli did not write (keep.txt)", "--force replaces only"]),
    "out-is-a-mount-point": (lambda c: c.distill(out="/proc"), ["is a mount point", "--out /proc/run"]),
    "out-in-use": (lambda c: out_in_use(c), [f"is in use by another kdcli run (pid {os.getpid()})"]),
    "interrupted-run-in-out": (
        lambda c: staged_checkpoint(c, {"position": {}}) or c.distill(),
        ["has an interrupted run", "--resume", "--force"]),
    "damaged-checkpoint": (
        lambda c: staged_checkpoint(c, {"position": {"stage": 0}}) or c.distill(None, "test_efficientnet", "--resume"),
        ["checkpoint", "is damaged", "'fingerprint' is missing", "--force"]),
    "usage-error": (
        lambda c: c.distill(None, "test_efficientnet", "--bogus"),
        ["no such option: --bogus", "usage: kdcli distill [OPTIONS] TEACHER STUDENT"]),
    "out-of-memory": (
        lambda c: ["inspect", "test_resnet", "--image-size", "200000"],
        ["at 200000x200000 needs more memory than this machine has", "smaller --image-size"]),
    # export
    "unknown-export-format": (
        lambda c: ["export", c.teacher, "--format", "onnx,int4", "--out", c.out],
        ["unknown export format 'int4'", "did you mean int8", "onnx, int8, fp16, bf16"]),
    "distill-export-unknown-format": (
        lambda c: c.distill(None, "test_efficientnet", "--export", "tflite"), ["--export tflite", "choose from"]),
    "empty-export-format": (
        lambda c: ["export", c.teacher, "--format", "", "--out", c.out], ["--format is empty", "choose from onnx"]),
    "int8-without-data": (
        lambda c: ["export", c.teacher, "--format", "int8", "--out", c.out], ["calibrates on training images", "--data"]),
    "export-gate-without-data": (
        lambda c: ["export", c.teacher, "--format", "onnx", "--out", c.out, "--min-top1", "50"],
        ["validation split", "pass --data"]),
    "onnx-without-metadata": (lambda c: onnx_without_metadata(c), ["no kdcli metadata", "kdcli export"]),
    # several teachers, a student from the teacher, ablate
    "teacher-weights-count": (
        lambda c: c.distill(None, "test_efficientnet", "--teacher", c.teacher, "--teacher-weights", "1,2,3"),
        ["--teacher-weights 1,2,3", "expected 2 non-negative numbers"]),
    "teacher-index-out-of-range": (
        lambda c: c.distill(None, "test_efficientnet", "--recipe", tapping_teacher_1(c)),
        ["reads the teacher.1", "there is 1 teacher", "--teacher"]),
    "init-from-teacher-nothing-fits": (
        lambda c: c.distill(None, "test_vit", "--init-from-teacher"),
        ["--init-from-teacher: no weight of the teacher (test_resnet) fits the student (test_vit)", "fewer blocks"]),
    "init-from-teacher-student-checkpoint": (
        lambda c: c.distill(None, c.teacher, "--init-from-teacher"),
        ["--init-from-teacher starts a fresh student", "architecture name"]),
    "ablate-unknown-cell": (lambda c: c.ablate("--cells", "kd,seq-tpc"), ["--cells: no cell 'seq-tpc'", "seq-tcp"]),
    "ablate-too-few-epochs": (lambda c: c.ablate("--epochs", "2"), ["--epochs 2 is too few", "--epochs 3 or more"]),
    "ablate-other-inputs": (
        lambda c: c.ablate("--epochs", "4", out=earlier_ablation(c)), ["holds an ablation with another epochs"]),
}


# Rows of docs/errors.md tested by a test of their own (module, test function) rather than in CASES.
ELSEWHERE = {
    "disk-full": ("test_errors", "test_disk_full_while_writing_leaves_nothing"),
    "resume-data-changed": ("test_resume", "test_resume_names_what_changed_in_the_data"),
    "missing-export-extra": ("test_export", "test_a_missing_extra_is_one_clear_line_before_any_work"),
    **{case: ("test_distributed", "test_bad_distributed_input_ends_every_process_alike")
       for case in ("batch-not-shared-evenly", "train-smaller-than-a-batch", "command-not-distributed",
                    "export-under-torchrun")},
    "missing-tensorboard": ("test_terminal", "test_log_tensorboard_without_the_package_is_one_line_before_any_work"),
    "precision-bf16-without-native-bf16": ("test_engine", "test_cuda_mixed_precision_uses_bf16_only_where_the_gpu_has_it"),
    "cache-entry-stale": ("test_cache", "test_cached_and_uncached_runs_on_the_same_views_train_the_same_student"),
}


def tapping_teacher_1(c):
    recipe = c.tmp / "tap1.yaml"
    stage = ("  - name: {}\n    epochs: 1\n    losses:\n"
             "      - {{method: rkd, teacher: 1, tap: {{student: penultimate, teacher: penultimate}}}}\n")
    recipe.write_text("name: tap1\nstages:\n" + stage.format("rkd") + stage.format("again"))
    return recipe


def earlier_ablation(c):
    """An ablation folder of the same inputs at 3 epochs (its marker, as kdcli writes it)."""
    import json

    from kdcli.jobs.ablate import MARKER, AblationInputs
    from kdcli.jobs.plan import ModelChoices
    from kdcli.training.recipe import load_recipe

    c.out.mkdir()
    earlier = AblationInputs([str(c.teacher)], None, "test_resnet", DATA, load_recipe("smskd"), 1, 3, ModelChoices())
    (c.out / MARKER).write_text(json.dumps(earlier.identity()))
    return c.out


@pytest.fixture
def call(tmp_path, teacher_dir):
    c = Call(tmp_path, teacher_dir)
    yield c
    if getattr(c, "lock", None) is not None:
        os.close(c.lock)


def _listing(path):
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes() if path.exists() else None


def _everything(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(cli, call, case):
    build, fragments = CASES[case]
    args = build(call)
    before = _everything(call.tmp)
    assert_one_clear_line(cli(*args), *fragments)
    assert _everything(call.tmp) == before  # nothing written, nothing left beside --out


def test_disk_full_while_writing_leaves_nothing(call, tmp_path):
    """A file-size limit makes every write past 64 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    limit = 64 * 1024
    code = (
        "import resource, sys; from kdcli.cli import main; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.exit(main(sys.argv[1:]))"
    )
    result = Watched([sys.executable, "-c", code, *call.distill()]).finish()
    assert_one_clear_line(result, "cannot write", "free space")
    assert not call.out.exists()


def test_the_docs_table_lists_exactly_the_tested_cases():
    table = (Path(__file__).parent.parent / "docs" / "errors.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert len(documented) == len(set(documented))
    assert set(documented) == set(CASES) | set(ELSEWHERE)
    tests = {path.stem: path.read_text(encoding="utf-8") for path in Path(__file__).parent.glob("test_*.py")}
    for case, (module, name) in ELSEWHERE.items():
        assert f"def {name}(" in tests[module], (case, module, name)
    assert len(documented) >= 25


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("eval", tmp_path / "missing.safetensors", "--data", DATA, "--debug")
    assert result.code == 2 and "Traceback" in result.err


@pytest.mark.parametrize("args, fragments", [
    (["no-such-command"], ["no such command 'no-such-command'", "usage: kdcli [OPTIONS] COMMAND"]),
    (["distill"], ["missing argument 'TEACHER'", "usage: kdcli distill [OPTIONS] TEACHER STUDENT"]),
    (["eval", "x.safetensors"], ["missing option '--data'", "see kdcli eval --help"]),
    (["eval", "x", "--data", DATA, "--batch-size", "many"], ["invalid value for '--batch-size'", "usage: kdcli eval"]),
    (["recipe", "check"], ["no such command 'check'", "usage: kdcli recipe"]),
], ids=["unknown-command", "missing-argument", "missing-option", "bad-value", "unknown-subcommand"])
def test_usage_errors_are_one_error_line_exit_2(cli, args, fragments):
    assert_one_clear_line(cli(*args), *fragments)


def test_no_arguments_prints_the_help(cli):
    result = cli()
    assert result.code == 0 and "distill" in result.out and "error" not in result.err
