"""The twelve shapes of the built-in data set, drawn with a resolution-free pen: one function per
class, each drawing its object in the pen's colours with random proportions from the generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

Gen = np.random.Generator
Rgb = tuple[int, int, int]
Pt = tuple[float, float]
Pts = Sequence[Pt] | Sequence[float] | np.ndarray  # points, or a flat (x0, y0, x1, y1) box


class Pen:
    """Draws in unit coordinates (0..1 across the canvas) so the shapes are resolution-free."""

    _OPS = {
        "poly": "polygon",
        "rect": "rounded_rectangle",
        "ellipse": "ellipse",
        "chord": "chord",
        "arc": "arc",
        "line": "line",
    }

    def __init__(self, img: Image.Image, fg: Rgb, dark: Rgb) -> None:
        self.d, self.s, self.fg, self.dk = ImageDraw.Draw(img), img.width, fg, dark

    def __call__(
        self, op: str, xy: Pts, width: float = 0, dark: bool = False, r: float = 0, **kw: object
    ) -> None:
        """Width > 0 draws an outline (or a line) that wide; r rounds rectangle corners."""
        flat = (np.asarray(xy, dtype=float).ravel() * self.s).tolist()
        colour = self.dk if dark else self.fg
        if op in ("rect", "line"):
            kw |= {"radius": r * self.s} if op == "rect" else {"joint": "curve"}
        if width:  # lines and arcs take their colour as fill, the rest as outline
            kw |= {"fill" if op in ("line", "arc") else "outline": colour}
            kw["width"] = max(1, round(width * self.s))
        else:
            kw["fill"] = colour
        getattr(self.d, self._OPS[op])(flat, **kw)


def axe(p: Pen, r: Gen) -> None:  # ice axe: shaft, spike, head with hooked pick and flat adze
    top, reach = r.uniform(0.1, 0.18), r.uniform(0.26, 0.34)
    p("rect", (0.46, top + 0.05, 0.54, 0.86), r=0.02)
    p("poly", [(0.46, 0.86), (0.54, 0.86), (0.5, 0.96)], dark=True)
    pick = [(0.5, top + 0.1), (0.5 - reach * 0.6, top + 0.1), (0.5 - reach, top + 0.2)]
    p("poly", [(0.5, top), *pick, (0.5 - reach * 0.75, top + 0.04)], dark=True)
    adze = [(0.5 + reach * 0.8, top + 0.02), (0.5 + reach * 0.9, top + 0.12), (0.5, top + 0.1)]
    p("poly", [(0.5, top), *adze], dark=True)


def boot(p: Pen, r: Gen) -> None:  # shaft + foot make an L; dark lugged sole; laces
    top, toe = r.uniform(0.12, 0.24), r.uniform(0.76, 0.86)
    p("rect", (0.28, top, 0.58, 0.76), r=0.04)
    p("rect", (0.28, 0.5, toe, 0.78), r=0.1)
    p("rect", (0.26, 0.76, toe + 0.03, 0.85), r=0.03, dark=True)
    for y in np.arange(top + 0.06, 0.58, 0.08):
        p("line", [(0.44, y), (0.58, y + 0.03)], 0.025, dark=True)


def carabiner(p: Pen, r: Gen) -> None:  # thick oval ring with a gap bridged by a thin gate
    rx, ry, gap = r.uniform(0.14, 0.2), r.uniform(0.3, 0.36), r.uniform(30, 45)
    p("arc", (0.5 - rx, 0.5 - ry, 0.5 + rx, 0.5 + ry), 0.08, start=gap, end=360 - gap)
    dx, dy = rx * np.cos(np.radians(gap)), ry * np.sin(np.radians(gap))
    p("line", [(0.5 + dx, 0.5 - dy), (0.45 + dx, 0.48 + dy)], 0.03, dark=True)  # gate, ajar


def crampons(p: Pen, r: Gen) -> None:  # metal frame, spikes below, front points, strap
    spike = r.uniform(0.1, 0.16)
    p("rect", (0.14, 0.38, 0.84, 0.56), r=0.06, width=0.045)
    for x in np.linspace(0.2, 0.76, int(r.integers(4, 7))):
        p("poly", [(x - 0.035, 0.55), (x + 0.035, 0.55), (x, 0.55 + spike)])
    for y in (0.42, 0.5):
        p("poly", [(0.83, y - 0.03), (0.83, y + 0.03), (0.83 + spike, y + 0.04)])
    p("line", [(0.3, 0.38), (0.36, 0.24), (0.64, 0.24), (0.7, 0.38)], 0.03, dark=True)


def glove(p: Pen, r: Gen) -> None:  # palm, four fingers, angled thumb, dark cuff
    p("rect", (0.3, 0.4, 0.68, 0.8), r=0.08)
    for k in range(4):
        x, length = 0.3 + 0.0966 * k, r.uniform(0.2, 0.3) - abs(k - 1.3) * 0.04
        p("rect", (x, 0.45 - length, x + 0.088, 0.5), r=0.044)
    p("poly", [(0.31, 0.7), (0.16, 0.48), (0.23, 0.43), (0.36, 0.55)])
    p("ellipse", (0.14, 0.4, 0.24, 0.5))
    p("rect", (0.28, 0.78, 0.7, 0.92), r=0.02, dark=True)


def _jacket(p: Pen, r: Gen, puffy: bool) -> list[np.ndarray]:
    """Torso + sleeves, shared by both jackets; returns each sleeve's corners for the quilting."""
    spread, sleeves = r.uniform(-0.06, 0.06), []
    for sx in (1, -1):  # mirrored sleeves: shoulder, cuff outer, cuff inner, armpit
        q = np.array([(0.32, 0.18), (0.08 - spread, 0.74), (0.2 - spread, 0.78), (0.32, 0.44)])
        q[:, 0] = 0.5 + sx * (q[:, 0] - 0.5)
        p("poly", q)
        sleeves.append(q)
    p("rect", (0.29, 0.16, 0.71, 0.86), r=0.06 if puffy else 0.02)
    return sleeves


