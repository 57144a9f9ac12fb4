"""A bar chart of HMoE fusion weights [low, mid, high] per subject (Eq. 7 and B.4 of 004)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..layout.layout import PALETTE
from ..layout.preview import hex_rgb

LEVEL_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f")  # low, mid, high
LEVEL_NAMES = ("low", "mid", "high")
ROW_H, BAR_W, GAP, LEFT, TOP, CHART_H = 262, 44, 10, 60, 40, 150


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def bar_geometry(subject: int, level: int, kind: int, value: float) -> tuple[int, int, int, int]:
    """Pixel rectangle of one bar: subject column, level group, kind 0 = routed, 1 = used."""
    group_w = 2 * BAR_W + GAP
    col_w = 3 * group_w + 4 * GAP
    bar = BAR_W // 2
    x0 = LEFT + subject * col_w + GAP + level * (group_w + GAP) + kind * (bar + 2)
    base = TOP + CHART_H
    return x0, base - round(value * CHART_H), x0 + bar, base


def draw_fusion_weights(routed: torch.Tensor, used: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: for each subject, the routed weight (solid) and the used one (outlined) per level."""
    n = routed.shape[0]
    group_w = 2 * BAR_W + GAP
    col_w = 3 * group_w + 4 * GAP
    width, height = LEFT + n * col_w + GAP, ROW_H
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(12)
    base = TOP + CHART_H
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = base - round(frac * CHART_H)
        d.line([(LEFT - 5, y), (width - GAP, y)], fill=(215, 215, 215))
        d.text((8, y - 7), f"{frac:.2f}", fill=(90, 90, 90), font=small)
    for s in range(n):
        cx = LEFT + s * col_w
        d.text((cx + GAP, 10), f"{s + 1} {labels[s] if s < len(labels) else ''}",
               fill=hex_rgb(PALETTE[s % len(PALETTE)]), font=font)
        for lv in range(3):
            colour = hex_rgb(LEVEL_COLOURS[lv])
            r, u = float(routed[s, lv]), float(used[s, lv])
            x0, y0, x1, y1 = bar_geometry(s, lv, 0, r)
            d.rectangle((x0, y0, x1, y1), fill=colour)
            x0, y0, x1, y1 = bar_geometry(s, lv, 1, u)
            d.rectangle((x0, y0, x1, y1), outline=(30, 30, 30), width=2)
            tx = bar_geometry(s, lv, 0, 0.0)[0]
            d.text((tx, base + 4), LEVEL_NAMES[lv], fill=(60, 60, 60), font=small)
            value = f"{r:.2f}" if abs(u - r) < 5e-3 else f"{r:.2f}>{u:.2f}"
            d.text((tx, base + 20), value, fill=(30, 30, 30), font=small)
    d.text((LEFT, height - 20), "solid: routed by HMoE   outline: used (override)", fill=(90, 90, 90), font=small)
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]
