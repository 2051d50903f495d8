"""Data sources read from disk: CIFAR python folders (pickled batches, read with numpy arrays only admitted)."""

from __future__ import annotations

import json
import pickle

import numpy as np

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