def hardshell(p: Pen, r: Gen) -> None:  # slim shell: hood and a long vertical zip
    _jacket(p, r, puffy=False)
    p("ellipse", (0.37, 0.04, 0.63, 0.26))
    p("ellipse", (0.42, 0.1, 0.58, 0.22), dark=True)  # face opening
    p("line", [(0.5, 0.22), (0.5, 0.86)], 0.025, dark=True)
    if r.random() < 0.5:  # chest pocket zips
        for x in (0.36, 0.64):
            p("line", [(x, 0.3), (x + (0.5 - x) * 0.43, 0.45)], 0.018, dark=True)


def insulated(p: Pen, r: Gen) -> None:  # puffy jacket: collar and horizontal quilt bands
    sleeves = _jacket(p, r, puffy=True)
    p("rect", (0.4, 0.11, 0.6, 0.2), r=0.02)
    for y in np.arange(0.26, 0.84, r.uniform(0.09, 0.12)):
        p("line", [(0.29, y), (0.71, y)], 0.022, dark=True)
    for q in sleeves:  # bands run across each sleeve, between its two long edges
        for t in np.arange(0.2, 0.95, 0.22):
            p("line", [q[0] + t * (q[1] - q[0]), q[3] + t * (q[2] - q[3])], 0.022, dark=True)


def harness(p: Pen, r: Gen) -> None:  # waist belt, two leg loops, belay loop, gear loops
    w = r.uniform(0.04, 0.06)
    p("ellipse", (0.14, 0.14, 0.86, 0.46), width=w)
    for x0 in (0.16, 0.54):
        p("ellipse", (x0, 0.52, x0 + 0.3, 0.86), width=w)
    p("ellipse", (0.43, 0.42, 0.57, 0.6), width=w * 0.7, dark=True)
    for x0 in (0.15, 0.77):
        p("rect", (x0, 0.26, x0 + 0.08, 0.34), r=0.02, dark=True)


def helmet(p: Pen, r: Gen) -> None:  # dome, brim, vents, chin straps
    h = r.uniform(0.28, 0.38)
    p("chord", (0.18, 0.56 - h, 0.82, 0.56 + h), start=180, end=360)
    p("rect", (0.12, 0.53, 0.88, 0.6), r=0.02, dark=True)
    for x in (0.36, 0.5, 0.64):
        p("ellipse", (x - 0.035, 0.56 - h * 0.6, x + 0.035, 0.56 - h * 0.45), dark=True)
    p("line", [(0.26, 0.6), (0.5, 0.82), (0.74, 0.6)], 0.02, dark=True)


def pulley(p: Pen, r: Gen) -> None:  # grooved wheel behind teardrop side plates; axle; top hole
    wr = r.uniform(0.25, 0.3)
    p("ellipse", (0.5 - wr, 0.64 - wr, 0.5 + wr, 0.64 + wr), dark=True)
    p("poly", [(0.3, 0.62), (0.43, 0.16), (0.57, 0.16), (0.7, 0.62)])
    p("ellipse", (0.3, 0.44, 0.7, 0.84))
    p("ellipse", (0.4, 0.08, 0.6, 0.28))
    p("ellipse", (0.45, 0.13, 0.55, 0.23), dark=True)
    p("ellipse", (0.44, 0.58, 0.56, 0.7), dark=True)


def rope(p: Pen, r: Gen) -> None:  # coiled spiral (or a loose wavy length) with a strand line
    if r.random() < 0.7:
        t = np.linspace(0, 1, 90)
        ang, rad = r.uniform(0, 2 * np.pi) + 2 * np.pi * r.uniform(2.2, 3.2) * t, 0.07 + 0.3 * t
        pts = np.stack([0.5 + rad * np.cos(ang), 0.5 + rad * np.sin(ang) * 0.85], axis=1)
    else:
        amp, per, x = r.uniform(0.1, 0.2), r.uniform(1.5, 3.0), np.linspace(0.08, 0.92, 60)
        pts = np.stack([x, 0.5 + amp * np.sin(2 * np.pi * per * x)], axis=1)
    p("line", pts, 0.06)
    p("line", pts, 0.012, dark=True)


def tent(p: Pen, r: Gen) -> None:  # A-frame or dome tent with a door, ground line and guy lines
    apex = r.uniform(0.16, 0.3)
    if r.random() < 0.5:
        p("poly", [(0.14, 0.8), (0.5, apex), (0.86, 0.8)])
        p("poly", [(0.4, 0.8), (0.5, apex + 0.24), (0.6, 0.8)], dark=True)
    else:
        p("chord", (0.1, apex, 0.9, 1.6 - apex), start=180, end=360)
        p("chord", (0.38, 0.5, 0.62, 1.1), start=180, end=360, dark=True)
    p("line", [(0.04, 0.8), (0.96, 0.8)], 0.015, dark=True)
    for x in (0.04, 0.96):
        p("line", [(0.5, apex), (x, 0.62)], 0.01, dark=True)
