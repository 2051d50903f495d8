"""Start a student from its teacher's weights (DistilBERT's initialisation, Sanh et al. 2019): a student of the
same family with fewer blocks takes every other block of the teacher, and the stem and head where they fit.

Block sequences are the numbered containers (nn.Sequential / nn.ModuleList: a ResNet's layer1..4, a ViT's or an
EfficientNet's `blocks`) found at the same path in both models; when the teacher's holds more blocks, student
block i takes teacher block i·n_teacher // n_student (12 → 6: 0, 2, 4, ..., 10; 3 → 2: 0, 1), so the first block
of a stage, which changes width or stride, comes from the teacher's first. Every other tensor is copied from the
same name. A tensor is copied only when the teacher has it with the same shape; the rest keep their fresh init.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcli.errors import KdcliError

SHOWN = 4  # examples of tensors left at their fresh init, in the summary


def _sequences(student: nn.Module, teacher: nn.Module) -> dict[str, tuple[int, int]]:
    """{path: (student blocks, teacher blocks)} of the numbered containers where the teacher has more blocks."""
    teacher_modules = dict(teacher.named_modules())
    found = {}
    for path, module in student.named_modules():
        theirs = teacher_modules.get(path)
        if (isinstance(module, (nn.Sequential, nn.ModuleList)) and type(theirs) is type(module)
                and 0 < len(module) < len(theirs)):
            found[path] = (len(module), len(theirs))
    return found


def _teacher_key(key: str, sequences: dict[str, tuple[int, int]]) -> str:
    """The teacher's name for a student tensor: block indices inside mapped sequences translated."""
    parts = key.split(".")
    for position in range(len(parts) - 1):
        path = ".".join(parts[:position])
        if path in sequences and parts[position].isdigit():
            mine, theirs = sequences[path]
            parts[position] = str(int(parts[position]) * theirs // mine)
    return ".".join(parts)


def init_from_teacher(student: nn.Module, teacher: nn.Module, student_arch: str, teacher_arch: str) -> dict:
    """Copy what fits from teacher into student (in place); returns what was copied, for the plan and report."""
    sequences = _sequences(student, teacher)
    theirs = teacher.state_dict()
    mine = student.state_dict()
    copied, kept = [], []
    with torch.no_grad():
        for key, tensor in mine.items():
            source = theirs.get(_teacher_key(key, sequences))
            if source is not None and source.shape == tensor.shape:
                tensor.copy_(source)
                copied.append(key)
            else:
                kept.append(key)
    weights = [key for key in copied if mine[key].dim() >= 2]
    if not weights:
        raise KdcliError(
            f"--init-from-teacher: no weight of the teacher ({teacher_arch}) fits the student ({student_arch}): "
            "no layer has the same name and shape; use a student of the teacher's family with fewer blocks "
            "(e.g. resnet34 -> resnet18, a ViT of depth 12 -> depth 6), or drop --init-from-teacher"
        )
    parameters = dict(student.named_parameters())
    params = sum(mine[key].numel() for key in copied if key in parameters)
    total = sum(p.numel() for p in student.parameters())
    blocks = {path: ", ".join(f"{i}←{i * n_t // n_s}" for i in range(n_s))
              for path, (n_s, n_t) in sequences.items()}
    return {
        "teacher": teacher_arch,
        "tensors_copied": len(copied),
        "tensors": len(mine),
        "params_copied": params,
        "params": total,
        "blocks": blocks,  # student block ← teacher block, per sequence with fewer blocks
        "kept_fresh": kept[:SHOWN] + ([f"... {len(kept) - SHOWN} more"] if len(kept) > SHOWN else []),
    }


def describe(summary: dict) -> str:
    """'from teacher resnet34: 102 of 122 tensors (98.1% of parameters); layer1 0←0, 1←2; ...'"""
    share = 100 * summary["params_copied"] / max(summary["params"], 1)
    blocks = "; ".join(f"{path} {pairs}" for path, pairs in summary["blocks"].items())
    return (f"from teacher {summary['teacher']}: {summary['tensors_copied']} of {summary['tensors']} tensors "
            f"({share:.1f}% of parameters)" + (f"; blocks {blocks}" if blocks else ""))
