"""Plots shared by the recipes: the logged loss terms of several runs, and saving a figure."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

STYLES = ["-", "--", ":", "-."]


def plot_loss_terms(ax, histories: Mapping[str, list], *, x: str = "epoch", first_color: int = 0) -> None:
    """Every ``loss*`` value each run logged (its ``log_history``) against ``x`` (``epoch`` or ``step``), one
    colour per run and one line style per term; the total is left out when a run has a single term."""
    for i, (run, history) in enumerate(histories.items()):
        logs = [h for h in history if x in h and any(k.startswith("loss") for k in h)]
        keys = sorted({k for h in logs for k in h if k.startswith("loss")})
        if len(keys) == 2 and "loss" in keys:  # a single term: the total adds nothing
            keys.remove("loss")
        for j, key in enumerate(keys):
            points = [(h[x], h[key]) for h in logs if key in h]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, STYLES[j % len(STYLES)], color=f"C{i + first_color}", label=f"{run}: {key}")
    ax.set_xlabel("optimiser step" if x == "step" else x)
    ax.set_ylabel("training loss (mean over each logging interval)")
    ax.set_title("loss terms over training")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss was logged\n(fewer steps than logging_steps)", ha="center", va="center",
                transform=ax.transAxes)


def save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
