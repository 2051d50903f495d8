"""The commands' work, without printing: what `distill`, `train`, `eval` and `demo` do, phase by phase."""
