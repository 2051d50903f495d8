"""PNG plots next to report.md: training curves across all stages, and a reliability diagram (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from kdcli.fsio import atomic_write

TRAINING_PNG = "training.png"
RELIABILITY_PNG = "reliability.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    plt = _pyplot()
    try:
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)


def training_plot(stages: list[dict], path: Path) -> None:
    """Validation top-1 and training loss per epoch, epochs numbered across stages, stage boundaries marked."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    epoch = 0
    for index, stage in enumerate(stages):
        xs = [epoch + r["epoch"] for r in stage["history"]]
        top.plot(xs, [r["val_top1"] for r in stage["history"]], marker="o", label=f"{index}: {stage['name']}")
        bottom.plot(xs, [r["train_loss"] for r in stage["history"]], marker="o")
        if index:
            for axis in (top, bottom):
                axis.axvline(epoch + 0.5, color="grey", linestyle="--", linewidth=1)
        epoch += stage["epochs"]
    top.set_ylabel("val top-1 (%)")
    bottom.set_ylabel("train loss")
    bottom.set_xlabel("epoch (all stages)")
    top.legend(loc="lower right", fontsize="small")
    top.set_title("Training across stages (dashed: stage boundaries)")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    _save(figure, path)


def reliability_plot(models: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against confidence per bin, one series per model ({role: reliability bins}); diagonal = calibrated."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for role, bins in models.items():
        filled = [b for b in bins if b["count"]]
        axis.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", label=role)
    if "student" in models:
        bins = models["student"]
        width = bins[0]["upper"] - bins[0]["lower"]
        axis.bar([b["lower"] for b in bins], [b["accuracy"] or 0 for b in bins], width=width, align="edge",
                 alpha=0.2, edgecolor="black", linewidth=0.5, label="student accuracy per bin")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (max softmax probability)")
    axis.set_ylabel("accuracy")
    axis.set_title("Reliability diagram (15 bins)")
    axis.legend(loc="upper left", fontsize="small")
    _save(figure, path)
