"""The KD methods, found by name through REGISTRY. Adding a method: one class + one line here + one test."""

from kdcli.methods.base import Method, MethodParams, Needs, StepInputs
from kdcli.methods.response import CrossEntropy, HintonKD

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        CrossEntropy,
        HintonKD,
    )
}

__all__ = ["REGISTRY", "Method", "MethodParams", "Needs", "StepInputs"]
