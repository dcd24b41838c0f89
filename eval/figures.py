"""The report's figures, drawn with matplotlib: KL against size (log-scaled KL), perplexity against
size, and decode / prefill rates with one panel per device.

Figures are built on their own Agg canvas (``Figure`` + ``FigureCanvasAgg``), never through
pyplot, so importing or using this module leaves matplotlib's global backend and state alone.
``to_svg`` serialises a figure deterministically: the same figure gives the same bytes.
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import matplotlib
import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import Bbox

# Matplotlib's default cycle; colours are picked by series order, so a series keeps its colour.
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MARKER_PT = 6.0  # marker diameter in points

# Label offsets from the point, in points, tried nearest first (right, then above, left, below,
# then diagonals) at growing distances: a greedy placement that keeps labels off each other and
# off the markers. A label drawn away from its point gets a leader line.
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1))
_RADII = (6, 14, 24, 36, 50)


# Every figure is built and saved under matplotlib's default style plus these, so a user's
# matplotlibrc cannot change the report. SVG ids are hashed with a fixed salt (the default is a
# random one per id) and text is drawn as paths, so a browser shows exactly the glyphs whose
# extents the label placement measured.
_RC = {"svg.hashsalt": "gemma3n-report", "svg.fonttype": "path"}


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str
    series: str


def _new(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)  # a local Agg canvas: text extents are measured by the renderer that draws
    return fig


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(a: Bbox, frame: Bbox) -> float:
    inner = _overlap(a, frame)
    return a.width * a.height - inner


def place_labels(ax, anchors: list[tuple[float, float, str]]) -> list:
    """Annotate (x, y, text) anchors, each at the first candidate spot where its label covers no
    other label or marker and stays inside the axes (when every spot is taken: the least covered
    one); returns the annotations."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0
    r = MARKER_PT / 2 * px + 1
    markers = [Bbox.from_extents(u - r, v - r, u + r, v + r)
               for u, v in (ax.transData.transform((x, y)) for x, y, _ in anchors)]
    placed: list[Bbox] = []
    out = []
    for x, y, text in anchors:
        best = None
        for radius in _RADII:
            for dx, dy in _DIRECTIONS:
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                n = math.hypot(dx, dy)
                off = (radius * dx / n, radius * dy / n)
                ann = ax.annotate(text, (x, y), xytext=off, textcoords="offset points", ha=ha, va=va, fontsize=8,
                                  arrowprops=dict(arrowstyle="-", color="#888", lw=0.6, shrinkA=0, shrinkB=MARKER_PT / 2)
                                  if radius > _RADII[0] else None)
                ann.get_window_extent(renderer)  # lays the annotation out; its box includes the leader
                box = Text.get_window_extent(ann, renderer)  # the text alone
                cost = sum(_overlap(box, b) for b in placed + markers) + _outside(box, frame)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, ann, box)
                else:
                    ann.remove()
                if cost == 0:
                    break
            if best[0] == 0:
                break
        placed.append(best[2])
        out.append(best[1])
    return out


@_styled
def scatter(points: list[Point], title: str, x_label: str, y_label: str, log_y: bool = False) -> Figure:
    """One marker per point, coloured by series (legend below the axes), each point labelled by
    name; points at the same position share one label. With ``log_y`` the points with y <= 0,
    which a log axis cannot show, are named under the axis instead."""
    fig = _new(6.4, 4.8)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_ylabel(y_label)
    finite = [p for p in points if p.x is not None and p.y is not None and math.isfinite(p.x) and math.isfinite(p.y)]
    shown = [p for p in finite if p.y > 0] if log_y else finite
    hidden = sorted({p.label for p in finite if p not in shown})
    if log_y:
        ax.set_yscale("log")
        ys = [p.y for p in shown]
        if ys and math.log10(max(ys) / min(ys)) < 0.5:
            # Within a decade matplotlib labels minor ticks as 2.15x10^-2; plain numbers read better.
            ax.yaxis.set_major_formatter(FuncFormatter(_number))
            ax.yaxis.set_minor_formatter(FuncFormatter(_number))
    ax.set_xlabel(x_label + (f"\nnot on the log axis (0): {', '.join(hidden)}" if hidden else ""))
    if not shown:
        _no_data(ax, "no data")
        return fig
    series = list(dict.fromkeys(p.series for p in shown))
    for i, s in enumerate(series):
        pts = [p for p in shown if p.series == s]
        ax.scatter([p.x for p in pts], [p.y for p in pts], s=MARKER_PT ** 2, color=PALETTE[i % len(PALETTE)], label=s, zorder=3)
    ax.grid(True, which="major", color="#ddd", lw=0.6)
    ax.margins(0.2)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    anchors: dict[tuple[float, float], list[str]] = {}
    for p in sorted(shown, key=lambda p: (p.x, p.y, p.label)):
        names = anchors.setdefault((p.x, p.y), [])
        if p.label not in names:
            names.append(p.label)
    # Settle limits and layout before measuring; labels are left out of the layout, so the
    # final draw keeps the geometry they were placed in.
    fig.canvas.draw()
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    for ann in place_labels(ax, [(x, y, ", ".join(n)) for (x, y), n in anchors.items()]):
        ann.set_in_layout(False)
    return fig


def _number(v, _pos=None) -> str:
    return f"{v:.3g}"


@_styled
def rate_bars(devices: list[str], names: list[str], values: dict[tuple[str, str, str], float]) -> Figure:
    """Decode and prefill tokens/s per artifact, one panel per device side by side (devices are
    not comparable on one scale); a panel shows the artifacts measured on its device.
    ``values[(name, "decode" | "prefill", device)]``."""
    fig = _new(max(4.8, 3.6 * len(devices)), 4.4)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(devices), squeeze=False)[0]
    width = 0.38
    metrics = (("decode", PALETTE[0]), ("prefill", PALETTE[3]))
    for ax, d in zip(axes, devices):
        here = [n for n in names if any((n, m, d) in values for m, _ in metrics)]
        ax.set_title(d, fontsize=10)
        ax.set_ylabel("tokens/s")
        for k, (metric, colour) in enumerate(metrics):
            hs = [values.get((n, metric, d), math.nan) for n in here]
            ax.bar([x + (k - 0.5) * width for x in range(len(here))], hs, width, color=colour, label=metric, zorder=3)
        ax.set_xticks(range(len(here)), here, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, max(len(here), 3) - 0.4)  # a lone artifact keeps a bar's width
        ax.grid(True, axis="y", color="#ddd", lw=0.6)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle("Decode and prefill rates (longest prompt)")
    return fig


@_styled
def to_svg(fig: Figure) -> str:
    """The figure as an SVG document, byte-identical for identical figures (no date; see _RC)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()
