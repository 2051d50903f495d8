"""Data sources read from disk: CIFAR python folders (pickled batches, read with numpy arrays only admitted)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import torch

from test_errors import assert_one_clear_line


def _write_batch(path, content: dict) -> None:
    # The official archive was pickled by numpy 1.x, which names numpy.core, not numpy 2's numpy._core.
    path.write_bytes(pickle.dumps(content, protocol=2).replace(b"numpy._core", b"numpy.core"))


def cifar10_folder(root, per_batch=16):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        _write_batch(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                     b"filenames": [b"x.png"] * per_batch})
    _write_batch(folder / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)],
                                           b"num_vis": 3072})
    return folder


def test_cifar10_python_folder_trains_through_the_cli(cli, tmp_path):
    cifar10_folder(tmp_path / "data")
    out = tmp_path / "run"
    result = cli("train", "test_resnet", "--data", tmp_path / "data", "--epochs", "1", "--out", out, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert "CIFAR" in report["run"]["data"] and "80 train / 16 val, 10 classes" in report["run"]["data"]
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"][:2] == ["class0", "class1"] and config["pretrained_cfg"]["input_size"] == [3, 32, 32]


class _Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_cifar_batch_that_holds_code_is_refused(cli, tmp_path):
    folder = cifar10_folder(tmp_path / "data")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Payload()}, protocol=2))
    result = cli("train", "test_resnet", "--data", tmp_path / "data", "--epochs", "1", "--out", tmp_path / "run")
    assert_one_clear_line(result, "cannot read CIFAR batch", "data_batch_3", "print from a CIFAR batch")
    assert "this would have run" not in result.out + result.err
    assert not (tmp_path / "run").exists()


def test_images_decoded_once_give_the_views_decoded_at_every_step(tmp_path):
    """Decoding once (uint8 in memory) changes nothing a model sees: every crop of an ImageFolder with mixed
    sizes is the same as when each image is decoded from its file at every step (a memory budget of 0)."""
    from PIL import Image

    from kdcli.data import DataConfig, TrainView, open_data

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, size in enumerate([(40, 40), (48, 32), (32, 32), (36, 44)]):
            folder = tmp_path / split / f"c{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{index}.png")
    train = open_data(str(tmp_path)).train
    config = DataConfig(32, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25), crop_pct=0.875)
    for crop in ("pad", "resized", "none"):
        decoded = TrainView(train, config, hflip=True, crop=crop, seed=1).at(1, 2)
        from_files = TrainView(train, config, hflip=True, crop=crop, seed=1, memory_budget=0).at(1, 2)
        assert decoded.pixels.in_memory and not from_files.pixels.in_memory
        images, labels, samples = decoded.__getitems__([3, 0, 2])
        assert images.shape == (3, 3, 32, 32) and labels.tolist() == [1, 0, 1] and samples.tolist() == [3, 0, 2]
        assert torch.equal(images, from_files.__getitems__([3, 0, 2])[0]), crop


def test_workers_auto_is_none_for_images_in_memory_and_can_be_set(cli):
    plan = cli("train", "test_resnet", "--data", "synthetic:train=64,val=16", "--dry-run", "--json").json()["plan"]
    assert plan["pipeline"]["workers"] == 0 and plan["pipeline"]["decoded"].startswith("once, in memory")
    assert plan["pipeline"]["views"] == "fresh every epoch" and plan["pipeline"]["cache"] == "off"
    plan = cli("train", "test_resnet", "--data", "synthetic:train=64,val=16", "--workers", "2", "--dry-run",
               "--json").json()["plan"]
    assert plan["pipeline"]["workers"] == 2
