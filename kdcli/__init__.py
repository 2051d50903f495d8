"""kdcli: compress timm image classifiers by sequential multi-stage knowledge distillation."""

__version__ = "0.1.0"
