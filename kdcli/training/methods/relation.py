"""Relation-based methods: they compare how samples of a batch relate to each other, in student and teacher.

Each reads one tap pair (default: the pooled penultimate embeddings) flattened to [B, D]; the widths of student
and teacher need not match. Losses are batch-level scalars (the engine's mean leaves them as they are).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdcli.training.methods.functional import as_float
from kdcli.training.methods.base import Method, Needs, StepInputs, TapPair, TappingParams, pairs_needs

PENULTIMATE_PAIR = {"student": "penultimate", "teacher": "penultimate"}


class _RelationMethod(Method):
    """Reads params.tap on both sides, flattened to [B, D] in float32; the teacher side carries no gradient."""

    def needs(self) -> Needs:
        return pairs_needs([self.params.tap], self.params.source)

    def embeddings(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        tap = self.params.tap
        e_s = as_float(step.student.features[tap.student]).flatten(1)
        e_t = as_float(step.sources[self.params.source].features[tap.teacher].detach()).flatten(1)
        return e_s, e_t


class RKDParams(TappingParams):
    method: Literal["rkd"] = "rkd"
    distance: float = Field(25.0, ge=0, description="weight of the distance term")
    angle: float = Field(50.0, ge=0, description="weight of the angle term")
    tap: TapPair = Field(default_factory=lambda: TapPair(**PENULTIMATE_PAIR), description="embeddings to relate")


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, B], zero diagonal, divided by the mean of the positive off-diagonal entries."""
    square = e.pow(2).sum(1)
    d = (square.unsqueeze(0) + square.unsqueeze(1) - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
    d = d.clone()
    d[range(len(e)), range(len(e))] = 0
    positive = d[d > 0]
    return d / positive.mean() if positive.numel() else d


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at i between j and k, for all B^3 triples: <normalize(e_j - e_i), normalize(e_k - e_i)>."""
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(u, u.transpose(1, 2)).flatten()


class RKD(_RelationMethod):
    """Park et al. 2019: distance·smoothL1(d_s, d_t) + angle·smoothL1(angle_s, angle_t) on embeddings."""

    name = "rkd"
    summary = "relational KD: pairwise distances and triplet angles of the batch's embeddings"
    Params = RKDParams

    def forward(self, step: StepInputs) -> torch.Tensor:
        e_s, e_t = self.embeddings(step)
        loss = e_s.new_zeros(())
        if self.params.distance:
            with torch.no_grad():
                d_t = pairwise_distances(e_t)
            loss = loss + self.params.distance * F.smooth_l1_loss(pairwise_distances(e_s), d_t)
        if self.params.angle:
            with torch.no_grad():
                a_t = triplet_angles(e_t)
            loss = loss + self.params.angle * F.smooth_l1_loss(triplet_angles(e_s), a_t)
        return loss


class SPParams(TappingParams):
    method: Literal["sp"] = "sp"
    weight: float = Field(3000.0, ge=0, description="multiplies this loss in the stage's sum")
    tap: TapPair = Field(
        default_factory=lambda: TapPair(student="feature:-1", teacher="feature:-1"),
        description="features whose batch similarity is preserved (last stage map, before pooling)",
    )


def similarity(features: torch.Tensor) -> torch.Tensor:
    """Row-L2-normalised batch Gram matrix of flattened features: normalize(F F^T), [B, B]."""
    return F.normalize(features @ features.t(), p=2, dim=1)


class SimilarityPreserving(_RelationMethod):
    """Tung & Mori 2019: ‖G_t − G_s‖²_F / B² with G = normalize_rows(F·Fᵀ)."""

    name = "sp"
    summary = "similarity-preserving: batch similarity matrices of student and teacher features"
    Params = SPParams

    def forward(self, step: StepInputs) -> torch.Tensor:
        e_s, e_t = self.embeddings(step)
        return (similarity(e_t) - similarity(e_s)).pow(2).sum() / len(e_s) ** 2


class PKTParams(TappingParams):
    method: Literal["pkt"] = "pkt"
    weight: float = Field(30000.0, ge=0, description="multiplies this loss in the stage's sum")
    tap: TapPair = Field(default_factory=lambda: TapPair(**PENULTIMATE_PAIR), description="embeddings to relate")


def cosine_distribution(e: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Rows of ((cos-similarity + 1) / 2), each normalised to sum 1, [B, B]."""
    e = e / (e.pow(2).sum(1, keepdim=True).sqrt() + eps)
    e = torch.nan_to_num(e, nan=0.0)
    s = (e @ e.t() + 1) / 2
    return s / s.sum(1, keepdim=True)


class PKT(_RelationMethod):
    """Passalis & Tefas 2018: mean over B² of t·log((t + eps)/(s + eps)) between cosine distributions."""

    name = "pkt"
    summary = "probabilistic KT: KL between the batch's cosine-similarity distributions"
    Params = PKTParams

    def forward(self, step: StepInputs) -> torch.Tensor:
        e_s, e_t = self.embeddings(step)
        eps = 1e-7
        t, s = cosine_distribution(e_t, eps), cosine_distribution(e_s, eps)
        return (t * torch.log((t + eps) / (s + eps))).mean()
