"""matplotlib figures for every plot a run writes, drawn on Figure objects of their own: never
pyplot's, so the user's backend and open figures stay as they are (a notebook keeps showing its
own plots), and no display is needed."""
from __future__ import annotations

from pathlib import Path


def subplots(*args, figsize: tuple[float, float] | None = None, **kwargs):
    """(figure, axes) as ``pyplot.subplots`` gives them, on a Figure pyplot does not manage."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def colors() -> list[str]:
    """The colour cycle of the current style."""
    from matplotlib import rcParams

    return rcParams["axes.prop_cycle"].by_key()["color"]


class Figures:
    """A plot directory that keeps the figures instead of writing them: ``result.plot(sink)``
    draws as into a run directory, and ``sink.figures`` holds the Figures in drawing order
    (closed for pyplot, so a notebook shows each once, where it is displayed)."""

    def __init__(self):
        self.figures: list = []

    def __truediv__(self, name: str) -> "_Kept":
        return _Kept(self, name)


class _Kept:
    """The would-be path of a figure kept by :class:`Figures`."""

    def __init__(self, sink: Figures, name: str):
        self.sink, self.name = sink, name

    def __fspath__(self) -> str:
        return self.name

    __str__ = __fspath__


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` and close it; a path of :class:`Figures` keeps it instead."""
    fig.tight_layout()
    if isinstance(path, _Kept):
        fig.set_dpi(dpi)
        path.sink.figures.append(fig)
    else:
        fig.savefig(path, dpi=dpi)
    return path


def finish(fig, ax, path: Path, *, legend_size: int = 8, **labels) -> Path:
    """Axis labels, title and limits (``ax.set(**labels)``), a legend, then :func:`save`."""
    ax.set(**labels)
    ax.legend(fontsize=legend_size)
    return save(fig, path)
