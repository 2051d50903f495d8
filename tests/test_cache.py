"""Stored teacher outputs (--cache): a cached run and an uncached run that see the same views train the same
student; an entry is reused across runs, and one recorded for other inputs is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA
from test_errors import assert_one_clear_line

KD = ["--recipe", "kd", "--set", "stages.0.epochs=2", "--set", "data.views=2", "--set", "data.batch_size=64",
      "--json"]


def student(out):
    return load_file(str(out / "student" / "model.safetensors"))


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_cached_and_uncached_runs_on_the_same_views_train_the_same_student(cli, tmp_path, teacher_dir):
    cache = tmp_path / "cache"
    plain = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", tmp_path / "plain", "--cache", "off",
                *KD)
    assert plain.code == 0, plain.err
    cached = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", tmp_path / "cached", "--cache", cache,
                 *KD)
    assert cached.code == 0, cached.err
    assert "stored outputs: off" in plain.err and f"stored outputs: {cache}" in cached.err
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and json.loads((entries[0] / "meta.json").read_text())["key"]["taps"] == []

    # The teacher's logits are stored in fp16: the students agree to that rounding, far closer than a run on
    # other views does (largest weight difference measured: 0.0024 here, 0.135 against a data.views=3 run).
    assert largest_difference(student(tmp_path / "plain"), student(tmp_path / "cached")) < 0.02
    losses = [[e["train_loss"] for e in run.json()["stages"][0]["history"]] for run in (plain, cached)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)

    # A second run with the same teacher, data and views reads the entry as stored: nothing is recomputed, and
    # the student is the cached run's bit for bit.
    written = (entries[0] / "meta.json").stat().st_mtime_ns
    again = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", tmp_path / "again", "--cache", cache,
                *KD)
    assert again.code == 0, again.err
    assert [p for p in cache.iterdir() if p.is_dir()] == entries
    assert (entries[0] / "meta.json").stat().st_mtime_ns == written
    assert largest_difference(student(tmp_path / "cached"), student(tmp_path / "again")) == 0

    # An entry whose recorded key is not the run's is refused, never read.
    meta = json.loads((entries[0] / "meta.json").read_text())
    meta["key"]["data"] = "something else"
    (entries[0] / "meta.json").write_text(json.dumps(meta))
    stale = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", tmp_path / "stale", "--cache", cache,
                *KD)
    assert_one_clear_line(stale, "stored outputs in", "another model, data set or views", "--cache off")
    assert not (tmp_path / "stale").exists()


def test_the_stored_views_are_the_views_the_student_sees():
    """With data.views: K every epoch shows one of K fixed views per image, the same images `of_views` stores
    outputs for, and a different draw in another epoch or stage; loader workers serve the same batches."""
    from kdcli.data import DataConfig, TrainView, open_data, train_loader

    view = TrainView(open_data("synthetic:train=64,val=16").train, DataConfig(32, (0.5,) * 3, (0.5,) * 3),
                     hflip=True, crop="pad", seed=0, views=3)
    draws = []
    for stage, epoch in ((0, 0), (0, 1), (1, 0)):
        for images, _, samples in train_loader(view, 16, order_seed=0, stage=stage, epoch=epoch, workers=0):
            ids = view.at(stage, epoch).view_ids(samples.tolist())
            assert set(ids) <= {0, 1, 2}
            assert torch.equal(images, view.of_views(samples.tolist(), ids))
        draws.append(view.at(stage, epoch).view_ids(list(range(64))))
    assert draws[0] != draws[1] and draws[0] != draws[2]
    in_workers = [images for images, _, _ in train_loader(view, 16, order_seed=0, stage=1, epoch=0, workers=2)]
    in_process = [images for images, _, _ in train_loader(view, 16, order_seed=0, stage=1, epoch=0, workers=0)]
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_process)) and len(in_workers) == 4


def test_without_random_augmentation_outputs_are_stored_by_default(cli, tmp_path, teacher_dir, monkeypatch):
    """No flip and no crop: every epoch shows each image itself, so --cache auto (the default) stores the
    teacher's outputs once; the student is the uncached run's to fp16 rounding of the teacher's logits."""
    monkeypatch.setenv("KDCLI_CACHE_DIR", str(tmp_path / "auto"))
    fixed = ["--recipe", "kd", "--set", "stages.0.epochs=2", "--set", "data.augment.hflip=false", "--set",
             "data.augment.crop=none", "--set", "data.batch_size=64", "--json"]
    plain = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", tmp_path / "plain", "--cache", "off",
                *fixed)
    cached = cli("distill", teacher_dir, "test_resnet", "--data", DATA, "--out", tmp_path / "cached", *fixed)
    assert plain.code == 0 and cached.code == 0, plain.err + cached.err
    assert f"stored outputs: {tmp_path / 'auto'}" in cached.err and "1 fixed per image" in cached.err
    assert len([p for p in (tmp_path / "auto").iterdir() if p.is_dir()]) == 1
    assert largest_difference(student(tmp_path / "plain"), student(tmp_path / "cached")) < 0.02
