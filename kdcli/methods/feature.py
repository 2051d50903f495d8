"""Feature-based methods: they read intermediate features of student and teacher at tap pairs.

Features arrive normalised by kdcli.taps: [B, C, H, W] maps, [B, N, C] tokens (ViT blocks), [B, C] vectors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdcli.errors import KdcliError
from kdcli.methods.base import Method, MethodParams, Needs, StepInputs, TapPair, pairs_needs


def _kind(shape: torch.Size) -> str:
    return {4: "map", 3: "tokens", 2: "vector"}.get(len(shape), f"{len(shape)}-d tensor")


def match_spatial(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a [B, C, H, W] map to size: adaptive average pooling when larger, bilinear when smaller."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


def _default_pairs(*indices: int) -> list[TapPair]:
    return [TapPair(student=f"feature:{i}", teacher=f"feature:{i}") for i in indices]


class FitNetsParams(MethodParams):
    method: Literal["fitnets"] = "fitnets"
    weight: float = Field(100.0, ge=0, description="multiplies this loss in the stage's sum")
    pairs: list[TapPair] = Field(
        default_factory=lambda: _default_pairs(-2), min_length=1,
        description="student/teacher tap pairs; several pairs summed = patient KD",
    )


class FitNets(Method):
    """Romero et al. 2015: mean squared error between connector(f_s) and f_t, summed over the tap pairs.

    Connector per pair: maps -> 1x1 conv + BN to the teacher's channels, then the student map is resized to the
    teacher's (pooling if larger, bilinear if smaller); tokens (same count) or vectors -> linear layer (+ BN for
    vectors). The connectors train with the student and are saved in training checkpoints, never exported.
    """

    name = "fitnets"
    summary = "FitNets hints: MSE(connector(student feature), teacher feature) at one or several tap pairs"
    Params = FitNetsParams

    def __init__(self, params: FitNetsParams):
        super().__init__(params)
        self.connectors = nn.ModuleList()

    def needs(self) -> Needs:
        return pairs_needs(self.params.pairs)

    def setup(self, student_shapes, teacher_shapes) -> None:
        self.connectors = nn.ModuleList()
        for pair in self.params.pairs:
            s, t = student_shapes[pair.student], teacher_shapes[pair.teacher]
            what = f"fitnets pair {pair.student} -> {pair.teacher}"
            if len(s) != len(t) or len(s) not in (2, 3, 4):
                raise KdcliError(
                    f"{what}: cannot match student {_kind(s)} {list(s[1:])} to teacher {_kind(t)} {list(t[1:])}; "
                    "pair features of the same kind (maps with maps, tokens with tokens, or penultimate on both)"
                )
            if len(s) == 4:
                self.connectors.append(nn.Sequential(nn.Conv2d(s[1], t[1], 1, bias=False), nn.BatchNorm2d(t[1])))
            elif len(s) == 3:
                if s[1] != t[1]:
                    raise KdcliError(
                        f"{what}: the student has {s[1]} tokens and the teacher {t[1]}; pick blocks with the same "
                        "token count, or tap penultimate on both"
                    )
                self.connectors.append(nn.Linear(s[2], t[2]))
            else:
                self.connectors.append(nn.Sequential(nn.Linear(s[1], t[1], bias=False), nn.BatchNorm1d(t[1])))

    def forward(self, step: StepInputs) -> torch.Tensor:
        total = 0.0
        for pair, connector in zip(self.params.pairs, self.connectors):
            f_t = step.teacher_features[pair.teacher].float()
            f_s = connector(step.student_features[pair.student].float())
            if f_s.dim() == 4:
                f_s = match_spatial(f_s, tuple(f_t.shape[-2:]))
            total = total + (f_s - f_t).pow(2).flatten(1).mean(1)
        return total


class AttentionParams(MethodParams):
    method: Literal["at"] = "at"
    weight: float = Field(1000.0, ge=0, description="multiplies this loss in the stage's sum")
    p: float = Field(2.0, gt=0, description="exponent of |f| before the channel mean")
    pairs: list[TapPair] = Field(
        default_factory=lambda: _default_pairs(-3, -2), min_length=1,
        description="student/teacher tap pairs of spatial maps (inner stage outputs)",
    )


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """L2-normalised spatial attention of a [B, C, H, W] map: normalize(mean_c |f|^p), flattened, [B, H*W]."""
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionTransfer(Method):
    """Zagoruyko & Komodakis 2017: per pair, mean over H*W of (a_s - a_t)^2 with a = normalize(mean_c |f|^p);
    the larger map is average-pooled to the smaller one first. Per-sample, summed over pairs."""

    name = "at"
    summary = "attention transfer: spatial attention maps of student and teacher at tap pairs (CNN maps only)"
    Params = AttentionParams

    def needs(self) -> Needs:
        return pairs_needs(self.params.pairs)

    def setup(self, student_shapes, teacher_shapes) -> None:
        for pair in self.params.pairs:
            for side, key, shape in (("student", pair.student, student_shapes[pair.student]),
                                     ("teacher", pair.teacher, teacher_shapes[pair.teacher])):
                if len(shape) != 4:
                    raise KdcliError(
                        f"at: the {side} tap {key} gives {_kind(shape)} {list(shape[1:])}, not a spatial map; "
                        "attention transfer needs CNN feature maps on both sides (for a ViT use fitnets, rkd, sp "
                        "or pkt, e.g. on penultimate)"
                    )

    def forward(self, step: StepInputs) -> torch.Tensor:
        total = 0.0
        for pair in self.params.pairs:
            f_s, f_t = step.student_features[pair.student], step.teacher_features[pair.teacher]
            size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
            a_s = attention_map(match_spatial(f_s.float(), size), self.params.p)
            a_t = attention_map(match_spatial(f_t.float(), size), self.params.p)
            total = total + (a_s - a_t).pow(2).mean(1)
        return total
