"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from conftest import DATA, Result


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


def incomplete_cifar(c):
    folder = c.folder("cifar-10-batches-py")
    (folder / "data_batch_1").write_bytes(b"")
    return c.distill(data=str(c.tmp))


# id: (argument list, fragments the one line must contain). docs/errors.md lists the same ids.
CASES = {
    # checkpoints
    "missing-file": (lambda c: c.distill(c.tmp / "nope.safetensors"), ["does not exist", ".safetensors"]),
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
        ["no better than chance", "class folders", "--teacher-mean", "--allow-weak-teacher"]),
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
        ["stage 'kd' epoch 1 step ", "is not finite; lower the learning rate or that term's weight"]),
    "image-size-too-small": (
        lambda c: c.distill(None, "test_vit", "--set", "data.image_size=8"), ["cannot take 8x8", "data.image_size"]),
    # data
    "missing-data": (lambda c: c.distill(data=str(c.tmp / "nodata")), ["data folder", "does not exist"]),
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
    "bad-synthetic-spec": (lambda c: c.distill(data="synthetic:train=x"), ["synthetic:train=N,val=M"]),
    # output and machine
    "out-not-empty": (lambda c: out_is_not_empty(c), ["not empty", "--force"]),
    "out-is-a-file": (lambda c: out_is_a_file(c), ["is a file"]),
    "out-not-writable": (
        lambda c: c.distill(out="/sys/kdcli-out"), ["cannot write in /sys", "choose another folder"]),
    "bad-workers": (lambda c: c.distill(None, "test_efficientnet", "--workers", "many"), ["--workers many", "auto"]),
    "cache-without-views": (
        lambda c: c.distill(None, "test_efficientnet", "--cache", c.tmp / "cache"), ["need fixed views", "data.views"]),
    "cache-is-a-file": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "data.views=2", "--cache", c.file("cache")),
        ["is a file", "--cache"]),
    "nothing-to-resume": (lambda c: c.distill(None, "test_efficientnet", "--resume"), ["nothing to resume"]),
    "no-cuda": (lambda c: c.distill(None, "test_efficientnet", "--device", "cuda"), ["no CUDA device"]),
}


@pytest.fixture
def call(tmp_path, teacher_dir):
    return Call(tmp_path, teacher_dir)


def _listing(path):
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else path.read_bytes() if path.exists() else None


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(cli, call, case):
    build, fragments = CASES[case]
    args = build(call)
    before = _listing(call.out)
    assert_one_clear_line(cli(*args), *fragments)
    assert _listing(call.out) == before


def test_disk_full_while_writing_leaves_nothing(call, tmp_path):
    """A file-size limit makes every write past 64 KiB fail with EFBIG, as a full disk fails with ENOSPC."""
    limit = 64 * 1024
    code = (
        "import resource, sys; from kdcli.cli import main; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.exit(main(sys.argv[1:]))"
    )
    args = [str(a) for a in call.distill()]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert_one_clear_line(Result(result.returncode, result.stdout, result.stderr), "cannot write", "free space")
    assert not call.out.exists()


def test_the_docs_table_lists_exactly_the_tested_cases():
    table = (Path(__file__).parent.parent / "docs" / "errors.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert len(documented) == len(set(documented))
    assert set(documented) == set(CASES) | {"disk-full", "cache-entry-stale"}  # the last in test_cache.py
    assert len(documented) >= 25


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("eval", tmp_path / "missing.safetensors", "--data", DATA, "--debug")
    assert result.code == 2 and "Traceback" in result.err


def test_usage_errors_exit_2(cli):
    assert cli("distill").code == 2
    assert cli("no-such-command").code == 2
