"""One figure style for the whole book, and the helpers every chapter uses to say what a figure ran on."""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

COLUMN = 6.6
"""Width in inches of a figure in the book's text column: 660 pixels at ``figure.dpi``, shown at full size in the
688-pixel column, so that 10-point text is 14 pixels on the page."""
WIDE = 8.0
"""Width in inches of a row of three or more panels: 800 pixels (about 810 with the saved figure's padding), shown
at no less than 0.8 of its size in the book's column of about 670 pixels (8.4 inches came out at 0.79)."""

STYLE = {
    "figure.figsize": (COLUMN, 3.4),
    "figure.dpi": 100,
    "savefig.dpi": 100,
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


def figure(nrows: int = 1, ncols: int = 1, *, wide: bool | None = None, height: float | None = None, **kwargs):
    """``plt.subplots`` at the book's sizes: :data:`COLUMN` wide (:data:`WIDE` for three panels or more in a row, or
    ``wide=True``), ``height`` inches per row (2.9 by default, 2.5 in a wide row). Returns ``(fig, axes)``.

    Every figure of the book is made here, so that none is shrunk below 0.8 of its size in the text column (its
    labels would become unreadable); the browser test of the built book checks it."""
    wide = ncols >= 3 if wide is None else wide
    height = (2.5 if wide else 2.9) if height is None else height
    kwargs.setdefault("layout", "constrained")
    return plt.subplots(nrows, ncols, figsize=(WIDE if wide else COLUMN, height * nrows), **kwargs)


def ran_on(fig: plt.Figure, text: str) -> None:
    """Write what a figure ran on (dataset, profile, sizes) under it, wrapped to the figure's width; the book never
    leaves that implicit."""
    fig.text(0.01, 0, text, fontsize=7.5, color="#555555", ha="left", va="top", wrap=True)


def reference_slope(ax: plt.Axes, x, y_start: float, slope: float, label: str | None = None, **kwargs) -> None:
    """Draw ``y = y_start (x / x[0])^slope`` dashed, to compare a measured rate with a theoretical one."""
    x = np.asarray(x, dtype=float)
    ax.plot(x, y_start * (x / x[0]) ** slope, ls="--", color=kwargs.pop("color", "#888888"),
            label=label if label is not None else f"slope {slope:g}", **kwargs)


__all__ = ["COLUMN", "WIDE", "STYLE", "use_book_style", "figure", "ran_on", "reference_slope"]
