"""Small self-contained SVG charts (no plotting library needed): lines, bars, a timeline.

Knows nothing about runs: it draws series of (x, y) points, labelled values and spans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
    width: int = 640, height: int = 360,
) -> str:  # fmt: skip
    """SVG text of one line per series, with axes, ticks and a legend."""
    points = [p for s in series.values() for p in s]
    if not points:
        raise ValueError("line_chart needs at least one point")
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(0.0, min(p[1] for p in points)), max(1.0, max(p[1] for p in points))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 56, 16, 32, 44
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for i in range(6):  # y grid and ticks
        y = y0 + (y1 - y0) * i / 5
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
        )
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for i in range(6):  # x ticks
        x = x0 + (x1 - x0) * i / 5
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.3g}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(
        f'<text x="14" y="{height / 2}" text-anchor="middle" transform="rotate(-90 14 {height / 2})">'
        f"{escape(y_label)}</text>"
    )
    for k, (name, pts) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        mark = f'class="series" data-series="{escape(name)}" data-points="{len(pts)}"'
        if len(pts) > 1:
            out.append(f'<polyline {mark} fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        elif pts:
            out.append(
                f'<circle {mark} cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="4" fill="{color}"/>'
            )
        out.append(f'<text x="{left + 10}" y="{top + 14 * (k + 1)}" fill="{color}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def bar_chart(bars: Mapping[str, float], *, title: str, x_label: str, width: int = 640) -> str:
    """SVG text of one horizontal bar per label, its value written beside it."""
    if not bars:
        raise ValueError("bar_chart needs at least one bar")
    left, row, top = 200, 22, 32
    height = top + row * len(bars) + 36
    top_value = max(max(bars.values()), 1e-12)
    scale = (width - left - 80) / top_value
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(bars.items()):
        y = top + i * row
        out.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        out.append(
            f'<rect class="bar" x="{left}" y="{y + 3}" width="{max(value, 0) * scale:.1f}" '
            f'height="{row - 6}" fill="{_COLORS[i % len(_COLORS)]}">'
            f"<title>{escape(label)}: {value:.4g}</title></rect>"
        )
        out.append(f'<text x="{left + max(value, 0) * scale + 4:.1f}" y="{y + 14}">{value:.4g}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def timeline_chart(
    lanes: Mapping[str, Sequence[tuple[float, float, str]]], *, title: str, width: int = 960
) -> str:  # fmt: skip
    """SVG text of one lane per name, a box per (start_s, duration_s, label) span on a shared time axis."""
    spans = [s for lane in lanes.values() for s in lane]
    if not spans:
        raise ValueError("timeline_chart needs at least one span")
    t0, t1 = min(s[0] for s in spans), max(s[0] + s[1] for s in spans)
    t1 = t1 if t1 > t0 else t0 + 1
    left, right, row, top = 180, 16, 24, 88
    height = top + row * len(lanes) + 40
    sx = lambda t: left + (t - t0) / (t1 - t0) * (width - left - right)  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>',
    ]
    names = sorted({s[2] for s in spans})
    color = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(names)}
    for i, (lane, lane_spans) in enumerate(lanes.items()):
        y = top + i * row
        out.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(lane)}</text>')
        for start, dur, label in sorted(lane_spans, key=lambda s: -s[1]):  # a span over its parts
            out.append(
                f'<rect class="span" x="{sx(start):.1f}" y="{y + 3}" '
                f'width="{max(sx(start + dur) - sx(start), 1):.1f}" '
                f'height="{row - 6}" fill="{color[label]}" stroke="white" stroke-width="0.5">'
                f"<title>{escape(label)}: {dur * 1000:.1f} ms</title></rect>"
            )
    for i in range(6):
        t = t0 + (t1 - t0) * i / 5
        out.append(f'<text x="{sx(t):.1f}" y="{height - 24}" text-anchor="middle">{t - t0:.2f}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">seconds</text>')
    for i, name in enumerate(names[:12]):  # the legend: a colour per span name, top left
        out.append(
            f'<text x="{8 + 120 * (i % 2)}" y="{14 + 12 * (i // 2)}" fill="{color[name]}">'
            f"{escape(name)}</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
