"""The subject x region matrices drawn as heat-maps with their numbers: subject thumbnails across, region crops down."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..models.layout.layout import PALETTE
from .crops import prepare
from .metrics import Fidelity, SubjectMatrix

CELL, THUMB, PAD, HEAD = 92, 84, 12, 34
TITLES = {"clip_i": "CLIP-I", "dino": "DINO"}
# a perceptual ramp (viridis anchors) from the lowest to the highest value of each panel
RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def hex_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def ramp(t: float) -> tuple[int, int, int]:
    """Colour of a value scaled to [0, 1] on the ramp."""
    t = min(1.0, max(0.0, t)) * (len(RAMP) - 1)
    i = min(int(t), len(RAMP) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(RAMP[i], RAMP[i + 1]))


def thumbnail(crop: torch.Tensor) -> Image.Image:
    arr = (prepare(crop, THUMB, "pad").clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def panel_size(n: int) -> tuple[int, int]:
    """Width and height of one metric's panel for n subjects (row thumbnails, n cells, the margin column)."""
    return PAD + CELL + n * CELL + CELL + PAD, HEAD + CELL + n * CELL + PAD


def draw_panel(img: Image.Image, origin: tuple[int, int], title: str, m: SubjectMatrix, labels: Sequence[str],
               region_thumbs: Sequence[Image.Image], subject_thumbs: Sequence[Image.Image]) -> None:
    """One matrix at ``origin``: title, subject thumbnails across, region crops down, coloured numbered cells."""
    d = ImageDraw.Draw(img)
    ox, oy = origin
    n = len(labels)
    font, small = _font(15), _font(13)
    d.text((ox + PAD, oy + 8), title, fill=(20, 20, 20), font=font)
    values = m.matrix.float()
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi - lo > 1e-12 else 1.0
    digits = 3 if hi - lo >= 0.01 else 4 if hi - lo >= 0.001 else 5  # enough to tell the cells apart
    gx, gy = ox + PAD + CELL, oy + HEAD + CELL  # the grid's top-left corner
    for s in range(n):  # columns: subjects
        colour = hex_rgb(PALETTE[s % len(PALETTE)])
        x = gx + s * CELL
        img.paste(subject_thumbs[s], (x + (CELL - THUMB) // 2, oy + HEAD + 2))
        d.rectangle((x + (CELL - THUMB) // 2 - 2, oy + HEAD, x + (CELL + THUMB) // 2 + 1, oy + HEAD + THUMB + 3),
                    outline=colour, width=2)
        d.text((x + 4, oy + HEAD - 16), f"{s + 1} {labels[s]}"[:13], fill=colour, font=small)
    d.text((gx + n * CELL + 8, oy + HEAD + CELL // 2 - 8), "margin", fill=(20, 20, 20), font=small)
    margins = m.margin()
    for r in range(n):  # rows: regions of the output
        colour = hex_rgb(PALETTE[r % len(PALETTE)])
        y = gy + r * CELL
        img.paste(region_thumbs[r], (ox + PAD + 2, y + (CELL - THUMB) // 2))
        d.rectangle((ox + PAD, y + (CELL - THUMB) // 2 - 2, ox + PAD + THUMB + 3, y + (CELL + THUMB) // 2 + 1),
                    outline=colour, width=2)
        for s in range(n):
            v = float(values[r, s])
            t = (v - lo) / span
            x = gx + s * CELL
            d.rectangle((x + 1, y + 1, x + CELL - 2, y + CELL - 2), fill=ramp(t))
            if r == s:
                d.rectangle((x + 1, y + 1, x + CELL - 2, y + CELL - 2), outline=(255, 255, 255), width=3)
            text = f"{v:.{digits}f}"
            tb = d.textbbox((0, 0), text, font=font)
            d.text((x + (CELL - (tb[2] - tb[0])) // 2, y + CELL // 2 - 9), text,
                   fill=(0, 0, 0) if t > 0.55 else (255, 255, 255), font=font)
        mv = float(margins[r])
        label = "-" if math.isnan(mv) else f"{mv:+.{digits}f}"
        d.text((gx + n * CELL + 10, y + CELL // 2 - 9), label,
               fill=(20, 120, 20) if mv > 0 else (180, 30, 30), font=font)
    d.text((ox + PAD + 4, oy + HEAD + CELL // 2 - 20), "subjects ->", fill=(90, 90, 90), font=small)
    d.text((ox + PAD + 4, oy + HEAD + CELL // 2 + 4), "regions v", fill=(90, 90, 90), font=small)


def draw_fidelity(result: Fidelity) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: one heat-map panel per metric (CLIP-I, DINO) side by side, CLIP-T and backbones below."""
    n = len(result.labels)
    panels = result.matrices()
    pw, ph = panel_size(n)
    footer = 26 + 16 * len(result.backbones)
    width, height = max(pw * max(1, len(panels)), 420), ph + footer
    img = Image.new("RGB", (width, height), (250, 250, 250))
    region_thumbs = [thumbnail(c) for c in result.regions]
    firsts = np.cumsum((0, *result.views[:-1]))
    subject_thumbs = [thumbnail(result.references[int(i)]) for i in firsts]
    for k, (name, m) in enumerate(panels.items()):
        draw_panel(img, (k * pw, 0), TITLES[name], m, result.labels, region_thumbs, subject_thumbs)
    d = ImageDraw.Draw(img)
    font = _font(14)
    clip_t = "CLIP-T: -" if result.clip_t is None else f"CLIP-T (whole image vs prompt): {result.clip_t:.4f}"
    d.text((PAD, ph + 4), f"{clip_t}    crop: {result.crop}    rows: regions of the output, columns: subjects",
           fill=(20, 20, 20), font=font)
    for i, (k, v) in enumerate(result.backbones.items()):
        d.text((PAD, ph + 24 + 16 * i), f"{k}: {v}", fill=(90, 90, 90), font=_font(12))
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]
