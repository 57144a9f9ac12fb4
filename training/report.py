"""The training curves as a PNG: diffusion loss (and its running mean) and the alignment cosines per step."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 900, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 50, 50
SERIES = (("diffusion", "diffusion loss", "#4e79a7"), ("cos_cross", "cos cross (Eq. 8)", "#e15759"),
          ("cos_self", "cos self (Eq. 9)", "#59a14f"))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def running_mean(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], steps: list[int],
           series: list[tuple[str, list[float], str]], title: str, font) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="#999999")
    draw.text((x0, y0 - 18), title, fill="#222222", font=font)
    values = [v for _, vs, _ in series for v in _finite(vs)]
    if not values or not steps:
        draw.text((x0 + 10, y0 + 10), "no values yet", fill="#666666", font=font)
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    s0 = min(steps)
    s1 = max(max(steps), s0 + 1)
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        y = y1 - (y1 - y0) * frac
        draw.line((x0 - 4, y, x0, y), fill="#999999")
        draw.text((4, y - 6), f"{v:.4g}", fill="#444444", font=font)
    draw.text((x0, y1 + 6), f"step {s0}", fill="#444444", font=font)
    draw.text((x1 - 70, y1 + 6), f"step {s1}", fill="#444444", font=font)
    for name, vs, colour in series:
        pts = [(x0 + (x1 - x0) * (s - s0) / (s1 - s0), y1 - (y1 - y0) * (v - lo) / (hi - lo))
               for s, v in zip(steps, vs) if isinstance(v, (int, float)) and math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)


def plot_curves(log: Sequence[dict], path: Path, title: str = "training") -> Path:
    """Two panels: the diffusion loss per step with its running mean, and the alignment cosines (if any)."""
    font = _font(13)
    img = Image.new("RGB", (WIDTH, 2 * HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    draw.text((LEFT, 8), title, fill="#111111", font=_font(16))
    rows = [r for r in log if _finite([r.get("diffusion")])]
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["diffusion"]) for r in rows]
    window = max(1, len(loss) // 20)
    evals = [r for r in log if _finite([r.get("eval_diffusion")])]
    _panel(draw, (LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM), [int(r["step"]) for r in evals] + steps,
           [("eval", [float(r["eval_diffusion"]) for r in evals] + [float("nan")] * len(steps), "#f28e2b"),
            ("diffusion", [float("nan")] * len(evals) + loss, "#b0c4de"),
            ("mean", [float("nan")] * len(evals) + running_mean(loss, window), "#4e79a7")],
           f"diffusion loss (light), its running mean over {window} steps (blue), fixed-batch loss (orange)", font)
    cos = [(label, [r.get(k, float("nan")) for r in rows], colour) for k, label, colour in SERIES[1:]]
    _panel(draw, (LEFT, HEIGHT + TOP, WIDTH - RIGHT, 2 * HEIGHT - BOTTOM), steps, cos,
           "alignment cosine similarity: cross (red), self (green)", font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
