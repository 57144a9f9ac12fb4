"""A line chart of the routing gates w_0..w_3 over the sampling steps (Eqs. 5-6 of 000)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..layout.preview import hex_rgb

LEVEL_NAMES = ("T_base", "T1", "T2", "T3")
LEVEL_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759")
WIDTH, HEIGHT = 760, 380
LEFT, RIGHT, TOP, BOTTOM = 64, 130, 56, 58


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def y_top(weights: torch.Tensor) -> float:
    """The chart's upper y value: 1, or the largest weight rounded up to a quarter."""
    peak = float(weights.max()) if weights.numel() else 1.0
    return max(1.0, float(np.ceil(peak * 4.0) / 4.0))


def point(step: int, value: float, steps: int, top: float) -> tuple[float, float]:
    """Pixel position of (step, weight) inside the plot area."""
    x = LEFT + (WIDTH - LEFT - RIGHT) * (step / max(steps - 1, 1))
    y = HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (value / top)
    return x, y


def draw_routing(weights: torch.Tensor, times: torch.Tensor, title: str,
                 names: Sequence[str] = LEVEL_NAMES) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: one line per level (w_i at each step), steps on x, the step's t under it."""
    steps, levels = weights.shape
    top = y_top(weights)
    img = Image.new("RGB", (WIDTH, HEIGHT), (250, 250, 250))
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(11)
    d.text((LEFT, 14), title, fill=(30, 30, 30), font=font)
    for k in range(int(top * 4) + 1):  # grid every 0.25
        v = k / 4
        _, y = point(0, v, steps, top)
        d.line([(LEFT, y), (WIDTH - RIGHT, y)], fill=(222, 222, 222))
        d.text((10, y - 7), f"{v:.2f}", fill=(90, 90, 90), font=small)
    label_every = max(1, int(np.ceil(steps / 12)))
    for s in range(steps):
        x, y = point(s, 0.0, steps, top)
        d.line([(x, y), (x, y + 4)], fill=(120, 120, 120))
        if s % label_every == 0 or s == steps - 1:
            d.text((x - 6, y + 6), str(s), fill=(60, 60, 60), font=small)
            d.text((x - 12, y + 22), f"{float(times[s]):.2f}", fill=(130, 130, 130), font=small)
    d.text((10, HEIGHT - BOTTOM + 6), "step", fill=(60, 60, 60), font=small)
    d.text((10, HEIGHT - BOTTOM + 22), "t", fill=(130, 130, 130), font=small)
    for lv in range(levels):
        colour = hex_rgb(LEVEL_COLOURS[lv % len(LEVEL_COLOURS)])
        pts = [point(s, float(weights[s, lv]), steps, top) for s in range(steps)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        ly = TOP + 8 + 22 * lv
        d.line([(WIDTH - RIGHT + 12, ly + 7), (WIDTH - RIGHT + 36, ly + 7)], fill=colour, width=3)
        d.text((WIDTH - RIGHT + 42, ly), f"w{lv}: {names[lv] if lv < len(names) else ''}", fill=(30, 30, 30),
               font=small)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]


def weights_table(weights: torch.Tensor, times: torch.Tensor) -> str:
    """The gates as text, one step per line: 'step 0  t=0.999  w=[..]'."""
    return "\n".join(f"step {s:>3}  t={float(times[s]):.3f}  w=[" + ", ".join(f"{float(x):.3f}" for x in weights[s])
                     + "]" for s in range(weights.shape[0]))
