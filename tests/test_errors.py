"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import yaml

from conftest import DATA


def assert_one_clear_line(result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


FAST = ["--recipe", "kd-anchored", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1"]


class Call:
    """Argument lists of kdcli calls around one tmp folder and the session's teacher."""

    def __init__(self, tmp, teacher):
        self.tmp, self.teacher, self.out = tmp, teacher, tmp / "out"

    def distill(self, teacher=None, student="test_efficientnet", *extra, data=DATA):
        return ["distill", teacher or self.teacher, student, "--data", data, "--out", self.out, *FAST, *extra]

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

        from kdcli.checkpoint import LoadedModel, save_timm_folder
        from kdcli.data import DataConfig

        folder = self.tmp / f"teacher{classes}"
        model = timm.create_model("test_resnet", num_classes=classes)
        save_timm_folder(folder, LoadedModel(model, "test_resnet", classes), DataConfig(32, (0.5,) * 3, (0.5,) * 3), None)
        return folder


# case: (argument list, fragments the one line must contain)
CASES = {
    "missing teacher": (lambda c: c.distill(c.tmp / "nope.safetensors"), ["does not exist", ".safetensors"]),
    "folder without weights": (lambda c: c.distill(c.folder("empty")), ["has no model.safetensors"]),
    "pickle teacher": (lambda c: c.distill(c.file("teacher.pth", b"\x80\x02")), ["pickle", "kdcli convert"]),
    "corrupt safetensors": (
        lambda c: c.distill(c.file("bad.safetensors", b"\xff" * 16)), ["not a readable safetensors file"]),
    "unknown student arch": (
        lambda c: c.distill(None, "mobilenetv2_05"), ["unknown timm architecture", "mobilenetv2_050"]),
    "no arch anywhere": (lambda c: c.distill(c.bare_weights()), ["cannot tell its architecture", "--teacher-arch"]),
    "weights do not fit arch": (
        lambda c: c.distill(c.bare_weights(), "test_efficientnet", "--teacher-arch", "resnet18"),
        ["does not fit resnet18", "fc.weight"]),
    "teacher/data class mismatch": (
        lambda c: c.distill(c.teacher_with_classes(7)), ["teacher has 7 classes", "data has 10"]),
    "student/teacher class mismatch": (
        lambda c: c.distill(None, c.teacher_with_classes(7)), ["student has 7 classes", "teacher has 10"]),
    "first-stage anchor, random student": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.anchor.weighting=tcp"),
        ["first stage", "randomly initialised"]),
    "bad --set path": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.epoks=1"), ["did you mean epochs"]),
    "recipe value error": (
        lambda c: c.distill(None, "test_efficientnet", "--set", "stages.0.epochs=-2"), ["stages.0.epochs"]),
    "unknown recipe": (
        lambda c: c.distill(None, "test_efficientnet", "--recipe", "nope.yaml"), ["no recipe 'nope.yaml'"]),
    "missing data": (lambda c: c.distill(data=str(c.tmp / "nodata")), ["data folder", "does not exist"]),
    "no cuda": (lambda c: c.distill(None, "test_efficientnet", "--device", "cuda"), ["no CUDA device"]),
}


@pytest.fixture
def call(tmp_path, teacher_dir):
    return Call(tmp_path, teacher_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(cli, call, case):
    build, fragments = CASES[case]
    assert_one_clear_line(cli(*build(call)), *fragments)
    assert not call.out.exists()


def test_out_not_empty_is_refused_without_force(cli, call):
    call.out.mkdir()
    (call.out / "keep.txt").write_text("mine")
    assert_one_clear_line(cli(*call.distill()), "not empty", "--force")
    assert [p.name for p in call.out.iterdir()] == ["keep.txt"]


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("eval", tmp_path / "missing.safetensors", "--data", DATA, "--debug")
    assert result.code == 2 and "Traceback" in result.err


def test_usage_errors_exit_2(cli):
    assert cli("distill").code == 2
    assert cli("no-such-command").code == 2


def test_recipe_file_with_unknown_key(cli, call):
    path = call.tmp / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "a", "epochs": 1, "losses": [{"method": "kd"}], "anchr": {}}]}))
    args = ["distill", call.teacher, "test_efficientnet", "--data", DATA, "--out", call.out, "--recipe", path]
    assert_one_clear_line(cli(*args), "stages.0.anchr: unknown key", "did you mean anchor")
