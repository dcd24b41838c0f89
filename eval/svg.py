"""Small hand-written SVG charts (scatter, bars) for the self-contained HTML report.

No plotting library and no scripts: each function returns one ``<svg>`` element as text that is
well-formed XML, so the page renders offline in any browser.
"""
from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H = 520, 320
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 70, 20, 36, 60


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _frame(title: str, x_label: str, y_label: str, body: list[str]) -> str:
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14" font-family="sans-serif">{escape(title)}</text>',
        f'<text x="{(M_LEFT + W - M_RIGHT) / 2}" y="{H - 8}" text-anchor="middle" font-size="12" font-family="sans-serif">{escape(x_label)}</text>',
        f'<text x="14" y="{(M_TOP + H - M_BOTTOM) / 2}" text-anchor="middle" font-size="12" font-family="sans-serif" '
        f'transform="rotate(-90 14 {(M_TOP + H - M_BOTTOM) / 2})">{escape(y_label)}</text>',
        *body,
        "</svg>",
    ])


def _y_axis(lo: float, hi: float) -> tuple[list[str], callable]:
    ticks = _ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    span = hi - lo or 1.0

    def y(v):
        return H - M_BOTTOM - (v - lo) / span * (H - M_TOP - M_BOTTOM)

    out = [f'<line x1="{M_LEFT}" y1="{M_TOP}" x2="{M_LEFT}" y2="{H - M_BOTTOM}" stroke="black"/>']
    for t in ticks:
        out.append(f'<line x1="{M_LEFT - 4}" y1="{y(t):.1f}" x2="{W - M_RIGHT}" y2="{y(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{M_LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end" font-size="10" font-family="sans-serif">{_fmt(t)}</text>')
    return out, y


def scatter(points: list[tuple[float, float, str, str]], title: str, x_label: str, y_label: str) -> str:
    """points: (x, y, point label, series name); one colour per series, with a legend."""
    points = [p for p in points if p[0] is not None and p[1] is not None and math.isfinite(p[0]) and math.isfinite(p[1])]
    if not points:
        return _frame(title, x_label, y_label, ['<text x="50%" y="50%" text-anchor="middle" font-size="12">no data</text>'])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    body, y = _y_axis(min(0.0, min(ys)), max(ys) * 1.1 or 1.0)
    xt = _ticks(0.0, max(xs) * 1.1 or 1.0)
    xlo, xhi = xt[0], xt[-1]

    def x(v):
        return M_LEFT + (v - xlo) / ((xhi - xlo) or 1.0) * (W - M_LEFT - M_RIGHT)

    body.append(f'<line x1="{M_LEFT}" y1="{H - M_BOTTOM}" x2="{W - M_RIGHT}" y2="{H - M_BOTTOM}" stroke="black"/>')
    for t in xt:
        body.append(f'<text x="{x(t):.1f}" y="{H - M_BOTTOM + 14}" text-anchor="middle" font-size="10" font-family="sans-serif">{_fmt(t)}</text>')
    series = list(dict.fromkeys(p[3] for p in points))
    for xv, yv, label, s in points:
        c = PALETTE[series.index(s) % len(PALETTE)]
        body.append(f'<circle cx="{x(xv):.1f}" cy="{y(yv):.1f}" r="5" fill="{c}"><title>{escape(f"{label}: {_fmt(xv)}, {_fmt(yv)}")}</title></circle>')
        body.append(f'<text x="{x(xv) + 7:.1f}" y="{y(yv) - 6:.1f}" font-size="10" font-family="sans-serif">{escape(label)}</text>')
    for i, s in enumerate(series):
        c = PALETTE[i % len(PALETTE)]
        ly = M_TOP + 4 + 14 * i
        body.append(f'<rect x="{W - M_RIGHT - 150}" y="{ly}" width="10" height="10" fill="{c}"/>')
        body.append(f'<text x="{W - M_RIGHT - 136}" y="{ly + 9}" font-size="10" font-family="sans-serif">{escape(s[:26])}</text>')
    return _frame(title, x_label, y_label, body)


def bars(categories: list[str], series: list[str], values: dict[tuple[str, str], float], title: str, y_label: str) -> str:
    """Grouped bars: one group per category, one bar per series (missing values left out)."""
    vals = [v for v in values.values() if v is not None and math.isfinite(v)]
    if not vals or not categories:
        return _frame(title, "", y_label, ['<text x="50%" y="50%" text-anchor="middle" font-size="12">no data</text>'])
    body, y = _y_axis(0.0, max(vals) * 1.1)
    body.append(f'<line x1="{M_LEFT}" y1="{H - M_BOTTOM}" x2="{W - M_RIGHT}" y2="{H - M_BOTTOM}" stroke="black"/>')
    group_w = (W - M_LEFT - M_RIGHT) / len(categories)
    bar_w = group_w * 0.8 / max(1, len(series))
    for ci, cat in enumerate(categories):
        gx = M_LEFT + ci * group_w + group_w * 0.1
        for si, s in enumerate(series):
            v = values.get((cat, s))
            if v is None or not math.isfinite(v):
                continue
            c = PALETTE[si % len(PALETTE)]
            top = y(v)
            body.append(f'<rect x="{gx + si * bar_w:.1f}" y="{top:.1f}" width="{bar_w * 0.95:.1f}" height="{H - M_BOTTOM - top:.1f}" '
                        f'fill="{c}"><title>{escape(f"{cat} / {s}: {_fmt(v)}")}</title></rect>')
        body.append(f'<text x="{gx + group_w * 0.4:.1f}" y="{H - M_BOTTOM + 14}" text-anchor="middle" font-size="10" '
                    f'font-family="sans-serif">{escape(cat[:18])}</text>')
    if len(series) > 1:
        for i, s in enumerate(series):
            ly = M_TOP + 4 + 14 * i
            body.append(f'<rect x="{W - M_RIGHT - 110}" y="{ly}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>')
            body.append(f'<text x="{W - M_RIGHT - 96}" y="{ly + 9}" font-size="10" font-family="sans-serif">{escape(s[:18])}</text>')
    return _frame(title, "", y_label, body)
