"""Training curves as a picture: loss terms and accuracy per epoch."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(metrics: list[dict]):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.2))
    epochs = [m["epoch"] for m in metrics]
    for key, style in (("total", "-"), ("L_I", "--"), ("L_S", "-"), ("L_C", ":")):
        if metrics:
            ax_loss.plot(epochs, [m[key] for m in metrics], style, marker="o", ms=3, label=key)
    ax_loss.set_title("loss terms")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_yscale("symlog", linthresh=1.0)  # L_I sums pairwise hinges and dwarfs the rest
    for key in ("train_acc", "val_acc"):
        pts = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), marker="o", ms=3, label=key.replace("_acc", ""))
    ax_acc.set_title("accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if metrics:
            ax.legend(fontsize=8)
    if not metrics:
        ax_loss.text(0.5, 0.5, "no epoch finished yet", ha="center", transform=ax_loss.transAxes)
    fig.tight_layout()
    return fig
