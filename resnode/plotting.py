"""One figure style for the whole book, and the helpers every chapter uses to say what a figure ran on."""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=["#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#66468c", "#444444"]),
    "font.size": 10,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "svg.hashsalt": "resnode",
}


def use_book_style() -> None:
    """Apply the book's matplotlib style."""
    mpl.rcParams.update(STYLE)


def ran_on(fig: plt.Figure, text: str) -> None:
    """Write what a figure ran on (dataset, profile, sizes) under it; the book never leaves that implicit."""
    fig.text(0.01, -0.02, text, fontsize=8, color="#555555", ha="left", va="top")


def reference_slope(ax: plt.Axes, x, y_start: float, slope: float, label: str | None = None, **kwargs) -> None:
    """Draw ``y = y_start (x / x[0])^slope`` dashed, to compare a measured rate with a theoretical one."""
    x = np.asarray(x, dtype=float)
    ax.plot(x, y_start * (x / x[0]) ** slope, ls="--", color=kwargs.pop("color", "#888888"),
            label=label if label is not None else f"slope {slope:g}", **kwargs)
