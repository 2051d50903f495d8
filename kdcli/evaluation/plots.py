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


def training_plot(stages: list[dict], path: Path, references: dict[str, float | None] | None = None) -> None:
    """Validation top-1 and the training loss per epoch, epochs numbered across stages, stage boundaries marked;
    each loss term drawn on its own (a stage that adds a term shows where the total jumps); references: top-1 lines
    to compare with ({"teacher": 71.2, "baseline": 65.0})."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
    epoch, totals, terms = 0, [], {}
    for index, stage in enumerate(stages):
        xs = [epoch + r["epoch"] for r in stage["history"]]
        top.plot(xs, [r["val_top1"] for r in stage["history"]], marker="o", label=f"stage {index + 1}: {stage['name']}")
        for record, x in zip(stage["history"], xs):
            totals.append((x, record["train_loss"]))
            for name, value in record["terms"].items():
                terms.setdefault(name, []).append((x, value))
        if index:
            for axis in (top, bottom):
                axis.axvline(epoch + 0.5, color="grey", linestyle="--", linewidth=1)
        epoch += stage["epochs"]
    for (role, value), style in zip((references or {}).items(), (":", "-.")):
        if value is not None:
            top.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{role} {value:.2f}%")
    bottom.plot(*zip(*totals), color="black", marker="o", label="total")
    if len(terms) > 1:
        for name, points in terms.items():
            bottom.plot(*zip(*points), marker=".", linestyle="--", label=name)
    top.set_ylabel("val top-1 (%)")
    bottom.set_ylabel("train loss (weighted terms)")
    bottom.set_xlabel("epoch (all stages)")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    top.legend(loc="lower right", fontsize="small")
    bottom.legend(loc="upper right", fontsize="small")
    top.set_title("Training across stages (dashed: stage boundaries)")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    _save(figure, path)


def reliability_plot(models: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against confidence per bin (%), one series per model ({role: reliability bins}), diagonal =
    calibrated; below it, how many images each bin holds (a bin of a few images is noise, not miscalibration)."""
    plt = _pyplot()
    figure, (axis, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, height_ratios=(3, 1))
    axis.plot([0, 100], [0, 100], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for role, bins in models.items():
        filled = [b for b in bins if b["count"]]
        axis.plot([100 * b["confidence"] for b in filled], [100 * b["accuracy"] for b in filled], marker="o",
                  label=role)
    some = next(iter(models.values()))
    width = 100 * (some[0]["upper"] - some[0]["lower"])
    for n, (role, bins) in enumerate(models.items()):
        share = width / len(models)
        counts.bar([100 * b["lower"] + n * share for b in bins], [b["count"] for b in bins], width=share, align="edge",
                   label=role)
    if "student" in models:
        bins = models["student"]
        axis.bar([100 * b["lower"] for b in bins], [100 * (b["accuracy"] or 0) for b in bins], width=width,
                 align="edge", alpha=0.2, edgecolor="black", linewidth=0.5, label="student accuracy per bin")
    axis.set_xlim(0, 100)
    axis.set_ylim(0, 100)
    axis.set_ylabel("accuracy (%)")
    axis.set_title(f"Reliability diagram ({len(some)} bins)")
    axis.legend(loc="upper left", fontsize="small")
    counts.set_xlabel("confidence, max softmax probability (%)")
    counts.set_ylabel("images")
    counts.set_yscale("symlog")
    _save(figure, path)
