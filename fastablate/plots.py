"""matplotlib without a display, for every plot a run writes."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: plotting is optional work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def finish(fig, ax, path: Path, *, legend_size: int = 8, **labels) -> Path:
    """Axis labels, title and limits (``ax.set(**labels)``), a legend, then :func:`save`."""
    ax.set(**labels)
    ax.legend(fontsize=legend_size)
    return save(fig, path)
