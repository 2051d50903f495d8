"""The KD methods, found by name through REGISTRY. Adding a method: one class + one line here + one test."""

from kdcli.training.methods.anchor import Anchor, AnchorFields, AnchorParams
from kdcli.training.methods.base import (
    REFERENCE, STUDENT, TEACHER, Method, MethodParams, Needs, Outputs, Reads, StepInputs, Tap, TapPair, merge_needs,
)
from kdcli.training.methods.feature import AttentionTransfer, FitNets
from kdcli.training.methods.relation import PKT, RKD, SimilarityPreserving
from kdcli.training.methods.response import DKD, CrossEntropy, HintonKD, StandardisedKD

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        CrossEntropy,
        HintonKD,
        DKD,
        StandardisedKD,
        FitNets,
        AttentionTransfer,
        RKD,
        SimilarityPreserving,
        PKT,
        Anchor,
    )
}

__all__ = ["REFERENCE", "REGISTRY", "STUDENT", "TEACHER", "AnchorFields", "AnchorParams", "Method", "MethodParams",
           "Needs", "Outputs", "Reads", "StepInputs", "Tap", "TapPair", "merge_needs"]
