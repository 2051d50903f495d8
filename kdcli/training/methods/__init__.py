"""The KD methods, found by name through REGISTRY. Adding a method: one class + one line here + one test."""

from kdcli.training.methods.base import Method, MethodParams, Needs, StepInputs, Tap, TapPair
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
    )
}

__all__ = ["REGISTRY", "Method", "MethodParams", "Needs", "StepInputs", "Tap", "TapPair"]
