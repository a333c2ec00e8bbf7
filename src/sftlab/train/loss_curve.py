"""The loss curve of report.html as inline SVG, drawn from (step, loss) pairs: no plotting library, no
script, so the page stays one small self-contained file."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

MAX_CURVE_POINTS = 4_000
"""Longer runs draw every k-th logged step (and the last), keeping the page small."""
WIDTH, HEIGHT = 760, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 20, 28, 44  # margins around the plot area, in SVG units


def loss_svg(train: Sequence[tuple[int, float]], evals: Sequence[tuple[int, float]]) -> str:
    """Train loss per logged step as a polyline (#train-loss, one point per step up to MAX_CURVE_POINTS) and
    eval loss as dots joined by a dashed line (#eval-loss), on linear axes with gridlines."""
    if not train and not evals:
        return "<p>No steps were logged.</p>"
    stride = -(-len(train) // MAX_CURVE_POINTS)  # ceil
    drawn = list(train[::stride]) + ([train[-1]] if stride > 1 and (len(train) - 1) % stride else [])
    points = list(drawn) + list(evals)
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_ticks = _ticks(min(p[1] for p in points), max(p[1] for p in points))
    x_ticks = [t for t in _ticks(x_lo, x_hi) if t == int(t) and x_lo <= t <= x_hi] or [x_lo, x_hi]
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def x(step: float) -> float:
        return _LEFT + (step - x_lo) / ((x_hi - x_lo) or 1) * (WIDTH - _LEFT - _RIGHT)

    def y(loss: float) -> float:
        return _TOP + (y_hi - loss) / ((y_hi - y_lo) or 1) * (HEIGHT - _TOP - _BOTTOM)

    parts = _axes(x_ticks, y_ticks, x, y)
    if drawn:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in drawn)
        parts.append(f'<polyline id="train-loss" class="train" points="{coords}"/>')
        if len(drawn) == 1:
            parts.append(f'<circle class="train-dot" cx="{x(drawn[0][0]):.1f}" cy="{y(drawn[0][1]):.1f}" r="3"/>')
    if evals:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in evals)
        parts.append(f'<polyline id="eval-loss" class="eval" points="{coords}"/>')
        parts += [f'<circle class="eval-point" cx="{x(s):.1f}" cy="{y(v):.1f}" r="4">'
                  f"<title>step {s}: eval loss {v:.4f}</title></circle>" for s, v in evals]
    parts.append(_legend(bool(drawn), bool(evals)))
    note = f" (one point every {stride} logged steps, of {len(train):,})" if stride > 1 else ""
    return (f'<svg id="loss-curve" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img" data-train-points="{len(drawn)}" data-eval-points="{len(evals)}">'
            f"<title>loss per optimizer step</title>{''.join(parts)}</svg>"
            f"<p class=\"caption\">Training loss (mean over the step's supervised tokens) per logged step{note}"
            f"{'; dots: eval loss' if evals else ''}.</p>")


def _axes(x_ticks: list[float], y_ticks: list[float], x: Callable[[float], float],
          y: Callable[[float], float]) -> list[str]:
    bottom, right = HEIGHT - _BOTTOM, WIDTH - _RIGHT
    parts = [f'<rect class="plot" x="{_LEFT}" y="{_TOP}" width="{right - _LEFT}" height="{bottom - _TOP}"/>']
    for t in y_ticks:
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{right}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
                     f'<text class="tick" x="{_LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in x_ticks:
        parts.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_TOP}" y2="{bottom}"/>'
                     f'<text class="tick" x="{x(t):.1f}" y="{bottom + 16}" text-anchor="middle">{int(t):,}</text>')
    parts.append(f'<text class="label" x="{(_LEFT + right) / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle">'
                 "optimizer step</text>"
                 f'<text class="label" x="14" y="{(_TOP + bottom) / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(_TOP + bottom) / 2:.0f})">loss</text>')
    return parts


def _legend(train: bool, evals: bool) -> str:
    entries = ([("train", "train loss")] if train else []) + ([("eval", "eval loss")] if evals else [])
    x0 = WIDTH - _RIGHT - 100 * len(entries)  # in the top margin, right-aligned: never over the curve
    return "".join(f'<line class="{css}" x1="{x0 + 100 * i}" x2="{x0 + 100 * i + 24}" y1="12" y2="12"/>'
                   f'<text class="tick" x="{x0 + 100 * i + 30}" y="16">{label}</text>'
                   for i, (css, label) in enumerate(entries))


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = step * (lo // step)
    ticks = [first]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(first + step * len(ticks))
    return [round(t, 10) for t in ticks]
