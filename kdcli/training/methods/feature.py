"""Feature-based methods: they read intermediate features of student and teacher at tap pairs.

Features arrive normalised by kdcli.models.taps: [B, C, H, W] maps (`feature:N` taps of every family, a ViT's
patch tokens included), [B, N, C] tokens (`module:` taps of transformer blocks), [B, C] vectors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdcli.errors import KdcliError
from kdcli.training.methods.functional import as_float
from kdcli.training.methods.base import (
    STUDENT, Method, Needs, StepInputs, TapPair, TappingParams, pairs_needs,
)


def _kind(shape: torch.Size) -> str:
    return {4: "map", 3: "tokens", 2: "vector"}.get(len(shape), f"{len(shape)}-d tensor")


def match_spatial(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a [B, C, H, W] map to size: adaptive average pooling when larger, bilinear when smaller."""
    if tuple(feature.shape[-2:]) == tuple(size):
        return feature
    if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature, size)
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)


def pool_to_vector(feature: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> mean over H, W; [B, N, C] -> mean over tokens; [B, C] as is."""
    if feature.dim() == 4:
        return feature.mean((2, 3))
    return feature.mean(1) if feature.dim() == 3 else feature


def _default_pairs(*indices: int) -> list[TapPair]:
    return [TapPair(student=f"feature:{i}", teacher=f"feature:{i}") for i in indices]


class FitNetsParams(TappingParams):
    method: Literal["fitnets"] = "fitnets"
    weight: float = Field(100.0, ge=0, description="multiplies this loss in the stage's sum")
    pairs: list[TapPair] = Field(
        default_factory=lambda: _default_pairs(-2), min_length=1,
        description="student/teacher tap pairs; several pairs summed = patient KD",
    )


class FitNets(Method):
    """Romero et al. 2015: mean squared error between connector(f_s) and f_t, summed over the tap pairs.

    Connector per pair: maps -> 1x1 conv + BN to the teacher's channels, then the student map is resized to the
    teacher's (pooling if larger, bilinear if smaller); tokens (same count) -> linear layer; vectors -> linear + BN.
    Features of different kinds (a ViT block's tokens against a CNN's map, or different token counts) are both averaged
    to [B, C] vectors first (over positions / tokens), then linear + BN: a pooled hint. The connectors train
    with the student and are saved in training checkpoints, never exported.
    """

    name = "fitnets"
    summary = "FitNets hints: MSE(connector(student feature), teacher feature) at one or several tap pairs"
    Params = FitNetsParams

    def __init__(self, params: FitNetsParams):
        super().__init__(params)
        self.connectors = nn.ModuleList()
        self.pooled: list[bool] = []

    def needs(self) -> Needs:
        return pairs_needs(self.params.pairs, self.params.source)

    def setup(self, shapes) -> None:
        self.connectors = nn.ModuleList()
        self.pooled = []
        for pair in self.params.pairs:
            s, t = shapes[STUDENT][pair.student], shapes[self.params.source][pair.teacher]
            what = f"fitnets pair {pair.student} -> {pair.teacher}"
            if len(s) not in (2, 3, 4) or len(t) not in (2, 3, 4):
                raise KdcliError(f"{what}: cannot use a {_kind(s)} or {_kind(t)}; tap a feature map, tokens or penultimate")
            pooled = len(s) != len(t) or (len(s) == 3 and s[1] != t[1])
            self.pooled.append(pooled)
            if pooled:  # different kinds (ViT tokens vs CNN map): compare the pooled vectors
                c_s, c_t = (shape[-1] if len(shape) == 3 else shape[1] for shape in (s, t))
                self.connectors.append(nn.Sequential(nn.Linear(c_s, c_t, bias=False), nn.BatchNorm1d(c_t)))
            elif len(s) == 4:
                self.connectors.append(nn.Sequential(nn.Conv2d(s[1], t[1], 1, bias=False), nn.BatchNorm2d(t[1])))
            elif len(s) == 3:
                self.connectors.append(nn.Linear(s[2], t[2]))
            else:
                self.connectors.append(nn.Sequential(nn.Linear(s[1], t[1], bias=False), nn.BatchNorm1d(t[1])))

    def forward(self, step: StepInputs) -> torch.Tensor:
        total = 0.0
        for pair, connector, pooled in zip(self.params.pairs, self.connectors, self.pooled):
            f_t = as_float(step.sources[self.params.source].features[pair.teacher])
            f_s = as_float(step.student.features[pair.student])
            if pooled:
                f_t, f_s = pool_to_vector(f_t), pool_to_vector(f_s)
            f_s = as_float(connector(f_s))
            if f_s.dim() == 4:
                f_s = match_spatial(f_s, tuple(f_t.shape[-2:]))
            total = total + (f_s - f_t).pow(2).flatten(1).mean(1)
        return total


class AttentionParams(TappingParams):
    method: Literal["at"] = "at"
    weight: float = Field(1000.0, ge=0, description="multiplies this loss in the stage's sum")
    p: float = Field(2.0, gt=0, description="exponent of |f| before the channel mean")
    pairs: list[TapPair] = Field(
        default_factory=lambda: _default_pairs(-3, -2), min_length=1,
        description="student/teacher tap pairs of spatial maps (inner stage outputs)",
    )


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """L2-normalised spatial attention of a [B, C, H, W] map: normalize(mean_c |f|^p), flattened, [B, H*W]."""
    return F.normalize(as_float(feature).abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionTransfer(Method):
    """Zagoruyko & Komodakis 2017: per pair, mean over H*W of (a_s - a_t)^2 with a = normalize(mean_c |f|^p);
    the larger map is average-pooled to the smaller one first. Per-sample, summed over pairs."""

    name = "at"
    summary = "attention transfer: spatial attention maps of student and teacher at tap pairs (feature maps)"
    Params = AttentionParams

    def needs(self) -> Needs:
        return pairs_needs(self.params.pairs, self.params.source)

    def setup(self, shapes) -> None:
        for pair in self.params.pairs:
            for side, key in ((STUDENT, pair.student), (self.params.source, pair.teacher)):
                shape = shapes[side][key]
                if len(shape) != 4:
                    raise KdcliError(
                        f"at: the {side} tap {key} gives {_kind(shape)} {list(shape[1:])}, not a spatial map; "
                        "attention transfer needs feature maps on both sides: tap {feature: N} (a ViT's patch "
                        "tokens come as a map there), not a module's tokens or vectors"
                    )

    def forward(self, step: StepInputs) -> torch.Tensor:
        total = 0.0
        for pair in self.params.pairs:
            f_s, f_t = step.student.features[pair.student], step.sources[self.params.source].features[pair.teacher]
            size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
            a_s = attention_map(match_spatial(as_float(f_s), size), self.params.p)
            a_t = attention_map(match_spatial(as_float(f_t), size), self.params.p)
            total = total + (a_s - a_t).pow(2).mean(1)
        return total
